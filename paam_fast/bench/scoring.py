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
import json

import torch

import paam_fast as pf
from paam_fast.scoring import score_unit

from .harness import count_ops, env_var, timeit, write_json


def setup(arch: str, size: int, device: str = "cpu", coupling: str = "internal",
          dtype: torch.dtype = torch.float32):
    model = pf.paamify(pf.models.get_model(arch), coupling=coupling,
                       input_size=(1, 3, size, size)).to(device=device, dtype=dtype)
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


# What the prediction assumes of the H200 (GH100, 132 SMs): dense tensor-core peaks of
# 495 TFLOP/s TF32 and 990 TFLOP/s bf16, of which the kernels' mma.sync on 32-row tiles (too
# small for wgmma) are assumed to reach a third; 4.8 TB/s of HBM3e at 75%; 16 exp/clock/SM at
# 1.98 GHz; ~3 µs per launch inside a CUDA graph (launch, ramp-up and tail of a short kernel).
H200 = {"tf32_flops": 495e12 / 3, "bf16_flops": 990e12 / 3, "bytes": 4.8e12 * 0.75,
        "exps": 16 * 132 * 1.98e9, "launch": 3e-6}


def predict(model, dtype: str = "float32", d: int | None = None) -> dict:
    """The predicted time of one scoring forward+backward (graphed) of every unit of a
    paamified ``model`` on the H200, from its unit table's FLOP and byte counts (see
    kernels/scoring.py for the algebra: V is never formed, z = X·Wv·w is a vector).

    Per unit with F filters of D values: projections 4·F·D·d FLOP forward (Q, K) and
    4·F·D·d backward (dWq, dWk); attention 2·F²·d forward (S) and 8·F²·d backward (S twice,
    dQ, dK); 3·F² exps.  fp32 models run tf32x3 (three TF32 products per dot), bf16 one bf16
    product.  Bytes: the tokens (the model's conv weights) are written once by the cat and read
    by it, by proj_fwd and by proj_bwd."""
    ctrl = model.paam
    d = d or ctrl.dim
    units = [(u.width, ctrl._token_dim(u)) for u in ctrl.units]
    esize = 2 if dtype == "bfloat16" else 4
    proj = sum(8 * f * x * d for f, x in units)
    attn = sum(10 * f * f * d for f, _ in units)
    exps = sum(3 * f * f for f, _ in units)
    tok_bytes = sum(f * x for f, x in units) * esize
    rate = H200["bf16_flops"] if dtype == "bfloat16" else H200["tf32_flops"] / 3
    t_proj = max(proj / rate, 3 * tok_bytes / H200["bytes"])  # proj_fwd, proj_bwd (+ cat read)
    t_cat = tok_bytes / H200["bytes"]  # the cat's write
    t_attn = attn / rate + exps / H200["exps"]
    launches = 10  # 2 cats + 3 kernels forward, 4 kernels + 1 cat backward
    total = t_proj + t_cat + t_attn + launches * H200["launch"]
    return {"proj_gflop": proj / 1e9, "attn_gflop": attn / 1e9, "exps_m": exps / 1e6,
            "token_mb": tok_bytes / 1e6, "predicted_ms": total * 1e3,
            "predicted_parts_ms": {"projections": t_proj * 1e3, "token_cat": t_cat * 1e3,
                                   "attention": t_attn * 1e3,
                                   "launches": launches * H200["launch"] * 1e3}}


def run(arch: str, size: int, reps: int, coupling: str = "internal",
        dtype: str = "float32") -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, batched, chains = setup(arch, size, dev, coupling, getattr(torch, dtype))
    res = {"arch": arch, "coupling": coupling, "units": len(model.paam.units),
           "shape_groups": len(model.paam.groups), "dtype": dtype, "device_kind": dev,
           "h200_prediction": predict(model, dtype)}
    variants = [("per_unit_chains", chains),
                ("batched_reference", _with_env("PAAM_FAST_BACKEND", "reference", batched))]
    if dev == "cuda":
        triton = _with_env("PAAM_FAST_BACKEND", "triton", batched)
        variants.append(("triton", triton))  # default dots: tf32x3 (fp32) / bf16
        variants.append(("triton_tf32", _with_env("PAAM_FAST_TRITON_DOT", "tf32", triton)))
        variants.append(("triton_ieee", _with_env("PAAM_FAST_TRITON_DOT", "ieee", triton)))
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
    ap.add_argument("--coupling", default="internal", choices=("internal", "grouped"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--predict-only", action="store_true",
                    help="print the H200 prediction from the unit table and stop")
    args = ap.parse_args(argv)
    if args.predict_only:
        model = pf.paamify(pf.models.get_model(args.arch), coupling=args.coupling,
                           input_size=(1, 3, args.size, args.size))
        pr = predict(model, args.dtype)
        print(f"{args.arch} ({args.coupling}, {args.dtype}):", json.dumps(pr, indent=1))
        return pr
    r = run(args.arch, args.size, args.reps, args.coupling, args.dtype)
    print(f"{args.arch} ({args.coupling}, {args.dtype}): {r['units']} gated units in "
          f"{r['shape_groups']} (F, D) groups")
    pr = r["h200_prediction"]
    print(f"  predicted on the H200, Triton graphed: {pr['predicted_ms']:.3f} ms "
          f"({pr['proj_gflop']:.2f} GFLOP projections, {pr['attn_gflop']:.2f} GFLOP attention, "
          f"{pr['token_mb']:.0f} MB of tokens)")
    for k in ("per_unit_chains", "batched_reference", "triton", "triton_tf32", "triton_ieee"):
        if k not in r:
            continue
        v = r[k]
        line = (f"  {k:<18} {v['aten_ops']:>6} ATen ops {v['gpu_kernels']:>5} GPU kernels  eager "
                f"{v['eager']['median_ms']:8.3f} ms")
        if "graphed" in v:
            line += f"  graphed {v['graphed']['median_ms']:8.3f} ms"
        print(line)
    print("wrote", write_json(f"scoring_{args.arch}_{args.coupling}_{args.dtype}", r))
    return r


if __name__ == "__main__":
    main()
