"""The selection's parts: keys, cost exponent, uniform allocation, budgets held exactly."""

import pytest
import torch

import paam_fast as pf
from paam_fast.paamify import controller
from paam_fast.selection import choose, uniform_alive
from paam_fast.selection.costs import cost_model, step_costs
from paam_fast.selection.keys import rank_values


def _resnet20():
    model = pf.paamify(pf.models.get_model("resnet20"))
    ctrl = controller(model)
    gen = torch.Generator().manual_seed(0)
    gates = [torch.rand(u.width, generator=gen) * 0.9 + 0.05 for u in ctrl.units]
    alive = [torch.ones(u.width, dtype=torch.bool) for u in ctrl.units]
    return ctrl, gates, alive


def test_unit_mean_key_divides_by_the_mean_of_the_alive_filters():
    g = torch.tensor([0.2, 0.4, 0.6, 5.0])
    alive = torch.tensor([True, True, True, False])
    (v,) = rank_values("unit_mean", [g], [alive])
    assert torch.allclose(v[:3], g[:3] / 0.4)


def test_unit_mean_keeps_units_of_equal_spread_alike_whatever_their_height():
    # every unit's gates are one shape scaled by a unit-specific height (what g = s / max s
    # gives units whose top filter sticks out by different amounts): the gate key cuts the
    # low units to the floor, unit_mean keeps the same share of every stage's units
    ctrl, _, alive = _resnet20()
    gen = torch.Generator().manual_seed(1)
    heights = torch.rand(len(ctrl.units), generator=gen) * 0.8 + 0.1
    gates = [h * torch.linspace(0.5, 1.0, u.width) for h, u in zip(heights, ctrl.units)]
    kw = dict(keep=0.5, min_keep=0.05)
    by_gate = choose(ctrl.units, gates, alive, ctrl.structure, ctrl.widths(), **kw)
    by_mean = choose(ctrl.units, gates, alive, ctrl.structure, ctrl.widths(), key="unit_mean",
                     **kw)
    frac = lambda s: [s.widths[u.name] / u.width for u in ctrl.units]  # noqa: E731
    spread = lambda xs: max(xs) - min(xs)  # noqa: E731
    assert spread(frac(by_mean)) < 0.35 < spread(frac(by_gate))
    assert by_mean.params <= by_mean.budget and by_gate.params <= by_gate.budget


@pytest.mark.parametrize("cost", ["params", "flops"])
def test_beta_one_ranks_by_value_per_cost(cost):
    # equal gates everywhere: with beta = 1 the cheapest filters (per unit of the budget) win
    ctrl, _, alive = _resnet20()
    gates = [torch.full((u.width,), 0.5) for u in ctrl.units]
    sel = choose(ctrl.units, gates, alive, ctrl.structure, ctrl.widths(), keep=0.3, cost=cost,
                 beta=1.0)
    model = cost_model(ctrl.structure, cost)
    per_filter = step_costs(model, ctrl.units, ctrl.widths(), [1] * len(ctrl.units))
    cheapest = min(range(len(ctrl.units)), key=lambda i: per_filter[i])
    dearest = max(range(len(ctrl.units)), key=lambda i: per_filter[i])
    u_c, u_d = ctrl.units[cheapest], ctrl.units[dearest]
    assert sel.widths[u_c.name] / u_c.width > sel.widths[u_d.name] / u_d.width
    assert (sel.params if cost == "params" else sel.flops) <= sel.budget


@pytest.mark.parametrize("key,beta", [("gate", 0.0), ("gate", 1.0), ("unit_mean", 0.5)])
@pytest.mark.parametrize("cost", ["params", "flops"])
def test_every_key_holds_the_budget_within_one_filter(key, beta, cost):
    ctrl, gates, alive = _resnet20()
    sel = choose(ctrl.units, gates, alive, ctrl.structure, ctrl.widths(), keep=0.4, cost=cost,
                 key=key, beta=beta)
    got = sel.params if cost == "params" else sel.flops
    dense = sel.dense_params if cost == "params" else sel.dense_flops
    assert got <= sel.budget
    biggest = max(step_costs(cost_model(ctrl.structure, cost), ctrl.units, ctrl.widths(),
                             [1] * len(ctrl.units)))
    assert got > sel.budget - 2 * biggest - 0.01 * dense  # no budget left on the table


def test_uniform_allocation_has_uniform_widths_and_each_units_best_filters():
    ctrl, gates, alive = _resnet20()
    sel = choose(ctrl.units, gates, alive, ctrl.structure, ctrl.widths(), keep=0.3,
                 allocation="uniform")
    uni = uniform_alive(ctrl.units, ctrl.structure, 0.3)
    for u, g in zip(ctrl.units, gates):
        m = sel.alive[u.name]
        assert int(m.sum()) == int(uni[u.name].sum())
        assert g[m].min() >= g[~m].max() if (~m).any() else True
    with pytest.raises(ValueError, match="needs a budget"):
        choose(ctrl.units, gates, alive, ctrl.structure, ctrl.widths(), mass=0.9,
               allocation="uniform")


@pytest.mark.parametrize("kw,msg", [({"key": "taylor2"}, "selection key"),
                                    ({"beta": -1.0}, "beta"),
                                    ({"allocation": "local"}, "allocation"),
                                    ({"cost": "latency2"}, "selection cost")])
