"""The measured loop over a latency budget (issue 20): select, measure, correct the budget."""

from types import SimpleNamespace

import pytest

from paam_fast.measured_budget import select_measured


def _select(budget):
    return SimpleNamespace(budget=budget)


def test_a_network_measured_over_its_budget_is_selected_again_at_a_smaller_one():
    # the table under-predicts by 20%: a network chosen at budget b measures 1.2 b of dense
    sel, history = select_measured(_select, lambda s: 1.2 * s.budget, keep=0.5, iters=3)
    assert [h["budget"] for h in history] == pytest.approx([0.5, 0.5 / 1.2])
    assert [h["measured"] for h in history] == pytest.approx([0.6, 0.5])
    assert sel.budget == pytest.approx(0.5 / 1.2) and history[-1]["chosen"]


def test_a_network_measured_within_its_budget_is_kept_as_chosen():
    sel, history = select_measured(_select, lambda s: 0.8 * s.budget, keep=0.5)
    assert sel.budget == 0.5 and len(history) == 1  # under the budget: the table's choice stands


def test_when_no_budget_meets_it_the_fastest_measured_is_returned_and_said():
    ratios = iter([0.9, 0.7, 0.8, 0.75])
    sel, history = select_measured(_select, lambda s: next(ratios), keep=0.5, iters=3)
    assert len(history) == 4 and not any(h["within"] for h in history)
    assert sel.budget == history[1]["budget"] and history[1]["chosen"]


def test_an_unreachable_smaller_budget_ends_the_loop():
    def select(budget):
        if budget < 0.45:
            raise ValueError("below what this model can remove")
        return _select(budget)

    sel, history = select_measured(select, lambda s: 1.5 * s.budget, keep=0.5, iters=3)
    assert sel.budget == 0.5 and "below" in history[-1]["error"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="keep"):
        select_measured(_select, lambda s: 0.5, keep=0)
    with pytest.raises(ValueError, match="iters"):
        select_measured(_select, lambda s: 0.5, keep=0.5, iters=-1)


@pytest.mark.parametrize("after_select", ["compact", "masked"])
def test_the_pruner_makes_its_last_cut_again_until_it_measures_within_keep(after_select):
    import torch

    import paam_fast as pf
    from paam_fast.latency import latency_table, predict_ms
    from paam_fast.paamify import controller
    from paam_fast.pruner import Pruner

    model = pf.paamify(pf.models.get_model("resnet20"))
    # a made-up device: a layer's ms grows with both its widths
    table = latency_table(model, batch=8, grid=4, timer=lambda op, i, o: 1e-3 * (i * o + o))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 32, 32))  # the scores the selection ranks by
    measured = []

    def measure(m):  # this "device" runs every network 25% slower, relative to dense, than
        r = 1.25 * predict_ms(m, table) / table.dense_ms  # the table says
        measured.append(r)
        return r

    pr = Pruner(model, opt, epochs=4, keep=0.6, select_cost="latency", latency=table,
                select_epoch=1, final_epoch=3, after_select=after_select, steps=2,
                measure=measure, verify_iters=3)
    events = [e for ep in range(4) for e in pr.epoch_end(ep) if e["event"] == "select"]
    tries = events[-1]["measured_budget"]
    assert all("measured_budget" not in e for e in events[:-1])  # only the last cut
    assert tries[0]["budget"] == 0.6 and tries[0]["measured"] > 0.6 * 1.02
    chosen = next(h for h in tries if h["chosen"])
    assert chosen["within"] and chosen is tries[-1]
    assert len(measured) == len(tries)
    # the network kept (compacted at the end) is the chosen try's
    assert controller(model).compacted
    assert 1.25 * predict_ms(model, table) / table.dense_ms == pytest.approx(chosen["measured"])
    with pytest.raises(ValueError, match="verify_iters"):
        Pruner(pf.paamify(pf.models.get_model("resnet20")), opt, epochs=4, keep=0.6,
               measure=measure, verify_iters=1)


def test_when_an_earlier_cut_measured_fastest_the_pruner_applies_it_again():
    import torch

    import paam_fast as pf
    from paam_fast.latency import latency_table, predict_ms
    from paam_fast.pruner import Pruner

    model = pf.paamify(pf.models.get_model("resnet20"))
    table = latency_table(model, batch=8, grid=4, timer=lambda op, i, o: 1e-3 * (i * o + o))
    model(torch.randn(2, 3, 32, 32))
    readings = iter([0.9, 0.7, 0.8, 0.75])  # a noisy device: never within 0.6, fastest second
    predicted = []

    def measure(m):
        predicted.append(predict_ms(m, table))
        return next(readings)

    pr = Pruner(model, torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, keep=0.6,
                select_cost="latency", latency=table, select_epoch=1, measure=measure,
                verify_iters=3)
    events = [e for ep in range(2) for e in pr.epoch_end(ep) if e["event"] == "select"]
    tries = events[-1]["measured_budget"]
    assert [h["chosen"] for h in tries] == [False, True, False, False]
    assert predict_ms(model, table) == pytest.approx(predicted[1])  # the second cut's network
    assert len(set(round(p, 9) for p in predicted)) > 1
