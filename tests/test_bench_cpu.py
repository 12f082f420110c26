"""The CPU training-throughput benchmark runs every method and mode it reports."""

import pytest

from paam_fast.bench.cpu_train import MODES, measure


@pytest.mark.parametrize("method", ["dense", "uniform", "paam", "paam compacted"])
def test_every_method_measures(method):
    assert measure(method, MODES[1], "resnet20", batch=4, size=16, keep=0.5, reps=2) > 0


def test_drift_times_one_network_after_each_kind_of_work(tmp_path, monkeypatch):
    from paam_fast.bench import drift

    monkeypatch.setenv("PAAM_BENCH_OUT", str(tmp_path))
    res = drift.main(["--arch", "resnet20", "--size", "32", "--num-classes", "10", "--batch",
                      "2", "--reps", "1", "--seconds", "0.01", "--cycles", "1"])
    assert [s["after"] for s in res["series"]] == ["start", "idle", "compute", "shapes"]
    assert all(s["median_ms"] > 0 for s in res["series"]) and res["spread"] >= 0
    assert (tmp_path / "drift_resnet20_b2.json").exists()
