"""The CPU training-throughput benchmark runs every method and mode it reports."""

import pytest

from paam_fast.bench.cpu_train import MODES, measure


@pytest.mark.parametrize("method", ["dense", "uniform", "paam", "paam compacted"])
def test_every_method_measures(method):
    assert measure(method, MODES[1], "resnet20", batch=4, size=16, keep=0.5, reps=2) > 0
