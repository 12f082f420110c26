"""What the user gets: inference of the dense and the pruned networks, exported, eval mode.

    python -m paam_fast.bench.inference --arch resnet56 --model runs/.../model.paam [more ...]
    python -m paam_fast.bench.inference --arch resnet20 --rows results/proxy2.jsonl \
        --settings "uniform latency=0.5" "paam latency=0.5" [--seeds 0 1 2]

Latency at batch 1 and time per batch at ``--batch`` (images/s beside it), every network timed
**interleaved**, round by round (``harness.compare_ms``): on a shared machine whose speed drifts
by ±10% over a minute, the ratio of each network to dense is what one run resolves, not a
median taken minutes apart.  On the GPU channels_last and bf16 autocast; on the CPU fp32, NCHW
unless ``--channels-last`` (the layout the proxy's latency table was measured in).  Writes one
JSON.

``--rows``: the networks of recorded training runs (a results file of
``benchmarks/cifar_search.py``), rebuilt from each row's per-unit widths with the first filters
of every unit kept and random weights: a network's latency depends on its widths, not on its
weights, so a run's measured latency can be taken again, idle and interleaved, after its model
file is gone.  Each network's val top-1 is written beside its time.
"""

from __future__ import annotations

import argparse
import json
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


def from_widths(make, widths: dict[str, int], size: int, coupling: str = "internal"):
    """A plain network with ``make()``'s layers at ``widths`` ({unit name: filters}, every unit
    named), the first filters of each unit kept, exported as training exports it."""
    from ..paamify import controller
    from ..selection import first_alive

    model = pf.paamify(make(), coupling=coupling, input_size=(1, 3, size, size))
    units = controller(model).units
    missing = [u.name for u in units if u.name not in widths]
    if missing:
        raise ValueError(f"no width for units {missing[:3]} (another architecture or coupling?)")
    pf.apply_masks(model, first_alive(units, {u.id: int(widths[u.name]) for u in units}))
    return pf.export(model)


def _rows(path: str, settings: list[str], seeds: list[int] | None) -> list[dict]:
    rows = sorted((json.loads(line) for line in open(path) if line.strip()),
                  key=lambda r: r["seed"])
    picked = [r for s in settings for r in rows
              if r["setting"] == s and (seeds is None or r["seed"] in seeds)]
    for s in settings:
        if not any(r["setting"] == s for r in picked):
            raise SystemExit(f"{path}: no row of setting {s!r}"
                             + (f" at seeds {seeds}" if seeds is not None else ""))
    return picked


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--model", nargs="+", default=[],
                    help="pruned models saved by pf.save / paam-train (named by their folder)")
    ap.add_argument("--rows", help="a results file of benchmarks/cifar_search.py: time the "
                    "networks of its rows of --settings (rebuilt from their widths)")
    ap.add_argument("--settings", nargs="+", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="with --rows (default: all)")
    ap.add_argument("--coupling", default="internal", help="with --rows: the runs' coupling")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true",
                    help="channels_last on the CPU too (always on the GPU)")
    ap.add_argument("--rounds", type=int, default=7,
                    help="interleaved rounds: samples per network and batch size")
    ap.add_argument("--no-b1", action="store_true", help="skip the batch-1 latency")
    a = ap.parse_args(argv)
    if not a.model and not a.rows:
        ap.error("give --model FILES and/or --rows FILE --settings ...")
    if bool(a.rows) != bool(a.settings):
        ap.error("--rows and --settings go together")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cl = a.channels_last or dev == "cuda"
    make = lambda: pf.models.get_model(a.arch, num_classes=a.num_classes)  # noqa: E731
    models = {"dense": make()}
    paths = {}
    for path in a.model:
        name = _name(path, set(models))
        models[name], paths[name] = pf.load(path, make), path
    accuracy = {}
    for r in _rows(a.rows, a.settings, a.seeds) if a.rows else []:
        name = f"{r['setting']} s{r['seed']}"
        try:
            models[name] = from_widths(make, r.get("per_unit") or {}, a.size, a.coupling)
        except ValueError as e:
            raise SystemExit(f"{name}: {e}") from None
        n = pf.count(models[name], (1, 3, a.size, a.size))
        if (n["params"], n["flops"]) != (r["params"], r["flops"]):  # not the run's network
            raise SystemExit(f"{name}: rebuilt with {n['params']:,} params and {n['flops']:,} "
                             f"MACs, the row says {r['params']:,} and {r['flops']:,} (--arch, "
                             "--size, --num-classes or --coupling differ from the run's)")
        paths[name] = f"{a.rows}: {r['setting']!r} seed {r['seed']} ({r['commit']})"
        accuracy[name] = r["val_top1"]
    res = {"arch": a.arch, "device_kind": dev, "size": a.size, "batch": a.batch,
           "channels_last": cl, "threads": torch.get_num_threads(), "rounds": a.rounds,
           "models": paths}
    batches = [a.batch] if a.no_b1 else [1, a.batch]
    timed = {b: compare_ms({n: _forward(m, b, a.size, dev, cl) for n, m in models.items()},
                           device=dev, rounds=a.rounds) for b in batches}
    for name, m in models.items():
        r = res[name] = {"count": pf.count(m, (1, 3, a.size, a.size))}
        if name in accuracy:
            r["val_top1"] = accuracy[name]
        line = (f"{name:>32s} params {r['count']['params']:>10,}  "
                f"MACs {r['count']['flops']:>13,}")
        for b in batches:
            t = timed[b][name]
            t["of_dense"] = t["median_ms"] / timed[b]["dense"]["median_ms"]
            t["images_per_s"] = b / (t["median_ms"] / 1e3)
            r[f"b{b}"] = t
            line += f"  b{b} {t['median_ms']:8.2f} ms ({t['of_dense']:.3f} of dense)"
        if name in accuracy:
            line += f"  val {accuracy[name]:.2%}"
        print(line)
    print("wrote", write_json(f"inference_{a.arch}_b{a.batch}", res))
    return res


if __name__ == "__main__":
    main()
