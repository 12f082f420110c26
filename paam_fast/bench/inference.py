"""What the user gets: inference of the dense and the pruned network, exported, eval mode.

    python -m paam_fast.bench.inference --arch resnet56 --model runs/.../model.paam [more ...]

Latency at batch 1 and throughput at batch 256 (CPU: --batch to shrink it), on the GPU with
channels_last and bf16 autocast, on the CPU in fp32.  Writes one JSON.
"""

from __future__ import annotations

import argparse
import os

import torch

import paam_fast as pf

from .harness import timeit, write_json


def _bench(model, batch: int, size: int, dev: str) -> dict:
    cuda = dev == "cuda"
    model = model.to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad(), torch.autocast(dev, torch.bfloat16, enabled=cuda):
            model(x)

    r = timeit(run, reps=50 if cuda else 10)
    r["images_per_s"] = batch / (r["median_ms"] / 1e3)
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--model", required=True, nargs="+",
                    help="pruned models saved by pf.save / paam-train (named by their folder)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-classes", type=int, default=10)
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    make = lambda: pf.models.get_model(a.arch, num_classes=a.num_classes)
    models = [("dense", make())]
    for path in a.model:
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        models.append((name, pf.load(path, make)))
    res = {"arch": a.arch, "device_kind": dev, "size": a.size,
           "threads": torch.get_num_threads(), "models": dict(zip([n for n, _ in models[1:]],
                                                                 a.model))}
    for name, m in models:
        res[name] = {"count": pf.count(m, (1, 3, a.size, a.size)),
                     "latency_b1": _bench(m, 1, a.size, dev),
                     f"throughput_b{a.batch}": _bench(m, a.batch, a.size, dev)}
        r = res[name]
        print(f"{name:>24s} params {r['count']['params']:>10,}  MACs {r['count']['flops']:>13,}  "
              f"b1 {r['latency_b1']['median_ms']:.2f} ms  b{a.batch} "
              f"{r[f'throughput_b{a.batch}']['images_per_s']:.0f} img/s")
    print("wrote", write_json(f"inference_{a.arch}", res))
    return res


if __name__ == "__main__":
    main()
