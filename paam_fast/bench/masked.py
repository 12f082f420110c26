"""Masked training compute: dense masks vs the mask-aware compacted ops vs the physically
compacted model, at 100/75/50/25% of gated channels alive; plus one compaction event's cost.

    python -m paam_fast.bench.masked --arch resnet50 --batch 256 --size 224     # GPU
    python -m paam_fast.bench.masked --arch resnet50 --batch 8 --size 64        # CPU, small

GPU: bf16 autocast, channels_last; eager and CUDA-graphed.  Writes one JSON.
"""

from __future__ import annotations

import argparse
import time

import torch

import paam_fast as pf
from paam_fast import dispatch

from .harness import timeit, write_json
from .train_step import step_warmup, synthetic_step


def build(arch, size, frac, dev):
    torch.manual_seed(0)
    model = pf.paamify(pf.models.get_model(arch), input_size=(1, 3, size, size)).to(dev)
    if frac < 1:
        ctrl = model.paam
        alive = {}
        for u in ctrl.units:  # a random alive set of the given fraction per unit
            m = torch.zeros(u.width, dtype=torch.bool)
            m[torch.randperm(u.width)[: max(1, round(frac * u.width))]] = True
            alive[u.name] = m
        pf.apply_masks(model, alive)
    pf.freeze(model)  # frozen gates: measure the network's compute, not the scoring
    return model


def step_fn(model, batch, size, dev, graph: bool = False):
    """(closure running one training step on a fixed batch, optimizer, TrainStep)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fn, step = synthetic_step(model, opt, batch, size, dev, graph=graph)
    return fn, opt, step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    modes = ["eager", "graphed"] if dev == "cuda" else ["eager"]
    res = {"arch": a.arch, "batch": a.batch, "size": a.size, "device_kind": dev,
           "masked_backend": dispatch.masked_backend(), "rows": []}
    for frac in a.fractions:
        row = {"alive": frac}
        for variant in ("dense_masks", "masked_ext", "compacted"):
            model = build(a.arch, a.size, frac, dev)
            if variant == "dense_masks":
                model.paam.masked_compute = "dense"
                model.paam.masks_changed()
            elif variant == "compacted":
                pf.compact(model)
            for mode in modes:
                fn, _, _ = step_fn(model, a.batch, a.size, dev, graph=mode == "graphed")
                if mode == "graphed":
                    for _ in range(step_warmup):  # eager warm-up steps, then the capture
                        fn()
                row[f"{variant}_{mode}_ms"] = timeit(fn, reps=20 if dev == "cuda" else 5)[
                    "median_ms"]
        # one compaction event: compact in place, then the steps until the step graph is
        # captured again (GPU: 3 eager steps, cuDNN re-tuning, capture + replay; CPU: 1 step)
        model = build(a.arch, a.size, frac, dev)
        fn, opt, st = step_fn(model, a.batch, a.size, dev, graph=dev == "cuda")
        for _ in range(step_warmup if dev == "cuda" else 1):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        pf.compact(model, opt)
        st.reset()
        for _ in range(step_warmup if dev == "cuda" else 1):
            fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        row["compaction_event_s"] = time.perf_counter() - t
        res["rows"].append(row)
        print(row, flush=True)
    print("wrote", write_json(f"masked_{a.arch}_b{a.batch}", res))
    return res


if __name__ == "__main__":
    main()
