"""The searches of the global selection (PAAM_METHOD.md §6.2).

Both work on steps (see :mod:`.groups`): ``counts[i]`` steps of unit i, ``width(i, c)`` the
physical width of c steps (``round_to`` applied), ``floors[i]`` the fewest steps a unit keeps.
"""

from __future__ import annotations

import torch


def fill_budget(units, values: list[torch.Tensor], rank: list[torch.Tensor], floors: list[int],
                width, model, budget: int | float, w: dict[int, int]) -> list[int]:
    """Budget mode: every unit starts at its floor; then steps are added in descending value,
    each only if the model's cost, recounted exactly around that unit, stays within
    ``budget``.  A unit's next step is its best remaining one, so once a unit's step does not
    fit, its later steps are skipped (they would not be its best).  ``w`` (widths, updated in
    place) must hold the units at their floors and every other space at its width."""
    count = list(floors)
    total = model.total(w)
    local = [model.local(u.id) for u in units]
    cand = [(float(values[i][j]), i, r) for i in range(len(units))
            for r, j in enumerate(rank[i].tolist()) if r >= floors[i]]
    cand.sort(key=lambda t: -t[0])  # stable: ties keep unit order, then rank in unit
    for _, i, r in cand:
        if r != count[i]:  # an earlier, better step of this unit did not fit
            continue
        sid = units[i].id
        new = width(i, count[i] + 1)
        if new != w[sid]:  # round_to: most steps change nothing until the next multiple
            before = local[i](w)
            old, w[sid] = w[sid], new
            delta = local[i](w) - before
            if total + delta > budget:
                w[sid] = old
                break
            total += delta
        count[i] += 1
    return count


def mass_counts(values: list[torch.Tensor], alive: list[torch.Tensor], mult: list[int],
                floors: list[int], mass: float) -> list[int]:
    """Mass mode: the shortest prefix of all alive steps, by descending value, whose values
    (a grouped unit's step weighing as its G filters) sum to ``mass`` of the total."""
    n_alive = [int(a.sum()) for a in alive]
    vals = torch.cat([v[a].double() for v, a in zip(values, alive)])
    weight = torch.cat([torch.full((n,), float(gm), dtype=torch.float64)
                        for n, gm in zip(n_alive, mult)])
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(n_alive)])
    srt, perm = torch.sort(vals, descending=True, stable=True)
    csum = torch.cumsum(srt * weight[perm], 0)
    n_keep = int(torch.searchsorted(csum, mass * float(csum[-1]) * (1 - 1e-12)).item()) + 1
    n_keep = min(n_keep, int(vals.numel()))
    counts = torch.bincount(owner[perm[:n_keep]], minlength=len(values)).tolist()
    return [max(c, f) for c, f in zip(counts, floors)]
