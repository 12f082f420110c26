"""The CPU benchmarks run and report what they say: training throughput per method and mode,
clock drift, inference of dense and pruned networks."""

import pytest
import torch

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


def test_inference_times_dense_and_pruned_interleaved(tmp_path, monkeypatch):
    import paam_fast as pf
    from paam_fast.bench import inference

    model = pf.paamify(pf.models.get_model("resnet20"), input_size=(1, 3, 32, 32))
    model(torch.randn(2, 3, 32, 32))  # scores exist after a forward
    pf.select(model, keep=0.3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        pf.save(model, tmp_path / d / "model.paam")
    monkeypatch.setenv("PAAM_BENCH_OUT", str(tmp_path))
    res = inference.main(["--arch", "resnet20", "--batch", "4", "--rounds", "2",
                          "--channels-last", "--model", str(tmp_path / "a" / "model.paam"),
                          str(tmp_path / "b" / "model.paam"), str(tmp_path / "b" / "model.paam")])
    assert list(res["models"]) == ["a", "b", "b#2"]  # named by folder, never overwritten
    assert res["dense"]["b4"]["of_dense"] == 1.0
    for name in ("a", "b", "b#2"):
        assert res[name]["count"]["params"] < 0.5 * res["dense"]["count"]["params"]
        assert res[name]["b1"]["median_ms"] > 0 and res[name]["b4"]["images_per_s"] > 0
    assert (tmp_path / "inference_resnet20_b4.json").exists()


def test_inference_rebuilds_recorded_runs_from_their_widths(tmp_path, monkeypatch):
    """--rows: the networks of recorded proxy runs, rebuilt from their per-unit widths, count
    exactly the params and MACs their training runs recorded (else the bench refuses)."""
    import json
    import os

    from paam_fast.bench import inference

    rows = os.path.join(os.path.dirname(__file__), "..", "results", "proxy2.jsonl")
    monkeypatch.setenv("PAAM_BENCH_OUT", str(tmp_path))
    res = inference.main(["--arch", "resnet20", "--batch", "2", "--rounds", "1", "--no-b1",
                          "--rows", rows, "--settings", "uniform", "paam", "--seeds", "0"])
    assert res["uniform s0"]["count"]["params"] == 80752  # uniform thinning at 0.3
    assert res["uniform s0"]["count"]["flops"] == 12368512
    assert res["uniform s0"]["val_top1"] == 0.729
    assert res["paam s0"]["count"]["params"] < 0.31 * res["dense"]["count"]["params"]
    assert res["paam s0"]["b2"]["of_dense"] > 0
    # a row whose widths are not its network's: refused, not timed
    row = next(json.loads(line) for line in open(rows) if '"setting": "uniform"' in line)
    row["per_unit"]["layer3.2.conv1"] += 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match="rebuilt with"):
        inference.main(["--arch", "resnet20", "--rows", str(bad), "--settings", "uniform"])
    with pytest.raises(SystemExit, match="no row"):
        inference.main(["--arch", "resnet20", "--rows", rows, "--settings", "nonesuch"])
