"""Which models paam_fast prunes: every torchvision classifier and a list of timm models.

For each model and coupling mode: paamify at a small input (random weights, random BN
statistics and scoring head), ``select(keep=0.5)``, ``export``, and check that the exported
model computes what the masked one does.  A cell is "ok" with the kept fraction of parameters,
or the reason the model was refused (no unit, an unreachable budget, a trace failure).

    python benchmarks/model_table.py                      # all, markdown table on stdout
    python benchmarks/model_table.py --only resnet18,timm:dla34 --json out.json
    python benchmarks/model_table.py --from-json out.json   # render a saved run
    python benchmarks/model_table.py --cost params+flops --beta 1 --only resnet50  # paam-train's
                                                          # default budget: params *and* MACs

Each model runs in its own subprocess (``--timeout`` seconds), so a huge one (vit_h_14,
regnet_y_128gf) cannot take the others down with it.  README.md's table is this script's output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TIMM = ["resnet50d", "resnext50_32x4d", "efficientnet_b0", "regnety_016", "mobilenetv3_large_100",
        "cspresnet50", "dla34", "repvgg_a0"]
COUPLINGS = ("internal", "grouped")


def _randomize(model, seed: int = 0) -> None:
    """Random BN statistics/affine and scoring head, as tests/helpers.randomize."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        for g in model.paam.groups:
            g.w.copy_(torch.randn(g.w.shape, generator=gen) / g.w.shape[-1] ** 0.5)
            g.b.copy_(torch.randn(g.b.shape, generator=gen) * 0.3)


def _short(msg: str) -> str:
    msg = " ".join(str(msg).split())
    if "found no unit" in msg:  # "... (coupling='x'). name: reason; name: reason"
        first = msg.split(". ", 1)[-1].split("; ")[0]
        return "no unit: " + first[:110]
    if "the parts no selection can remove need" in msg:
        need, dense = msg.split("need ")[1].split(" of the dense ")
        need, dense = int(need.replace(",", "")), int(dense.replace(",", ""))
        return f"unreachable: {need / 1e6:.2f} M of {dense / 1e6:.2f} M params ungated"
    if "could not trace" in msg:
        return "not fx-traceable: " + msg.split("torch.fx (")[1][:90]
    return msg[:120]


def worker(name: str, size: int, cost: str = "params", beta: float = 0.0) -> dict:
    """Both couplings of one model; returns {"model", "params", coupling: cell}."""
    import torch

    import paam_fast as pf

    torch.set_num_threads(1)
    out: dict = {"model": name}
    for coupling in COUPLINGS:
        t0 = time.time()
        try:
            s = size
            model = pf.models.get_model(name)
            out["params"] = sum(p.numel() for p in model.parameters())
            for retry in (224, 299, None):  # fixed-size models (ViT, Inception v3)
                try:
                    pf.paamify(model, coupling=coupling, input_size=(1, 3, s, s))
                    break
                except ValueError as e:
                    if "could not run" not in str(e) or retry is None:
                        raise
                    s = retry
                    model = pf.models.get_model(name)
            _randomize(model)
            model.eval()
            x = torch.randn(1, 3, s, s)
            with torch.no_grad():
                model(x)
                dense = pf.count(model, (1, 3, s, s))
                sel = pf.select(model, keep=0.5, cost=cost, beta=beta)
                y = model(x)
                plain = pf.export(model)
                err = float((plain(x) - y).norm() / y.norm().clamp_min(1e-30))
            got = pf.count(plain, (1, 3, s, s))
            out[coupling] = {"status": "ok" if err <= 1e-5 else "mismatch",
                             "kept": got["params"] / dense["params"],
                             "kept_flops": got["flops"] / dense["flops"],
                             "units": len(model.paam.units),
                             "rel_err": err, "exact_count": got["params"] == sel.params,
                             "size": s, "seconds": round(time.time() - t0, 1)}
        except Exception as e:  # a refusal is a result of the table
            out[coupling] = {"status": "refused", "why": _short(e),
                             "seconds": round(time.time() - t0, 1)}
    return out


def _cell(c: dict | None) -> str:
    if c is None:
        return "not run"
    if c["status"] == "ok":
        at = f", at {c['size']}×{c['size']}" if c.get("size", 64) != 64 else ""
        macs = f", {c['kept_flops']:.3f} of MACs" if "kept_flops" in c else ""
        return f"ok, {c['kept']:.3f} kept{macs} ({c['units']} units{at})"
    if c["status"] == "mismatch":
        return f"**export differs** (rel {c['rel_err']:.1e})"
    if c["status"] == "error":
        return c["why"]
    return c["why"].replace("|", "/")


def markdown(rows: list[dict], cost: str = "params") -> str:
    lines = ["| model | params (M) | internal | grouped |", "|---|---|---|---|"]
    for r in rows:
        p = f"{r['params'] / 1e6:.1f}" if "params" in r else "?"
        lines.append(f"| {r['model']} | {p} | {_cell(r.get('internal'))} | "
                     f"{_cell(r.get('grouped'))} |")
    ok = sum(any(r.get(c, {}).get("status") == "ok" for c in COUPLINGS) for r in rows)
    lines.append("")
    what = {"params": "their parameters", "flops": "their MACs",
            "params+flops": "their parameters and MACs"}.get(cost, cost)
    lines.append(f"{ok} of {len(rows)} models prune to half {what} in at least one "
                 "mode, the exported model computing what the masked one does (≤ 1e-5).")
    return "\n".join(lines)


def _meta(size: int, cost: str = "params", beta: float = 0.0) -> dict:
    import platform

    import torch
    import torchvision

    try:
        import timm
        timm_v = timm.__version__
    except ImportError:
        timm_v = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = None
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm_v,
            "commit": commit, "python": platform.python_version(), "size": size,
            "device": "cpu", "dtype": "float32", "keep": 0.5, "cost": cost, "beta": beta}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated names (timm ones as timm:<name>)")
    ap.add_argument("--size", type=int, default=64, help="input H = W (default 64)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-timm", action="store_true", help="torchvision models only")
    ap.add_argument("--from-json", default=None, help="only render the table of a --json file")
    ap.add_argument("--cost", default="params", choices=["params", "flops", "params+flops"],
                    help="what keep=0.5 is a fraction of (paam-train's default: params+flops)")
    ap.add_argument("--beta", type=float, default=0.0, help="the selection's β (params+flops: "
                    "1 makes both parts bind, as paam-train's default)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        meta = data.get("meta", {}) if isinstance(data, dict) else {}
        print(markdown(data["rows"] if isinstance(data, dict) else data,
                       meta.get("cost", "params")))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.cost, args.beta)))
        return 0
    if args.only:
        names = [n for n in args.only.split(",") if n]
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if not args.no_timm:
            names += [f"timm:{n}" for n in TIMM]
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--size", str(args.size),
               "--cost", args.cost, "--beta", str(args.beta)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                 env=env)
            line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
            row = json.loads(line) if line.startswith("{") else {
                "model": name, "internal": {"status": "error", "why":
                                            f"crashed (exit {res.returncode})"}}
        except subprocess.TimeoutExpired:
            row = {"model": name, "internal": {"status": "error",
                                               "why": f"over {args.timeout} s"}}
        rows.append(row)
        print(f"{name}: " + "; ".join(f"{c}={_cell(row.get(c))}" for c in COUPLINGS),
              file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": _meta(args.size, args.cost, args.beta), "rows": rows}, f, indent=1)
    print(markdown(rows, args.cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
