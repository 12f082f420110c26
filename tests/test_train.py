"""paam-train end to end on the CPU: embedded default, CIFAR JPEG sample, resume, DDP, errors."""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import paam_fast as pf
from paam_fast.train import main

SHARED_CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "cifar10-jpeg.tar.gz")
FIELDS = {"arch", "dataset", "method", "epochs", "top1", "params_dense", "params_final",
          "flops_dense", "flops_final", "per_layer", "wall_s", "device", "torch", "commit"}
# tests of plumbing (resume, forks, logs, BN re-estimation), not of learning: 512 digits images,
# 8 steps of 64 per epoch (a full-digits run is ~3x the time; CI must stay under 30 min)
SMALL = ["--subset", "512", "--batch-size", "64"]


def _report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_embedded_default_two_epochs(tmp_path):
    out = str(tmp_path / "run")
    assert main(["--epochs", "2", "--out", out, "--quiet"]) == 0
    rep = _report(out)
    assert FIELDS <= set(rep)
    assert rep["dataset"] == "digits" and rep["arch"] == "resnet20" and rep["method"] == "paam"
    assert rep["top1"] > 0.5  # chance is 0.1
    assert rep["params_final"] <= 0.5 * rep["params_dense"]
    assert all({"name", "filters_dense", "filters_final"} <= set(r) for r in rep["per_layer"])
    for png in ("widths.png", "scores.png", "curves.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[-1])
    assert {"loss", "eval_acc", "lr", "lam", "kept_fraction", "per_layer"} <= set(rec)
    again = pf.load(os.path.join(out, "model.paam"), lambda: pf.models.resnet20())
    assert pf.count(again, (1, 3, 32, 32))["params"] == rep["params_final"]


@pytest.mark.parametrize("method", ["dense", "slim", "uniform", "random"])
def test_baselines_run(tmp_path, method):
    out = str(tmp_path / method)
    assert main(["--epochs", "3", "--method", method, "--out", out, "--quiet",
                 "--keep", "0.5", *SMALL]) == 0
    rep = _report(out)
    assert rep["method"] == method and rep["top1"] > 0.3
    if method == "dense":
        assert rep["params_final"] == rep["params_dense"]
    else:
        assert rep["params_final"] <= 0.5 * rep["params_dense"]


@pytest.fixture(scope="module")
def cifar_sample(tmp_path_factory):
    """500 images of the shared JPEG CIFAR-10 (40 train + 10 test per class) as a tar.gz."""
    if not os.path.exists(SHARED_CIFAR):
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not here")
    d = tmp_path_factory.mktemp("cifar")
    path = d / "sample.tar.gz"
    want = {"train": 40, "test": 10}
    taken: dict = {}
    with tarfile.open(SHARED_CIFAR) as src, tarfile.open(path, "w:gz") as dst:
        for m in src:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split in want and taken.get((split, cls), 0) < want[split]:
                taken[(split, cls)] = taken.get((split, cls), 0) + 1
                dst.addfile(m, src.extractfile(m))
            if len(taken) == 20 and all(taken[k] == want[k[0]] for k in taken):
                break
    return str(path)


def test_cifar_sample_decode_cache_train_select_compact(tmp_path, cifar_sample):
    out, cache = str(tmp_path / "run"), str(tmp_path / "cache")
    args = ["--dataset", "cifar10", "--data", cifar_sample, "--arch", "resnet20", "--epochs", "2",
            "--select-epoch", "1", "--batch-size", "50", "--cache", cache, "--quiet",
            "--out", out, "--round-to", "4"]
    assert main(args) == 0
    assert len(os.listdir(cache)) == 1  # decoded once, cached
    rep = _report(out)
    assert rep["dataset"] == "cifar10" and rep["params_final"] <= 0.5 * rep["params_dense"]
    for r in rep["per_layer"]:
        assert r["filters_final"] % 4 == 0 or r["filters_final"] == r["filters_dense"]
    # the cached run decodes nothing: the archive may even vanish
    assert main(args[:-2] + ["--out", str(tmp_path / "run2"), "--val", "0.2"]) == 0
    assert _report(str(tmp_path / "run2"))["val_top1"] is not None


def _final_state(out):
    return torch.load(os.path.join(out, "model.paam"), weights_only=True)["state_dict"]


RESUME = ["--epochs", "4", "--select-epoch", "2", "--quiet", *SMALL]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref = str(tmp_path_factory.mktemp("resume") / "ref")
    assert main(RESUME + ["--out", ref]) == 0
    return ref


# 8 steps per epoch, selection and compaction at the end of epoch 2 (step 16): the last
# checkpoint before the cut is dense (step 12) / compacted, with momentum (step 28)
@pytest.mark.parametrize("stop_at", [12, 28])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, uninterrupted, stop_at):
    out = str(tmp_path / "cut")
    assert main(RESUME + ["--out", out, "--max-steps", str(stop_at)]) == 0
    assert not os.path.exists(os.path.join(out, "report.json"))
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["epoch"] == stop_at // 8
    assert main(["--out", out, "--resume", "--quiet"]) == 0
    a, b = _final_state(uninterrupted), _final_state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(out)[-1]["loss"] == _metrics(uninterrupted)[-1]["loss"]