def test_bad_selection_options(kw, msg):
    ctrl, gates, alive = _resnet20()
    with pytest.raises(ValueError, match=msg):
        choose(ctrl.units, gates, alive, ctrl.structure, ctrl.widths(), keep=0.5, **kw)


def test_random_widths_fit_the_budget_differ_by_seed_and_repeat_per_seed():
    ctrl, _, _ = _resnet20()
    from paam_fast.selection import random_alive

    def widths(seed):
        alive = random_alive(ctrl.units, ctrl.structure, 0.3, seed=seed)
        return {n: int(m.sum()) for n, m in alive.items()}

    budget = 0.3 * ctrl.structure.params()
    seen = set()
    for seed in range(5):
        w = widths(seed)
        assert w == widths(seed) and min(w.values()) >= 1
        full = dict(ctrl.widths())
        full.update({u.id: w[u.name] for u in ctrl.units})
        assert budget * 0.9 <= ctrl.structure.params(full) <= budget
        seen.add(tuple(w.values()))
    assert len(seen) == 5


# --------------------------------------------------------------------------- params+flops
def _resnet20_units(seed=0):
    import paam_fast as pf
    from paam_fast.paamify import controller

    model = pf.paamify(pf.models.resnet20(), input_size=(1, 3, 32, 32))
    ctrl = controller(model)
    g = torch.Generator().manual_seed(seed)
    # gates that favour the early, MAC-heavy stages (what the default key does)
    gates = [torch.rand(u.width, generator=g) * (1.0 if u.width == 16 else 0.3)
             for u in ctrl.units]
    alive = [torch.ones(u.width, dtype=torch.bool) for u in ctrl.units]
    return ctrl, gates, alive


def test_a_joint_budget_holds_params_and_macs_and_binds_one_of_them():
    ctrl, gates, alive = _resnet20_units()
    st = ctrl.structure
    kw = dict(keep=0.3, round_to=1)
    by_params = choose(ctrl.units, gates, alive, st, ctrl.widths(), cost="params", **kw)
    both = choose(ctrl.units, gates, alive, st, ctrl.widths(), cost="params+flops", **kw)
    assert by_params.flops > 0.3 * by_params.dense_flops  # a params budget buys MACs here
    assert both.params <= 0.3 * both.dense_params and both.flops <= 0.3 * both.dense_flops
    assert both.budget == {"params": int(0.3 * both.dense_params),
                           "flops": int(0.3 * both.dense_flops)}
    # greedy in the same order: the joint selection is a prefix of the params one, stopped
    # where the MACs budget binds (within one filter's MACs of it)
    for name, a in both.alive.items():
        assert bool((a <= by_params.alive[name]).all())
    assert both.flops > 0.3 * both.dense_flops - 300_000  # a stage-1 filter: ≤ 295k MACs
    with pytest.raises(ValueError, match="give keep="):
        choose(ctrl.units, gates, alive, st, ctrl.widths(), cost="params+flops", beta=1,
               mass=0.9)


@pytest.mark.parametrize("key", ["gate", "unit_mean"])
def test_joint_budget_with_beta_spends_both_parts(key):
    # gates that favour the MAC-heavy stage: beta = 0 stops where MACs bind, far below the
    # parameter budget; beta = 1 weighs the two so that both end within a few % of it
    ctrl, gates, alive = _resnet20_units()
    st = ctrl.structure
    kw = dict(keep=0.3, round_to=1, cost="params+flops", key=key)
    plain = choose(ctrl.units, gates, alive, st, ctrl.widths(), **kw)
    both = choose(ctrl.units, gates, alive, st, ctrl.widths(), beta=1.0, **kw)
    fp, fm = both.params / both.dense_params, both.flops / both.dense_flops
    assert fp <= 0.3 and fm <= 0.3
    assert min(fp, fm) > 0.28, (fp, fm)
    if key == "gate":  # the gate key's plain ranking left parameters unspent
        assert plain.params / plain.dense_params < 0.25 < fp


def test_joint_beta_weight_goes_where_the_parts_balance():
    from paam_fast.selection.balance import balanced_fill
    from paam_fast.selection.costs import Joint

    class Model:  # "widths" here are the (params, MACs) used
        def total(self, w):
            return Joint((w[0], w[1]))

    seen = []

    def fill(costs):
        a = costs[0]
        seen.append(a)
        return ({0: 100 * min(1.0, 1.3 - a), 1: 100 * min(1.0, 0.7 + a)},)

    # weighing parameters more (larger a) spends fewer of them: the parts meet at a = 0.3
    # (one filter costing 100 params of a 100-param budget, no MACs: its weighted cost is a)
    res = balanced_fill(fill, [(100.0, 0.0)], Joint((100, 100)), Model())
    assert min(res[-1].values()) > 99.9  # both parts spent
    assert seen[0] == 0.5 and abs(seen[-1] - 0.3) < 1e-3


def test_uniform_widths_under_a_joint_budget_hold_both():
    from paam_fast.selection.uniform import uniform_widths

    ctrl, _, _ = _resnet20_units()
    st = ctrl.structure
    w = uniform_widths(ctrl.units, st, 0.3, "params+flops")
    assert st.params(w) <= 0.3 * st.params(st.widths())
    assert st.macs(w) <= 0.3 * st.macs(st.widths())
    assert w == uniform_widths(ctrl.units, st, 0.3, "params") or \
        w == uniform_widths(ctrl.units, st, 0.3, "flops")
