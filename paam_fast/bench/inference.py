"""What the user gets: inference of the dense and the pruned networks, exported, eval mode.

    python -m paam_fast.bench.inference --arch resnet56 --model runs/.../model.paam [more ...]

Latency at batch 1 and time per batch at ``--batch`` (images/s beside it), every network timed
**interleaved**, round by round (``harness.compare_ms``): on a shared machine whose speed drifts
by ±10% over a minute, the ratio of each network to dense is what one run resolves, not a
median taken minutes apart.  On the GPU channels_last and bf16 autocast; on the CPU fp32, NCHW
unless ``--channels-last`` (the layout the proxy's latency table was measured in).  Writes one
JSON.
"""

from __future__ import annotations

import argparse
import os

import torch

import paam_fast as pf

from .harness import compare_ms, write_json


def _forward(model, batch: int, size: int, dev: str, channels_last: bool):
    cuda = dev == "cuda"
    model = model.to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast(dev, torch.bfloat16, enabled=cuda):
            model(x)

    return run


def _name(path: str, taken: set) -> str:
    """The run's folder name (``runs/x/model.paam`` -> ``x``), made unique."""
    base = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}#{i}"
    return name


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--model", required=True, nargs="+",
                    help="pruned models saved by pf.save / paam-train (named by their folder)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true",
                    help="channels_last on the CPU too (always on the GPU)")
    ap.add_argument("--rounds", type=int, default=7,
                    help="interleaved rounds: samples per network and batch size")
    ap.add_argument("--no-b1", action="store_true", help="skip the batch-1 latency")
    a = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cl = a.channels_last or dev == "cuda"
    make = lambda: pf.models.get_model(a.arch, num_classes=a.num_classes)  # noqa: E731
    models = {"dense": make()}
    paths = {}
    for path in a.model:
        name = _name(path, set(models))
        models[name], paths[name] = pf.load(path, make), path
    res = {"arch": a.arch, "device_kind": dev, "size": a.size, "batch": a.batch,
           "channels_last": cl, "threads": torch.get_num_threads(), "rounds": a.rounds,
           "models": paths}
    batches = [a.batch] if a.no_b1 else [1, a.batch]
    timed = {b: compare_ms({n: _forward(m, b, a.size, dev, cl) for n, m in models.items()},
                           device=dev, rounds=a.rounds) for b in batches}
    for name, m in models.items():
        r = res[name] = {"count": pf.count(m, (1, 3, a.size, a.size))}
        line = (f"{name:>32s} params {r['count']['params']:>10,}  "
                f"MACs {r['count']['flops']:>13,}")
        for b in batches:
            t = timed[b][name]
            t["of_dense"] = t["median_ms"] / timed[b]["dense"]["median_ms"]
            t["images_per_s"] = b / (t["median_ms"] / 1e3)
            r[f"b{b}"] = t
            line += f"  b{b} {t['median_ms']:8.2f} ms ({t['of_dense']:.3f} of dense)"
        print(line)
    print("wrote", write_json(f"inference_{a.arch}_b{a.batch}", res))
    return res


if __name__ == "__main__":
    main()
