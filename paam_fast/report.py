"""Per-layer report: name, filters before/after, params and FLOPs now (as text and as a dict)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .paamify import controller

__all__ = ["Report", "report"]


@dataclass(frozen=True)
class Report:
    """Rows of {name, kind, filters_dense, filters_final, params, flops, gated} plus totals."""

    rows: list[dict]
    params_dense: int
    params_final: int
    flops_dense: int
    flops_final: int
    input_size: tuple[int, ...]
    ungated: list[tuple[str, str]]

    def to_dict(self) -> dict:
        return {"per_layer": self.rows, "params_dense": self.params_dense,
                "params_final": self.params_final, "flops_dense": self.flops_dense,
                "flops_final": self.flops_final, "input_size": list(self.input_size),
                "ungated": [list(u) for u in self.ungated]}

    def __str__(self) -> str:
        w = max([len(r["name"]) for r in self.rows] + [5])
        lines = [f"{'layer':<{w}}  {'filters':>13}  {'params':>11}  {'MACs':>14}  gated"]
        for r in self.rows:
            f = f"{r['filters_dense']:>5} -> {r['filters_final']:<5}"
            lines.append(f"{r['name']:<{w}}  {f:>13}  {r['params']:>11,}  {r['flops']:>14,}  "
                         f"{'yes' if r['gated'] else ''}")
        pp = self.params_final / max(self.params_dense, 1)
        ff = self.flops_final / max(self.flops_dense, 1)
        lines.append(f"params {self.params_dense:,} -> {self.params_final:,} ({pp:.1%}); "
                     f"MACs at {tuple(self.input_size)} {self.flops_dense:,} -> "
                     f"{self.flops_final:,} ({ff:.1%})")
        return "\n".join(lines)


def report(model: nn.Module) -> Report:
    """The per-layer report of a paamified model at its current widths (alive filters count as
    kept before compaction)."""
    ctrl = controller(model)
    st = ctrl.structure
    w = ctrl.widths()
    gated = {u.id for u in ctrl.units}
    rows = []
    for c in st.costs:
        if c.kind not in ("conv", "dwconv", "linear"):
            continue
        rows.append({"name": c.name, "kind": c.kind, "filters_dense": c.out_dense,
                     "filters_final": w.get(c.out_space, c.out_dense) if c.out_space is not None
                     else c.out_dense,
                     "params": c.params(w), "flops": c.macs(w), "gated": c.out_space in gated})
    return Report(rows=rows, params_dense=st.params(), params_final=st.params(w),
                  flops_dense=st.macs(), flops_final=st.macs(w), input_size=st.input_size,
                  ungated=list(st.ungated))
