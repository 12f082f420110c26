"""Whole training step: dense vs PAAM (reference scoring), eager / CUDA-graphed / torch.compile.

    python -m paam_fast.bench.train_step --arch resnet56 --batch 128 --size 32
    python -m paam_fast.bench.train_step --arch resnet50 --batch 256 --size 224

On the GPU: bf16 autocast, channels_last, synthetic data (never zeros); the graphed mode
captures forward + backward + optimizer step in one CUDA graph.  On the CPU (labelled as such):
fp32, eager only unless --modes says otherwise.  Prints ms/step, the PAAM/dense ratio, the
projected CIFAR epoch time (390 steps at batch 128) and writes one JSON.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import paam_fast as pf

from .harness import backend, count_ops, timeit, write_json


def training_step(model, opt, batch: int, size: int, dev: str, lam: float = 0.0):
    """One SGD step of ``model`` on a fixed synthetic batch (never zeros); on the GPU in bf16
    autocast with channels_last.  ``lam`` > 0 adds PAAM's penalty."""
    cuda = dev == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        with torch.autocast(dev, torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(x).float(), y)
        if lam:
            loss = loss + lam * pf.penalty(model)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return loss

    return step


def make_step(arch: str, batch: int, size: int, paam: bool, dev: str):
    """A fresh model (PAAM or dense) and its training step."""
    torch.manual_seed(0)
    model = pf.models.get_model(arch)
    if paam:
        pf.paamify(model, input_size=(1, 3, size, size))
    model = model.to(dev)
    groups = pf.param_groups(model) if paam else [{"params": list(model.parameters())}]
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model, training_step(model, opt, batch, size, dev, lam=0.1 if paam else 0.0)


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
                model, step = make_step(arch, batch, size, paam, dev)
                if mode == "graphed":
                    fn = graphed(step)
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
