"""CPU training throughput per method and mode (issue 18: which flags the CPU proxy runs use).

    OMP_NUM_THREADS=1 python -m paam_fast.bench.cpu_train --arch resnet20 --batch 128

Images per second of one training step (``paam_fast.step.TrainStep``, forward, backward, SGD)
for dense, uniform thinning at ``--keep``, PAAM before selection (reference scoring, penalty on)
and PAAM after selection and compaction at ``--keep``, each in NCHW, channels_last, and
channels_last under torch.compile.  Synthetic data (never zeros), fp32, the harness's median.
"""

from __future__ import annotations

import argparse

import torch

import paam_fast as pf

from ..paamify import apply_masks, controller
from ..selection import uniform_alive
from ..step import TrainStep
from .harness import timeit, write_json

MODES = ("nchw", "channels_last", "channels_last+compile")


def _model(method: str, arch: str, keep: float, size: int):
    torch.manual_seed(0)
    model = pf.models.get_model(arch)
    if method == "dense":
        return model, None
    pf.paamify(model, input_size=(1, 3, size, size))
    if method == "uniform":
        ctrl = controller(model)
        apply_masks(model, uniform_alive(ctrl.units, ctrl.structure, keep))
        pf.compact(model)
        return model, None
    if method == "paam compacted":
        model(torch.randn(2, 3, size, size))
        pf.select(model, keep=keep)
        pf.compact(model)
        return model, None
    return model, "pruner"


def measure(method: str, mode: str, arch: str, batch: int, size: int, keep: float,
            reps: int) -> float:
    """Images per second of one training step."""
    model, want_pruner = _model(method, arch, keep, size)
    cl = mode != "nchw"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    groups = pf.param_groups(model) if pf.is_paamified(model) else model.parameters()
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4)
    pruner = pf.Pruner(model, opt, epochs=10, lam=0.05) if want_pruner else None
    net = torch.compile(model) if mode.endswith("compile") else model
    step = TrainStep(net, opt, pruner=pruner, amp=False, mode="eager")
    x = torch.randn(batch, 3, size, size)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    t = timeit(lambda: step(x, y), warmup=3, reps=reps)
    return batch / (t["median_ms"] / 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--methods", nargs="+",
                    default=["dense", "uniform", "paam", "paam compacted"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    a = ap.parse_args(argv)
    rows = []
    print(f"{a.arch} batch {a.batch} at {a.size}x{a.size}, {torch.get_num_threads()} threads")
    for method in a.methods:
        for mode in a.modes:
            ips = measure(method, mode, a.arch, a.batch, a.size, a.keep, a.reps)
            rows.append({"method": method, "mode": mode, "img_per_s": ips})
            print(f"{method:16s} {mode:24s} {ips:8.1f} img/s", flush=True)
    write_json("cpu_train", {"arch": a.arch, "batch": a.batch, "size": a.size, "keep": a.keep,
                             "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
