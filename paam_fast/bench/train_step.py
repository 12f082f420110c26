"""Whole training step: dense vs PAAM (reference scoring), eager / CUDA-graphed / torch.compile.

    python -m paam_fast.bench.train_step --arch resnet56 --batch 128 --size 32
    python -m paam_fast.bench.train_step --arch resnet50 --batch 256 --size 224

On the GPU: bf16 autocast, channels_last, synthetic data (never zeros); the step is
``paam_fast.step.TrainStep``, the one ``paam-train`` runs, and the graphed mode captures forward +
backward + SGD update in one CUDA graph as ``--cuda-graphs`` does.  On the CPU (labelled as such):
fp32, eager only unless --modes says otherwise.  Prints ms/step, the PAAM/dense ratio, the
projected CIFAR epoch time (390 steps at batch 128) and writes one JSON.
"""

from __future__ import annotations

import argparse

import torch

import paam_fast as pf

from ..step import TrainStep
from .harness import backend, count_ops, timeit, write_json

step_warmup = 4  # TrainStep's 3 eager steps + the capturing one


def synthetic_step(model, opt, batch: int, size: int, dev: str, pruner=None,
                   graph: bool = False):
    """A closure running one training step of ``model`` on a fixed synthetic batch (never
    zeros): :class:`paam_fast.step.TrainStep`, the step ``paam-train`` runs, eager or
    (``graph``) captured whole with the SGD update.  On the GPU bf16 autocast, channels_last.
    Returns (closure, TrainStep)."""
    cuda = dev == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    step = TrainStep(model, opt, pruner=pruner, amp=cuda, mode="graph" if graph else "eager")
    x = torch.randn(batch, 3, size, size, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)
    return (lambda: step(x, y)), step


def make_step(arch: str, batch: int, size: int, paam: bool, dev: str, graph: bool = False):
    """A fresh model (PAAM, penalty with λ = 0.1, or dense) and its synthetic training step."""
    torch.manual_seed(0)
    model = pf.models.get_model(arch)
    if paam:
        pf.paamify(model, input_size=(1, 3, size, size))
    model = model.to(dev)
    groups = pf.param_groups(model) if paam else [{"params": list(model.parameters())}]
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4)
    pruner = pf.Pruner(model, opt, epochs=10, lam=0.1) if paam else None
    return model, synthetic_step(model, opt, batch, size, dev, pruner, graph)[0]


def graphed(step):
    """Capture step() (forward, backward, optimizer) into one CUDA graph; return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g.replay


KINDS = {"dense": (False, None), "paam_reference": (True, "reference"),
         "paam_triton": (True, "triton")}


def run(arch, batch, size, modes, reps=None) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kinds = [k for k in KINDS if dev == "cuda" or k != "paam_triton"]
    res = {"arch": arch, "batch": batch, "size": size, "device_kind": dev, "kinds": kinds,
           "dtype": "bf16 autocast, channels_last" if dev == "cuda" else "fp32"}
    for mode in modes:
        for kind in kinds:
            paam, be = KINDS[kind]
            with backend(be):
                model, step = make_step(arch, batch, size, paam, dev, graph=mode == "graphed")
                if mode == "graphed":
                    fn = step
                    for _ in range(step_warmup):  # eager warm-up steps, then the capture
                        fn()
                elif mode == "compile":
                    fn = torch.compile(step)
                    for _ in range(3):
                        fn()
                else:
                    fn = step
                r = timeit(fn, reps=reps or (10 if dev == "cpu" else 50))
                if mode == "eager":
                    r.update(count_ops(step))
            res[f"{kind}_{mode}"] = r
        for kind in kinds[1:]:
            res[f"ratio_{kind}_{mode}"] = (res[f"{kind}_{mode}"]["median_ms"]
                                           / res[f"dense_{mode}"]["median_ms"])
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=None,
                    help="eager graphed compile (default: all on GPU, eager on CPU)")
    a = ap.parse_args(argv)
    modes = a.modes or (["eager", "graphed", "compile"] if torch.cuda.is_available()
                        else ["eager"])
    r = run(a.arch, a.batch, a.size, modes)
    for m in modes:
        d = r[f"dense_{m}"]["median_ms"]
        line = f"{a.arch} b{a.batch} {m:8s} dense {d:8.2f} ms"
        for k in r["kinds"][1:]:
            p = r[f"{k}_{m}"]["median_ms"]
            line += f" | {k} {p:8.2f} ms ({p / d:.3f}x)"
        if a.size == 32:
            line += f" | CIFAR epoch (390 steps of 128): dense {d * 390 / 1000:.2f} s"
        print(line)
    print("wrote", write_json(f"train_step_{a.arch}_b{a.batch}", r))
    return r


if __name__ == "__main__":
    main()
