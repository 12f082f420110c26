"""benchmarks/model_table.py: one model's cell under each budget the table can be made for."""

import importlib.util
import os

import pytest
import torch

_path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "model_table.py")
_spec = importlib.util.spec_from_file_location("model_table", _path)
mt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mt)


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the worker pins one thread, as in its own subprocess


@pytest.mark.parametrize("cost,beta", [("params", 0.0), ("params+flops", 1.0)])
def test_worker_prunes_to_the_budget_in_its_unit(threads, cost, beta):
    row = mt.worker("resnet20", 32, cost, beta)
    for coupling in mt.COUPLINGS:
        c = row[coupling]
        assert c["status"] == "ok", c
        assert c["kept"] <= 0.5 and c["exact_count"]
        if cost == "params+flops":  # both parts bind, within a few filters
            assert 0.45 <= c["kept"] and 0.45 <= c["kept_flops"] <= 0.5
    text = mt.markdown([row], cost)
    assert "of MACs" in text
    assert ("half their parameters and MACs" in text) == (cost == "params+flops")
