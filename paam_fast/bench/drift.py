"""How much one network's measured latency drifts on this machine (issue 20).

A latency table is built minutes before the networks it predicts are timed.  If the same
network's median moves between those two moments, no table can predict absolute latency closer
than that drift; the ratio to a dense network measured interleaved cancels it.  This times one
network (eval, forward only) as a series of medians, with other work between them: ``idle``
(sleep), ``compute`` (one convolution on a reused tensor pair) and ``shapes`` (convolutions on
ever new shapes, as a table's grid churns the allocator).

    OMP_NUM_THREADS=1 python -m paam_fast.bench.drift --arch resnet50 --size 224 --batch 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import paam_fast as pf

from .harness import wall_ms, write_json


def _between(kind: str, seconds: float) -> None:
    t0 = time.time()
    if kind == "idle":
        time.sleep(seconds)
        return
    with torch.inference_mode():
        if kind == "compute":
            a, w = torch.randn(1, 256, 28, 28), torch.randn(256, 256, 3, 3)
            while time.time() - t0 < seconds:
                F.conv2d(a, w, padding=1)
            return
        c = 8
        while time.time() - t0 < seconds:  # "shapes"
            hw = (56, 28, 14, 7)[c % 4]
            F.conv2d(torch.randn(1, c, hw, hw), torch.randn(c, c, 3, 3), padding=1)
            c = 8 + (c + 24) % 512


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=15, help="samples per median")
    ap.add_argument("--seconds", type=float, default=15.0, help="work between two medians")
    ap.add_argument("--cycles", type=int, default=2, help="times through idle/compute/shapes")
    a = ap.parse_args(argv)
    model = pf.models.get_model(a.arch, num_classes=a.num_classes).eval()
    x = torch.randn(a.batch, 3, a.size, a.size)

    def fwd():
        with torch.inference_mode():
            model(x)

    series = [{"after": "start", **wall_ms(fwd, reps=a.reps)}]
    for _ in range(a.cycles):
        for kind in ("idle", "compute", "shapes"):
            _between(kind, a.seconds)
            series.append({"after": kind, **wall_ms(fwd, reps=a.reps)})
    meds = [s["median_ms"] for s in series]
    for s in series:
        print(f"after {s['after']:>7s}: median {s['median_ms']:8.2f} ms "
              f"(p20 {s['p20_ms']:.2f}, p80 {s['p80_ms']:.2f})")
    lo, hi = min(meds), max(meds)
    print(f"medians {lo:.2f} … {hi:.2f} ms: spread {hi / lo - 1:+.1%} of the lowest")
    res = {"arch": a.arch, "size": a.size, "batch": a.batch, "threads": torch.get_num_threads(),
           "series": series, "spread": hi / lo - 1}
    print("wrote", write_json(f"drift_{a.arch}_b{a.batch}", res))
    return res


if __name__ == "__main__":
    main()
