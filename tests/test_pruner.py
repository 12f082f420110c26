"""pf.Pruner driving real (tiny) training loops."""

import pytest
import torch
import torch.nn.functional as F

import paam_fast as pf


def _run(after_select, epochs=3, **kw):
    torch.manual_seed(0)
    model = pf.paamify(pf.models.get_model("resnet20"))
    opt = torch.optim.SGD(pf.param_groups(model), lr=0.05, momentum=0.9)
    pruner = pf.Pruner(model, opt, epochs=epochs, lam=1.0, after_select=after_select, **kw)
    log = []
    for epoch in range(epochs):
        for _ in range(2):
            x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
            loss = F.cross_entropy(model(x), y) + pruner.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        log.append(pruner.epoch_end(epoch))
    return model, opt, pruner, log


def test_pruner_selects_and_compacts_at_the_selection_epoch():
    model, opt, pruner, log = _run("compact", keep=0.6, select_epoch=2)
    assert log[0] == []
    kinds = [e["event"] for e in log[1]]
    assert kinds == ["select", "compact"]
    assert log[1][0]["params"] <= 0.6 * 269_722
    assert log[2] == []
    assert model.paam.compacted and not pruner.active
    assert pf.count(model, (1, 3, 32, 32))["params"] == log[1][0]["params"]
    assert float(pruner.penalty()) == 0.0


def test_pruner_masked_mode_reaches_the_budget_in_steps_then_compacts():
    model, opt, pruner, log = _run("masked", epochs=6, keep=0.5, select_epoch=2,
                                   final_epoch=5, steps=3)
    sel = [e for evs in log for e in evs if e["event"] == "select"]
    assert [e["epoch"] for e in sel] == [1, 2, 3]
    params = [e["params"] for e in sel]
    assert params[0] > params[1] > params[2] and params[2] <= 0.5 * 269_722
    compacts = [e for evs in log for e in evs if e["event"] == "compact"]
    assert len(compacts) == 1 and compacts[0]["epoch"] == 4
    assert pf.count(model, (1, 3, 32, 32))["params"] == params[2]


def test_masked_steps_with_uniform_allocation_end_at_uniform_widths():
    """select_allocation="uniform" in masked mode: each step keeps the same fraction of every
    unit (by the unit's own key), dead filters stay dead, and the last step lands on the widths
    a one-shot uniform cut gives."""
    from paam_fast.selection import uniform_alive

    model, opt, pruner, log = _run("masked", epochs=6, keep=0.3, select_epoch=2,
                                   final_epoch=5, steps=3, select_allocation="uniform")
    sel = [e for evs in log for e in evs if e["event"] == "select"]
    assert len(sel) == 3 and sel[0]["params"] > sel[1]["params"] > sel[2]["params"]
    ctrl = model.paam
    want = uniform_alive(ctrl.units, ctrl.structure, 0.3)
    assert {u.name: len(ctrl.kept[u.id]) for u in ctrl.units} == \
        {name: int(m.sum()) for name, m in want.items()}


def test_pruner_target_adjusts_lambda():
    model, opt, pruner, log = _run("compact", epochs=4, target=0.5, select_epoch=3)
    lam = [e for evs in log for e in evs if e["event"] == "lambda"]
    assert len(lam) == 2
    # at start almost everything is kept by mass selection, so λ must grow
    assert lam[0]["kept_fraction_mass"] > 0.5 and lam[0]["lam"] > lam[0]["lam_before"]


def test_pruner_rejects_bad_settings():
    model = pf.paamify(pf.models.get_model("resnet20"))
    with pytest.raises(ValueError, match="at most one"):
        pf.Pruner(model, None, epochs=10, keep=0.5, mass=0.9)
    with pytest.raises(ValueError, match="after_select"):
        pf.Pruner(model, None, epochs=10, after_select="later")
    with pytest.raises(ValueError, match="select_epoch"):
        pf.Pruner(model, None, epochs=10, select_epoch=11)
    with pytest.raises(ValueError, match="give keep="):
        pf.Pruner(model, None, epochs=10, target=0.3, select_cost="params+flops", select_beta=1)


def test_param_groups_score_lr():
    model = pf.paamify(pf.models.resnet20())
    net, paam = pf.param_groups(model, weight_decay=5e-4, score_lr=0.01)
    assert paam["lr"] == 0.01 and paam["weight_decay"] == 0.0 and "lr" not in net
    opt = torch.optim.SGD([net, paam], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.005]  # one schedule, two bases
    del sched
    for bad in (0, -1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="score_lr"):
            pf.param_groups(model, score_lr=bad)