def test_ddp_two_processes_agree(tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "paam_fast.train", "--epochs", "2", "--quiet",
           "--select-epoch", "1", "--batch-size", "32", "--out", out]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    d0 = json.load(open(os.path.join(out, "digest_rank0.json")))
    d1 = json.load(open(os.path.join(out, "digest_rank1.json")))
    assert d0["weights_sha256"] == d1["weights_sha256"]
    assert d0["widths"] == d1["widths"] and sum(d0["widths"].values()) > 0
    assert _report(out)["params_final"] < _report(out)["params_dense"]


@pytest.mark.parametrize("argv,msg", [
    (["--dataset", "cifar10"], "needs --data"),
    (["--dataset", "cifar10", "--data", "/nonexistent/x.tar.gz"], "does not exist"),
    (["--keep", "0"], "--keep must be a fraction"),
    (["--arch", "resnet7"], "unknown --arch"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA GPU"),
    (["--score-lr-scale", "0"], "--score-lr-scale must be a positive number"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, msg):
    out = str(tmp_path / "x")
    assert main(argv + ["--out", out, "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert msg in err
    if "does not exist" in msg:
        assert "accepted --data layouts" in err


def test_corrupt_archive_and_existing_run(tmp_path, capsys):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 100)
    out = str(tmp_path / "x")
    assert main(["--dataset", "cifar10", "--data", str(bad), "--out", out, "--quiet",
                 "--cache", str(tmp_path / "c")]) == 2
    assert "accepted --data layouts" in capsys.readouterr().err
    os.makedirs(tmp_path / "prev")
    (tmp_path / "prev" / "report.json").write_text("{}")
    assert main(["--out", str(tmp_path / "prev"), "--epochs", "1", "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "prev" / "report.json").read_text() == "{}"


def _metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")).read().splitlines()]


def test_bn_reestimation_before_the_evaluation_after_selection(tmp_path):
    out = str(tmp_path / "run")
    assert main(["--epochs", "2", "--select-epoch", "1", "--bn-reestimate", "5", "--out", out,
                 "--quiet", *SMALL]) == 0
    m = _metrics(out)
    assert m[0]["bn_reestimate_batches"] == 5
    assert 0 <= m[0]["eval_acc_before_bn"] <= 1 and 0 <= m[0]["eval_acc"] <= 1
    assert "eval_acc_before_bn" not in m[1]  # no selection in the last epoch
    rep = _report(out)  # and before the final evaluation
    assert rep["bn_reestimate_batches"] == 5 and 0 <= rep["top1_before_bn"] <= 1
    out2 = str(tmp_path / "off")
    assert main(["--epochs", "2", "--select-epoch", "1", "--bn-reestimate", "0", "--out", out2,
                 "--quiet", *SMALL]) == 0
    assert "eval_acc_before_bn" not in _metrics(out2)[0]
    assert "top1_before_bn" not in _report(out2)
    # re-estimation touches the BN statistics only: the two runs train the same weights
    a, b = torch.load(os.path.join(out, "ckpt.pt")), torch.load(os.path.join(out2, "ckpt.pt"))
    weights = [k for k in a["model"] if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in weights)


def test_reestimate_bn_is_the_plain_average_over_the_batches():
    from paam_fast.train import _reestimate_bn

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(5.0)
    bn.eval()
    batches = [(torch.randn(4, 3, 2, 2) * (i + 1) + i, None) for i in range(4)]
    args = type("A", (), {"amp": "none", "channels_last": False})()
    assert _reestimate_bn(bn, batches, 3, torch.device("cpu"), args) == 3
    xs = [b[0] for b in batches[:3]]
    mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    var = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in xs]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training


def test_retrain_trains_the_widths_of_a_paam_run_from_scratch(tmp_path):
    src = str(tmp_path / "paam")
    assert main(["--epochs", "3", "--select-epoch", "1", "--keep", "0.4", "--out", src,
                 "--quiet", *SMALL]) == 0
    rep = _report(src)
    out = str(tmp_path / "retrain")
    assert main(["--epochs", "3", "--retrain", src, "--out", out, "--quiet", *SMALL]) == 0
    again = _report(out)
    assert again["method"] == "retrain" and again["widths"] == rep["widths"]
    assert again["params_final"] == rep["params_final"]
    assert again["retrain_from"] == os.path.abspath(os.path.join(src, "report.json"))
    assert again["top1"] > 0.3  # it learns
    # an older report.json without "widths": the widths come from the per-layer rows
    old = dict(rep)
    del old["widths"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    out2 = str(tmp_path / "retrain2")
    assert main(["--epochs", "1", "--retrain", str(path), "--out", out2, "--quiet",
                 *SMALL]) == 0
    assert _report(out2)["widths"] == rep["widths"]


def test_new_options_reach_the_model_and_the_scheduler():
    from paam_fast.train import Dist, Run, build_parser, resolve

    args = resolve(build_parser().parse_args(["--init-bias", "-2", "--score-warmup", "2",
                                              "--penalty-balance", "unit", "--epochs", "4"]))
    r = Run(args, Dist())
    assert all(bool((g.b == -2).all()) for g in r.model.paam.groups)
    assert r.pruner.balance == "unit"
    net, paam = r.optimizer.param_groups
    ramp = 2 * r.steps_per_epoch
    assert paam["lr"] == pytest.approx(net["lr"] / ramp)
    for _ in range(ramp):
        r.scheduler.step()
    assert paam["lr"] == pytest.approx(net["lr"])


@pytest.mark.parametrize("argv,msg", [
    (["--method", "retrain"], "needs --retrain"),
    (["--retrain", "/nonexistent/run"], "cannot read a report.json"),
    (["--penalty-balance", "budget", "--mass", "0.9"], "needs a budget"),
    (["--bn-reestimate", "-1"], "--bn-reestimate must be"),
    # budgets no selection can meet: refused before training, not at the selection epoch
    (["--method", "uniform", "--keep", "0.001", "--round-to", "1"], "even one filter"),
    (["--keep", "0.001", "--round-to", "1"], "no selection can remove"),
])
def test_bad_new_options_exit_2(tmp_path, capsys, argv, msg):
    assert main(argv + ["--out", str(tmp_path / "x"), "--epochs", "1", "--quiet"]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [
    (["--lam", "-1"], "--lam"), (["--dim", "0"], "--dim"), (["--leak", "-1"], "--leak"),
    (["--select-epoch", "99"], "--select-epoch"), (["--batch-size", "0"], "--batch-size"),
    (["--min-keep", "2"], "--min-keep"), (["--round-to", "0"], "--round-to"),
    (["--lr", "nan"], "--lr"), (["--steps", "0"], "--steps"), (["--subset", "0"], "--subset"),
    (["--select-beta", "-1"], "--select-beta"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--select-epoch", "1", "--final-epoch", "0"], "--final-epoch"),
])
def test_every_bad_value_exits_2_naming_the_option_before_any_work(tmp_path, capsys, argv,
                                                                    flag):
    out = tmp_path / "x"
    assert main(argv + ["--out", str(out), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must" in err and "Traceback" not in err
    assert not out.exists()  # nothing was started


def test_a_failed_start_leaves_nothing_that_blocks_its_rerun(tmp_path, capsys):
    out = tmp_path / "x"
    argv = ["--dataset", "imagenet", "--data", str(tmp_path), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "must hold train/" in capsys.readouterr().err
    assert not out.exists()
    assert main(argv) == 2  # the same error again, not "already holds a run"
    assert "already holds a run" not in capsys.readouterr().err


def test_a_log_gets_one_line_per_epoch_not_progress_bars(tmp_path):
    out = str(tmp_path / "x")
    res = subprocess.run([sys.executable, "-m", "paam_fast.train", "--epochs", "2", "--out", out,
                          "--max-steps", "12", *SMALL], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "it/s" not in res.stderr
    assert res.stdout.count("epoch 1/2:") == 1


def test_a_fork_with_the_sources_selection_is_the_source_run_and_others_branch(tmp_path,
                                                                               capsys):
    src = str(tmp_path / "src")
    common = ["--epochs", "3", "--select-epoch", "1", "--max-steps", "20", "--quiet", *SMALL]
    # --max-steps stops inside epoch 3: compare at the last checkpoint, the end of epoch 2
    assert main(common + ["--keep", "0.5", "--out", src]) == 0
    assert os.path.exists(os.path.join(src, "presel.pt"))
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    assert main(common + ["--keep", "0.5", "--fork-from", src, "--out", same]) == 0
    assert main(common + ["--keep", "0.3", "--select-key", "unit_mean", "--fork-from", src,
                          "--out", other]) == 0
    a, b = (torch.load(os.path.join(p, "ckpt.pt"), weights_only=True) for p in (src, same))
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert _metrics(src) == [{**m, "epoch_s": _metrics(src)[i]["epoch_s"]}
                             for i, m in enumerate(_metrics(same))]
    assert _metrics(other)[1]["kept_fraction"] < _metrics(src)[1]["kept_fraction"]
    # the joint phase must match: another λ is refused, naming it
    assert main(common + ["--lam", "0.1", "--fork-from", src, "--out",
                          str(tmp_path / "bad")]) == 2
    assert "--lam" in capsys.readouterr().err


def test_a_masked_fork_reaches_its_own_budget_not_its_sources(tmp_path):
    """Masked mode steps towards the pruner's final budget; a fork restores the source's pruner
    state, and must not take the source's budget with it (it did: a keep-0.15 masked fork of a
    keep-0.3 run landed at 0.3)."""
    common = ["--epochs", "4", "--select-epoch", "1", "--quiet", *SMALL]
    src, fk = str(tmp_path / "src"), str(tmp_path / "fork")
    assert main(common + ["--keep", "0.6", "--stop-at-selection", "--out", src]) == 0
    assert main(common + ["--keep", "0.3", "--after-select", "masked", "--steps", "2",
                          "--final-epoch", "3", "--fork-from", src, "--out", fk]) == 0
    rep = _report(fk)
    assert rep["params_final"] / rep["params_dense"] <= 0.3 + 0.01
    assert rep["flops_final"] / rep["flops_dense"] <= 0.3 + 0.01
    steps = [e for m in _metrics(fk) for e in m["events"] if e["event"] == "select"]
    assert [e["budget"]["params"] / e["dense_params"] for e in steps] == \
        pytest.approx([0.65, 0.3], abs=0.01)


def test_stop_at_selection_writes_the_full_runs_presel_and_stops(tmp_path, capsys):
    """The joint phase alone (--stop-at-selection) leaves the same pre-selection state as a
    whole run does at its selection epoch, and nothing after it."""
    common = ["--epochs", "3", "--select-epoch", "1", "--quiet", *SMALL]
    full, joint = str(tmp_path / "full"), str(tmp_path / "joint")
    assert main(common + ["--max-steps", "20", "--out", full]) == 0
    assert main(common + ["--stop-at-selection", "--out", joint]) == 0
    assert "stopped at the selection" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(joint, "report.json"))
    assert not os.path.exists(os.path.join(joint, "metrics.jsonl"))  # no epoch end ran
    a, b = (torch.load(os.path.join(p, "presel.pt"), weights_only=True) for p in (full, joint))
    assert a["epoch"] == b["epoch"] == 0 and a["global_step"] == b["global_step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for x, y in zip(a["last_gates"], b["last_gates"]):
        assert torch.equal(x, y)
    # a fork accepts it as a source (the flag is not a joint-phase option)
    fork_out = str(tmp_path / "fork")
    assert main(common + ["--max-steps", "12", "--fork-from", joint, "--out", fork_out]) == 0
    assert _metrics(fork_out)[0]["events"][0]["event"] == "select"
    # --resume without the flag runs on through the selection to the end
    assert main(["--resume", "--out", joint, "--quiet"]) == 0
    assert _report(joint)["epochs"] == 3 and len(_metrics(joint)) == 3


@pytest.mark.parametrize("argv,err", [
    (["--method", "dense", "--stop-at-selection"], "has none"),
    (["--stop-at-selection", "--fork-from", "x"], "a fork starts at the selection"),
])
def test_stop_at_selection_refuses_runs_without_a_joint_phase(tmp_path, capsys, argv, err):
    assert main(argv + ["--out", str(tmp_path / "x")]) == 2
    assert err in capsys.readouterr().err


@pytest.mark.parametrize("argv,want", [
    # paam with a budget: the Taylor key per joint cost, chosen on paired seeds (RESULTS.md)
    ([], ("taylor", "params+flops", 1.0)),
    (["--keep", "0.3"], ("taylor", "params+flops", 1.0)),
    # the baselines take the same params+MACs budget, so they land at the same point
    (["--method", "uniform", "--keep", "0.3"], ("gate", "params+flops", 0.0)),
    (["--method", "random", "--keep", "0.3"], ("gate", "params+flops", 0.0)),
    # modes that read the gates' mass, and the peers as published: the paper-literal selection
    (["--mass", "0.9"], ("gate", "params", 0.0)),
    (["--target", "0.4"], ("gate", "params", 0.0)),
    (["--method", "slim"], ("gate", "params", 0.0)),
    (["--method", "dense"], ("gate", "params", 0.0)),
    # an option given is never overridden; the Taylor key and β = 1 come together with the
    # params+MACs and the MAC budgets (the evidence is for those), other budgets keep the old
    # defaults
    (["--select-cost", "params"], ("gate", "params", 0.0)),
    (["--select-cost", "flops"], ("taylor", "flops", 1.0)),
    (["--select-cost", "flops", "--select-key", "gate", "--select-beta", "0"],
     ("gate", "flops", 0.0)),
    (["--select-cost", "latency", "--keep", "0.5"], ("gate", "latency", 0.0)),
    (["--select-key", "unit_mean"], ("unit_mean", "params+flops", 1.0)),
    (["--select-key", "gate", "--select-cost", "params", "--select-beta", "0"],
     ("gate", "params", 0.0)),
])
def test_selection_defaults(argv, want):
    from paam_fast.train_options import build_parser, resolve

    a = resolve(build_parser().parse_args(argv))
    assert (a.select_key, a.select_cost, a.select_beta) == want


@pytest.mark.parametrize("argv,want", [
    # PAAM with a params+MACs or a MAC budget cuts in masked steps (chosen on paired seeds)
    ([], "masked"),
    (["--keep", "0.15"], "masked"),
    (["--select-cost", "flops"], "masked"),
    # other budgets, modes and methods: the one-shot cut, as before; a given option stays
    (["--select-cost", "params"], "compact"),
    (["--select-cost", "latency", "--keep", "0.5"], "compact"),
    (["--select-cost", "flops", "--method", "uniform"], "compact"),
    (["--mass", "0.9"], "compact"),
    (["--method", "uniform", "--keep", "0.3"], "compact"),
    (["--method", "slim"], "compact"),
    (["--after-select", "compact"], "compact"),
    (["--select-cost", "params", "--after-select", "masked"], "masked"),
])
def test_after_select_default(argv, want):
    from paam_fast.train_options import build_parser, resolve

    assert resolve(build_parser().parse_args(argv)).after_select == want


def test_resume_of_a_run_older_than_the_selection_defaults_keeps_its_selection(tmp_path):
    """A config.json written before --select-key/--select-cost/--select-beta existed ran the
    gate over parameters; resuming it must not switch it to the new defaults."""
    out = str(tmp_path / "run")
    assert main(["--epochs", "3", "--select-epoch", "2", "--out", out, "--quiet",
                 "--max-steps", "8", *SMALL]) == 0  # stopped after epoch 1, before selection
    assert not os.path.exists(os.path.join(out, "report.json"))
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    assert (cfg["select_key"], cfg["select_cost"], cfg["select_beta"]) == \
        ("taylor", "params+flops", 1.0)
    for k in ("select_key", "select_cost", "select_beta"):
        del cfg[k]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert main(["--out", out, "--resume", "--quiet"]) == 0
    rep = _report(out)
    again = rep["config"]
    assert (again["select_key"], again["select_cost"], again["select_beta"]) == \
        ("gate", "params", 0.0)
    assert rep["params_final"] <= 0.5 * rep["params_dense"] * 1.01


def test_grouped_cifar_resnet_cuts_its_stages_masked_then_exported(tmp_path):
    """--coupling grouped on the CIFAR ResNet20 (option-A shortcuts): the residual stages are
    units, cut in masked steps, and the saved model (stages sliced on both sides of each
    shortcut) reloads to the reported accuracy's network."""
    out = str(tmp_path / "g")
    assert main(["--epochs", "3", "--select-epoch", "1", "--coupling", "grouped", "--keep",
                 "0.3", "--after-select", "masked", "--steps", "2", "--final-epoch", "2",
                 "--out", out, "--quiet", *SMALL]) == 0
    stem = next(r for r in _report(out)["per_layer"] if r["name"] == "conv1")
    assert stem["filters_final"] < 16  # the first stage was cut
    model = pf.load(os.path.join(out, "model.paam"), pf.models.resnet20).eval()
    assert model.conv1.out_channels == stem["filters_final"]
    assert model.layer2[0].shortcut.in_channels == model.conv1.out_channels
    assert model.layer2[0].shortcut.out_channels == model.layer2[0].conv2.out_channels
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
