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
