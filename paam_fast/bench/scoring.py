"""Scoring forward+backward for every gated unit of a model, gated BN affines included
(γ' = g·γ, β' = g·β at every site, and their gradients back to γ, β): one chain per unit (plain
PyTorch, each unit with its own parameters) vs the batched reference (units of equal (F, D) share
one batched chain, one flat fold) vs the fused Triton kernels (GPU).  Counts ATen ops and GPU
kernels and times them.

    python -m paam_fast.bench.scoring --arch resnet50 [--size 224]
    pytest benchmarks/                         # the pytest-benchmark cases
"""

from __future__ import annotations

import argparse

import torch

import paam_fast as pf
from paam_fast.scoring import score_unit

from .harness import count_ops, env_var, timeit, write_json


def setup(arch: str, size: int, device: str = "cpu"):
    model = pf.paamify(pf.models.get_model(arch), input_size=(1, 3, size, size)).to(device)
    ctrl = model.paam
    with torch.no_grad():
        for g in ctrl.groups:
            g.w.normal_()
            g.b.normal_(0, 0.3)
    # one chain per unit: separate leaf parameters, as a per-layer implementation would hold
    per_unit = []
    for grp, idx in zip(ctrl.groups, ctrl.group_units):
        for row, i in enumerate(idx):
            ps = [t[row].detach().clone().requires_grad_(True)
                  for t in (grp.wq, grp.wk, grp.wv, grp.w, grp.b)]
            per_unit.append((i, ps))

    sites = {i: [ctrl._mods[n] for n in u.sites if n in ctrl._fold_sites]
             for i, u in enumerate(ctrl.units)}
    affine = [p for ms in sites.values() for m in ms for p in (m.weight, m.bias)]

    def batched():
        ctrl.refresh()
        total = sum(g.sum() for g in ctrl._last.value)
        for n in ctrl._fold_sites:
            w, b = ctrl._mods[n]._paam_fold.value
            total = total + w.sum() + b.sum()
        total.backward()
        for p in [*ctrl.parameters(), *affine]:  # dropped, not zeroed: no extra launches
            p.grad = None

    def chains():
        total = 0
        for i, ps in per_unit:
            g = score_unit(ctrl.tokens(i), *ps, None, ctrl.leak, ctrl.normalize)
            total = total + g.sum()
            for m in sites[i]:
                total = total + (g * m.weight).sum() + (g * m.bias).sum()
        total.backward()
        for p in [*(p for _, ps in per_unit for p in ps), *affine]:
            p.grad = None

    return model, batched, chains


def _with_env(key, value, fn):
    """fn, called with the environment variable ``key`` set to ``value``."""
    def call():
        with env_var(key, value):
            return fn()
    return call


def run(arch: str, size: int, reps: int) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, batched, chains = setup(arch, size, dev)
    res = {"arch": arch, "units": len(model.paam.units), "shape_groups": len(model.paam.groups),
           "dtype": "float32", "device_kind": dev}
    variants = [("per_unit_chains", chains),
                ("batched_reference", _with_env("PAAM_FAST_BACKEND", "reference", batched))]
    if dev == "cuda":
        triton = _with_env("PAAM_FAST_BACKEND", "triton", batched)
        variants.append(("triton", triton))
        variants.append(("triton_tf32", _with_env("PAAM_FAST_TRITON_DOT", "tf32", triton)))
    for name, fn in variants:
        res[name] = {**count_ops(fn), "eager": timeit(fn, reps=reps)}
        if dev == "cuda":  # the whole forward+backward replayed as one CUDA graph
            from .train_step import graphed

            res[name]["graphed"] = timeit(graphed(fn), reps=reps, cudagraph=False)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    r = run(args.arch, args.size, args.reps)
    print(f"{args.arch}: {r['units']} gated units in {r['shape_groups']} (F, D) groups")
    for k in ("per_unit_chains", "batched_reference", "triton", "triton_tf32"):
        if k not in r:
            continue
        v = r[k]
        line = (f"  {k:<18} {v['aten_ops']:>6} ATen ops {v['gpu_kernels']:>5} GPU kernels  eager "
                f"{v['eager']['median_ms']:8.3f} ms")
        if "graphed" in v:
            line += f"  graphed {v['graphed']['median_ms']:8.3f} ms"
        print(line)
    print("wrote", write_json(f"scoring_{args.arch}", r))
    return r


if __name__ == "__main__":
    main()
