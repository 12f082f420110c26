"""The Taylor selection key: |g·∂L/∂g| against a float64 finite difference, the model left as it
was, select()/Pruner/CLI plumbing (with a params+flops budget), and forks of runs made before
the option existed."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import paam_fast as pf
from paam_fast import Pruner
from paam_fast.paamify import controller
from paam_fast.selection.taylor import taylor_importance
from paam_fast.train import main


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = pf.paamify(pf.models.resnet20(), input_size=(1, 3, 32, 32)).to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    model(x)  # first forward: gates
    return model


def _batches(n, dtype=torch.float64, size=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g, dtype=dtype),
             torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _loss_with_filter_scaled(model, unit, f, eps, x, y):
    """The task loss with filter f of ``unit`` multiplied by (1 + eps) at its gate sites: the
    gate g_f → g_f·(1 + eps), done outside the library's own gating."""
    ctrl = controller(model)
    hooks = []
    for name in unit.sites:
        def scale(_m, _i, out):
            out = out.clone()
            out[:, f] *= 1 + eps
            return out
        hooks.append(ctrl._mods[name].register_forward_hook(scale))
    try:
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()
    finally:
        for h in hooks:
            h.remove()


def test_importance_is_the_first_order_change_of_the_loss_float64():
    model = _model()
    ctrl = controller(model)
    (x, y), = _batches(1)
    imp = taylor_importance(model, [(x, y)])
    assert [v.shape[0] for v in imp] == [u.width for u in ctrl.units]
    model.train()
    eps = 1e-7  # small: ReLU kinks within ±1e-5 moved the difference by 4e-4 relative
    for i in (0, len(ctrl.units) // 2, len(ctrl.units) - 1):  # one unit per stage
        u = ctrl.units[i]
        for f in (0, u.width - 1):
            up = _loss_with_filter_scaled(model, u, f, eps, x, y)
            down = _loss_with_filter_scaled(model, u, f, -eps, x, y)
            fd = abs(up - down) / (2 * eps)  # d L / d eps at 0 = g_f · ∂L/∂g_f
            assert float(imp[i][f]) == pytest.approx(fd, rel=1e-5, abs=1e-9), (u.name, f)


def test_the_mean_over_batches_and_dead_filters_are_zero():
    model = _model()
    ctrl = controller(model)
    b = _batches(2)
    one = [taylor_importance(model, [bt]) for bt in b]
    both = taylor_importance(model, b)
    for i in range(len(ctrl.units)):
        torch.testing.assert_close(both[i], (one[0][i] + one[1][i]) / 2)
    alive = {u.name: torch.ones(u.width, dtype=torch.bool) for u in ctrl.units}
    alive[ctrl.units[3].name][:5] = False
    pf.apply_masks(model, alive)
    masked = taylor_importance(model, b[:1])
    assert (masked[3][:5] == 0).all() and (masked[3][5:] > 0).any()


def test_the_model_is_left_as_it_was():
    model = _model(torch.float32)
    ctrl = controller(model)
    model.eval()
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.5) if "conv" in n else None
        grads[n] = None if p.grad is None else p.grad.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    last = ctrl._last.value
    taylor_importance(model, _batches(2, torch.float32))
    assert not model.training
    assert ctrl._last.value is last
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BN running statistics included
    for n, p in model.named_parameters():
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n]), n


def test_select_ranks_the_measured_values_and_refuses_without_them():
    model = _model(torch.float32)
    ctrl = controller(model)
    with pytest.raises(ValueError, match="importance="):
        pf.select(model, keep=0.5, key="taylor")
    with pytest.raises(ValueError, match="only used by a measured key"):
        pf.select(model, keep=0.5, importance=[torch.ones(u.width) for u in ctrl.units])
    # the last unit's filters matter most, the rest equally little: it is kept whole
    imp = [torch.full((u.width,), 1e-3) for u in ctrl.units]
    imp[-1] = torch.linspace(1.0, 2.0, ctrl.units[-1].width)
    imp[0][3] = 5.0  # and the one filter that matters most in the first unit
    sel = pf.select(model, keep=0.5, key="taylor", importance=imp)
    assert bool(sel.alive[ctrl.units[-1].name].all())
    assert bool(sel.alive[ctrl.units[0].name][3])
    assert sel.params <= 0.5 * sel.dense_params


def test_pruner_measures_at_the_selection_and_refuses_mass_mode():
    model = _model(torch.float32)
    calls = []

    def measure():
        calls.append(1)
        return taylor_importance(model, _batches(1, torch.float32))

    with pytest.raises(ValueError, match="needs importance="):
        Pruner(model, None, epochs=2, keep=0.5, select_key="taylor")
    with pytest.raises(ValueError, match="needs a budget"):
        Pruner(model, None, epochs=2, mass=0.9, select_key="taylor", importance=measure)
    p = Pruner(model, None, epochs=2, keep=0.5, select_epoch=1, select_key="taylor",
               importance=measure)
    events = p.epoch_end(0)
    assert calls == [1] and [e["event"] for e in events] == ["select", "compact"]


def _report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_paam_train_taylor_key_fork_and_refusals(tmp_path, capsys):
    common = ["--epochs", "2", "--select-epoch", "1", "--subset", "256", "--batch-size", "64",
              "--keep", "0.5", "--quiet", "--bn-reestimate", "2"]
    src = str(tmp_path / "src")
    assert main(common + ["--out", src]) == 0
    # a source written before --taylor-batches and --select-key taylor existed: its config
    # lacks the new options, which count as their defaults
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("taylor_batches")
    json.dump(cfg, open(cfg_path, "w"))
    fk = str(tmp_path / "taylor")
    assert main(common + ["--fork-from", src, "--select-key", "taylor", "--taylor-batches", "2",
                          "--out", fk]) == 0
    rep_src, rep = _report(src), _report(fk)
    assert rep["params_final"] <= 0.5 * rep["params_dense"]
    widths = lambda r: [x["filters_final"] for x in r["per_layer"]]  # noqa: E731
    assert widths(rep) != widths(rep_src)  # another key, another allocation
    # at most half of dense in parameters and in MACs at once
    both = str(tmp_path / "both")
    assert main(common + ["--fork-from", src, "--select-key", "taylor", "--taylor-batches", "2",
                          "--select-cost", "params+flops", "--out", both]) == 0
    rep = _report(both)
    assert rep["params_final"] <= 0.5 * rep["params_dense"]
    assert rep["flops_final"] <= 0.5 * rep["flops_dense"]
    # a MAC budget alone defaults to value per MAC: the Taylor key over each filter's MACs
    macs = str(tmp_path / "macs")
    assert main(common + ["--fork-from", src, "--taylor-batches", "2", "--select-cost", "flops",
                          "--out", macs]) == 0
    rep = _report(macs)
    assert (rep["config"]["select_key"], rep["config"]["select_beta"]) == ("taylor", 1.0)
    assert rep["flops_final"] <= 0.5 * rep["flops_dense"]
    for argv, msg in ((["--method", "slim", "--select-key", "taylor"], "has no such gates"),
                      (["--select-key", "taylor", "--mass", "0.9"], "needs a budget"),
                      (["--taylor-batches", "0"], "--taylor-batches must be")):
        assert main(["--epochs", "1", "--out", str(tmp_path / "bad")] + argv) == 2
        assert msg in capsys.readouterr().err
