"""paam-train --method torch-pruning: the peer library's sparse learning and global pruning step
to PAAM's budget, on the CPU (digits, resnet20)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import paam_fast as pf
from paam_fast.models import PadShortcut
from paam_fast.train import main

tp = pytest.importorskip("torch_pruning")
from paam_fast.peers import torch_pruning as peer  # noqa: E402

FIELDS = {"arch", "dataset", "method", "epochs", "top1", "params_dense", "params_final",
          "flops_dense", "flops_final", "per_layer", "wall_s", "device", "torch", "commit"}
# a small, fast run: 8 steps per epoch, pruning at the end of the second epoch
SMALL = ["--epochs", "4", "--select-epoch", "2", "--subset", "512", "--batch-size", "64",
         "--method", "torch-pruning", "--keep", "0.5", "--quiet"]


def _report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def _final_state(out):
    return torch.load(os.path.join(out, "model.paam"), weights_only=True)["state_dict"]


# --------------------------------------------------------------------------- the shortcut
@pytest.mark.parametrize("hw", [(8, 8), (7, 5)])
def test_pad_shortcut_pruner_prunes_both_sides_exactly(hw):
    x = torch.randn(3, 6, *hw, dtype=torch.float64)
    pad = PadShortcut(5)
    sc = PadShortcut(5, in_channels=6)
    assert torch.equal(sc(x), pad(x))
    fn = peer._pad_shortcut_pruner(tp)
    gone_in, gone_out = [1, 4], [0, 6, 9, 15]  # 6 and 9: written from inputs 1 and 4; 0, 15: pad
    fn.prune_in_channels(sc, gone_in)
    fn.prune_out_channels(sc, gone_out)
    assert (sc.in_channels, sc.out_channels) == (4, 12)
    assert (fn.get_in_channels(sc), fn.get_out_channels(sc)) == (4, 12)
    keep_in = [i for i in range(6) if i not in gone_in]
    keep_out = [j for j in range(16) if j not in gone_out]
    # a removed input reads as zero; a removed output is not there
    x0 = x.clone()
    x0[:, gone_in] = 0
    assert torch.equal(sc(x[:, keep_in]), pad(x0)[:, keep_out])
    # pruning an output that an input writes drops that pair, not the input
    fn.prune_out_channels(sc, [5])  # was output 7: input 2
    x1 = x0.clone()
    x1[:, 2] = 0
    assert sc.in_channels == 4
    assert torch.equal(sc(x[:, keep_in]), pad(x1)[:, [j for j in keep_out if j != 7]])


def test_pad_shortcuts_without_in_channels_get_them_without_changing_the_model():
    m = pf.models.resnet20()
    for q in m.modules():
        if isinstance(q, PadShortcut):
            q.in_channels = None  # as a user's PadShortcut(pad) would be
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    ref = m(x)
    m.train()
    bn = m.bn1.running_mean.clone()
    assert peer.complete_pad_shortcuts(m, torch.zeros(1, 3, 32, 32)) == 2
    assert m.training and torch.equal(m.bn1.running_mean, bn)  # no statistics moved
    assert [q.in_channels for q in m.modules() if isinstance(q, PadShortcut)] == [16, 32]
    m.eval()
    assert torch.equal(m(x), ref)


# --------------------------------------------------------------------------- the budget
@pytest.mark.parametrize("cost", ["params", "flops"])
def test_global_step_lands_on_the_budget_and_replays_from_its_history(cost):
    m = pf.models.resnet20()
    p = peer.TorchPruningPeer(m, input_size=(1, 3, 32, 32), epochs=3, keep=0.5,
                              select_cost=cost, select_epoch=2)
    dense = pf.count(m, (1, 3, 32, 32))
    assert p.epoch_end(0) == [] and not p.pruned
    (ev,) = p.epoch_end(1)
    assert ev["event"] == "compact" and p.pruned and not p.active
    now = pf.count(m, (1, 3, 32, 32))
    budget = int(0.5 * dense[cost])
    assert ev["budget"] == budget and ev[cost] == now[cost]
    # the largest network within the budget: one channel more is over it
    assert now[cost] <= budget < ev["cost_one_channel_more"]
    assert budget - now[cost] < 0.01 * dense[cost]
    assert m.fc.out_features == 10 and m.fc.in_features < 64  # classifier kept, its input pruned
    widths = p.widths()
    assert widths["layer2.0.conv2"] < 32 and widths["layer1.0.conv1"] < 16
    assert p.epoch_end(2) == []

    # a fresh dense model + the JSON state = the same pruned network
    state = json.loads(json.dumps(p.state_dict()))
    torch.manual_seed(0)
    m2 = pf.models.resnet20()
    p2 = peer.TorchPruningPeer(m2, input_size=(1, 3, 32, 32), epochs=3, keep=0.5,
                               select_cost=cost, select_epoch=2)
    p2.load_state_dict(state)
    assert p2.pruned and p2.widths() == widths
    m2.load_state_dict(m.state_dict())
    m.eval()
    m2.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m2(x))


def test_internal_scope_prunes_only_paams_units_and_keeps_the_stages_whole():
    """--tp-scope internal: Torch-Pruning limited to the units PAAM's default gates (each
    block's first conv); the stem, every block's last conv and the classifier keep their
    widths, and the budget is still met from those units alone."""
    m = pf.models.resnet20()
    dense_widths = {n: c.out_channels for n, c in m.named_modules()
                    if isinstance(c, torch.nn.Conv2d)}
    p = peer.TorchPruningPeer(m, input_size=(1, 3, 32, 32), epochs=3, keep=0.5,
                              select_epoch=1, scope="internal")
    internal = {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in (0, 1, 2)}
    assert p.channels == 3 * (16 + 32 + 64)  # N: the internal units' channels only
    (ev,) = p.epoch_end(0)
    assert ev["scope"] == "internal" and ev["params"] <= int(0.5 * 269_722)
    widths = p.widths()
    for name, w in widths.items():
        if name in internal:
            assert w <= dense_widths[name]
        else:
            assert w == dense_widths[name], name
    assert sum(widths[n] for n in internal) < sum(dense_widths[n] for n in internal)
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="scope"):
        peer.TorchPruningPeer(pf.models.resnet20(), input_size=(1, 3, 32, 32), epochs=3,
                              keep=0.5, scope="grouped")


def test_the_regularizer_adds_to_the_gradients_before_pruning_only():
    m = pf.models.resnet20()
    p = peer.TorchPruningPeer(m, input_size=(1, 3, 32, 32), epochs=2, keep=0.5,
                              select_epoch=1, reg=1e-2)
    m(torch.randn(4, 3, 32, 32)).sum().backward()
    g = m.layer1[0].conv1.weight.grad.clone()
    p.regularize(m)
    d = m.layer1[0].conv1.weight.grad - g
    w = m.layer1[0].conv1.weight.detach()
    # λ·γ·w with γ in [1, 2^4], once for its output channel's group and once for its input
    # channel's (the stage's residual group)
    ratio = d / w
    assert torch.all(ratio >= 2e-2 * (1 - 1e-3)) and torch.all(ratio <= 32e-2 * (1 + 1e-3))
    p.epoch_end(0)
    m.zero_grad()
    m(torch.randn(4, 3, 32, 32)).sum().backward()
    g = m.layer1[0].conv1.weight.grad.clone()
    p.regularize(m)
    assert torch.equal(m.layer1[0].conv1.weight.grad, g)


# --------------------------------------------------------------------------- paam-train
def test_run_learns_and_lands_within_the_budget(tmp_path):
    out = str(tmp_path / "tp")
    assert main(["--epochs", "2", "--select-epoch", "1", "--method", "torch-pruning",
                 "--keep", "0.5", "--out", out, "--quiet"]) == 0
    rep = _report(out)
    assert FIELDS <= set(rep) and rep["method"] == "torch-pruning"
    assert rep["top1"] > 0.5  # chance is 0.1
    budget = int(0.5 * rep["params_dense"])
    assert budget - 0.01 * rep["params_dense"] < rep["params_final"] <= budget
    assert rep["flops_final"] < rep["flops_dense"]
    assert any(r["filters_final"] < r["filters_dense"] for r in rep["per_layer"])
    assert all(r["filters_final"] <= r["filters_dense"] for r in rep["per_layer"])
    tpr = rep["torch_pruning"]
    assert tpr["pruned"] and tpr["history"] and tpr["reg"] == peer.DEFAULT_REG
    assert tpr["search"]["cost"] == rep["params_final"]
    lines = [json.loads(s) for s in open(os.path.join(out, "metrics.jsonl"))]
    assert [e["event"] for e in lines[0]["events"]] == ["compact"]
    assert lines[0]["lam"] == peer.DEFAULT_REG
    assert lines[1]["kept_fraction"] == rep["params_final"] / rep["params_dense"]


@pytest.fixture(scope="module")
def small_ref(tmp_path_factory):
    ref = str(tmp_path_factory.mktemp("tp") / "ref")
    assert main(SMALL + ["--out", ref]) == 0
    return ref


# the last checkpoint: dense (epoch 1); just pruned, fresh optimizer (epoch 2); pruned and with
# momentum (epoch 3)
@pytest.mark.parametrize("stop_at", [12, 20, 28])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, small_ref, stop_at):
    ref = small_ref
    out = str(tmp_path / "cut")
    assert main(SMALL + ["--out", out, "--max-steps", str(stop_at)]) == 0
    assert not os.path.exists(os.path.join(out, "report.json"))
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["epoch"] == stop_at // 8
    assert json.loads(ck["peer"])["pruned"] == (stop_at > 16)
    assert main(["--out", out, "--resume", "--quiet"]) == 0
    a, b = _final_state(ref), _final_state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _report(ref)["torch_pruning"]["history"] == _report(out)["torch_pruning"]["history"]


# --------------------------------------------------------------------------- without it
def test_without_torch_pruning_exit_2_and_paam_fast_still_imports(tmp_path, capsys,
                                                                  monkeypatch):
    out = str(tmp_path / "run")
    assert main(SMALL + ["--out", out, "--max-steps", "1"]) == 0  # a run to resume below
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning fails
    new = str(tmp_path / "new")
    assert main(SMALL + ["--out", new]) == 2
    assert "--method torch-pruning needs: pip install torch-pruning==1.6.1" in \
        capsys.readouterr().err
    assert not os.path.exists(new)
    assert main(["--out", out, "--resume", "--quiet"]) == 2
    assert "pip install torch-pruning==1.6.1" in capsys.readouterr().err
    code = ("import sys; sys.modules['torch_pruning'] = None; import paam_fast, "
            "paam_fast.train, paam_fast.peers.torch_pruning; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.parametrize("argv,msg", [
    (["--target", "0.5"], "--method torch-pruning prunes to a budget"),
    (["--mass", "0.9"], "--method torch-pruning prunes to a budget"),
    (["--cuda-graphs"], "--method torch-pruning cannot run with --cuda-graphs"),
    (["--select-cost", "params+flops"], "searches its global ratio on params or flops"),
    (["--select-cost", "latency"], "searches its global ratio on params or flops"),
    (["--method", "slim", "--tp-scope", "internal"], "--tp-scope is used only with"),
])
def test_options_it_cannot_honour_exit_2(tmp_path, capsys, argv, msg):
    assert main(["--method", "torch-pruning", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "x")] + argv) == 2
    assert msg in capsys.readouterr().err
