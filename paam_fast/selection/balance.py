"""The joint budget's knapsack greedy: ``cost="params+flops"`` with ``beta`` > 0.

Ranking by value per cost needs one cost per filter, and a joint budget has two.  A filter's
cost is taken as ``a·p/P + (1 − a)·m/M`` (its parameters and MACs as fractions of the budget's
two parts ``P`` and ``M``): ``a`` is the Lagrange weight of the two-constraint knapsack.  At
``a = 1`` the ranking favours filters with few parameters (early, MAC-heavy ones) and the MAC
budget binds with parameters to spare; at ``a = 0`` the reverse.  :func:`balanced_fill`
searches ``a`` by bisection for the selection that uses the most of *both* parts (the largest
smaller fraction), so the network lands at about the same fraction of dense parameters and
dense MACs: the point a uniformly thinned network of that budget sits at.
"""

from __future__ import annotations

from collections.abc import Callable

from .costs import Joint, JointCost, step_delta

# 1/2^12 of the weight's range: finer changes move no filter on the networks we prune
ITERATIONS = 12


def part_step_costs(model: JointCost, units, widths, mult: list[int]) -> list[tuple[float, float]]:
    """Per unit, what one more filter costs in parameters and in MACs at ``widths``."""
    return [tuple(max(float(x), 1e-12) / gm for x in step_delta(model, u, widths, gm).parts)
            for u, gm in zip(units, mult)]


def weighted(parts: list[tuple[float, float]], budget: Joint, a: float) -> list[float]:
    """One cost per filter: parameters and MACs as fractions of the budget, weighed a : 1 − a."""
    bp, bm = (max(float(x), 1.0) for x in budget.parts)
    return [a * p / bp + (1 - a) * m / bm for p, m in parts]


def balanced_fill(fill: Callable[[list[float]], tuple], parts: list[tuple[float, float]],
                  budget: Joint, model: JointCost):
    """``fill(costs)`` runs the budget search with those per-filter costs and returns a tuple
    whose last item is the widths; returns the result of the weight whose widths use the most of
    both parts of ``budget`` (ties: the first found)."""
    bp, bm = (max(float(x), 1.0) for x in budget.parts)
    lo, hi, best, best_score = 0.0, 1.0, None, -1.0
    for _ in range(ITERATIONS):
        a = (lo + hi) / 2
        result = fill(weighted(parts, budget, a))
        used = model.total(result[-1])
        fp, fm = used.parts[0] / bp, used.parts[1] / bm
        if min(fp, fm) > best_score:
            best, best_score = result, min(fp, fm)
        if fp > fm:  # parameters bind first: weigh them more
            lo = a
        else:
            hi = a
    return best
