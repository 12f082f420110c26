"""Ahead-of-time compile of every Triton launch the scoring path makes, for the H200 (sm_90,
warp size 32), without a GPU.

The launches are not written by hand: each configuration (model, coupling, dtype, dot mode,
attention width) runs the library's own forward and backward under
:func:`paam_fast.triton_scoring.record_launches`, which captures kernel, grid, arguments and
constexprs instead of launching.  Each distinct launch is then specialised as Triton's runtime
would (``native_specialize_impl``: ints equal to 1 become constexprs, 16-divisible ints and
aligned pointers get divisibility hints), compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``, and ptxas's own report is read for registers and spills.

    python -m paam_fast.bench.aot [--quick] [--json out.json]

Must run without TRITON_INTERPRET (the interpreter replaces the kernels' JIT functions).
Exit code 1 when any launch fails to compile, exceeds the shared-memory limit, or spills.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

# The H200's shared memory per block (sm_90: 227 KB usable of 228 KB).
SMEM_LIMIT = 232_448
TARGET_ARCH = 90
# Every tile plan (BLOCK_DH 16/32/64/128) with DH divisible by 16 and not (the runtime's
# divisibility hint changes the code), and DH = 1 (the runtime makes it a constexpr): together
# they are every compiled variant of the widths the kernels take (1..MAX_DIM).
DIMS = (1, 8, 16, 24, 32, 40, 64, 72, 128)
DEFAULT_DIM = 32
# Spills: none at all for the default configuration (dim 32, default dots, fp32 and bf16).
# Elsewhere (opt-in dot modes, other widths) ptxas keeps up to a few words in local memory at
# the 8-warp plans' 128-register cap (seen: 4-16 B); those stay in L1 and cost a few cycles per
# tile, far below the tile's own loads.  More than this bound is a defect.
SPILL_BOUND_NONDEFAULT = 32


def _configs(quick: bool):
    """(label, model builder, coupling, dtype name, dot env value, dim)."""
    import torchvision

    import paam_fast as pf

    models = {
        "resnet20": (pf.models.resnet20, 32),
        "resnet56": (pf.models.resnet56, 32),
        "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 64),
    }
    dots = ("auto", "ieee", "tf32")
    out = []
    # the default width on every model, coupling, dtype and dot mode
    for name in ("resnet20", "resnet56", "resnet50"):
        for coupling in ("internal", "grouped"):
            for dtype in ("float32", "bfloat16"):
                for dot in dots:
                    out.append((name, models[name], coupling, dtype, dot, 32))
    # the paper-literal gate (normalize="none": no max, a NORM_MAX=False specialisation)
    for dtype in ("float32", "bfloat16"):
        out.append(("resnet20", models["resnet20"], "internal:none", dtype, "auto", 32))
    # every tile plan of the documented widths (1..128) on the model with the largest units
    for dim in DIMS:
        if dim == 32:
            continue
        for dtype in ("float32", "bfloat16"):
            for dot in (("auto",) if quick else dots):
                out.append(("resnet50", models["resnet50"], "grouped", dtype, dot, dim))
    return out


def record(make, size: int, coupling: str, dtype: str, dot: str, dim: int):
    """The launches of one scoring forward + backward (None when paamify refuses the
    coupling for this model: that configuration launches nothing)."""
    import torch

    import paam_fast as pf
    from paam_fast import triton_scoring as ts

    coupling, _, normalize = coupling.partition(":")
    try:
        net = pf.paamify(make(), coupling=coupling, dim=dim, normalize=normalize or "max",
                         input_size=(1, 3, size, size))
    except ValueError:
        return None
    net = net.to(getattr(torch, dtype))
    old = os.environ.get("PAAM_FAST_TRITON_DOT")
    os.environ["PAAM_FAST_TRITON_DOT"] = dot
    try:
        with ts.record_launches("cuda") as launches:
            gates, folds = ts.score_all(net.paam)
            loss = gates.flat.sum() + sum(a.float().sum() + b.float().sum()
                                          for a, b in folds.values())
            loss.backward()
    finally:
        if old is None:
            os.environ.pop("PAAM_FAST_TRITON_DOT")
        else:
            os.environ["PAAM_FAST_TRITON_DOT"] = old
    return launches


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def specialise(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch, as Triton's runtime makes them."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        signature[p.name] = ty
        if isinstance(spec, str) and BaseBackend.parse_attr(spec):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs, options


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(kernel, signature, constexprs, attrs, options) -> dict:
    """Compile for sm_90; shared memory from Triton's metadata, registers and spills from
    ptxas's report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with contextlib.suppress(Exception):
        triton.knobs.nvidia.dump_ptxas_log = True
    src = ASTSource(kernel, signature, constexprs, attrs)
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)
    except Exception as e:  # a compile error is a result here, recorded with its message
        msg = str(e).strip().splitlines()
        return {"compiles": False, "error": " | ".join(m for m in msg if m.strip())[-600:]}
    log = buf.getvalue()
    regs = _REGS.search(log)
    spill = _SPILL.search(log)
    return {
        "compiles": True,
        "shared": int(ck.metadata.shared),
        "registers": int(regs.group(1)) if regs else None,
        "stack": int(spill.group(1)) if spill else None,
        "spill_stores": int(spill.group(2)) if spill else None,
        "spill_loads": int(spill.group(3)) if spill else None,
        "tensor_cores": bool(re.search(r"\b(wgmma|mma)\.", ck.asm.get("ptx", ""))),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _key(kernel, signature, constexprs, attrs, options):
    return (kernel.__name__, tuple(sorted(signature.items())),
            tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())),
            tuple(sorted(options.items())))


def is_default(config: str) -> bool:
    return config.endswith(f"/dot=auto/dim={DEFAULT_DIM}")


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled launch (empty: it is fine)."""
    if not row["compiles"]:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["shared"] > SMEM_LIMIT:
        out.append(f"needs {row['shared']} B of shared memory (limit {SMEM_LIMIT})")
    if row["registers"] is None:
        out.append("no ptxas report was read (registers and spills unknown)")
        return out
    spilled = row["spill_stores"] + row["spill_loads"]
    bound = 0 if any(is_default(c) for c in row["configs"]) else SPILL_BOUND_NONDEFAULT
    if spilled > bound:
        out.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads; "
                   f"bound {bound} B)")
    return out


def run(quick: bool = False, log=print, shard: tuple[int, int] = (0, 1),
        only: str = "") -> list[dict]:
    """Record, specialise and compile every distinct launch; one row per distinct launch with
    the configurations that make it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1: the interpreter replaces the "
                           "kernels' JIT functions, which then cannot be compiled")
    import torch
    import triton

    # a fresh cache and no cache hits: ptxas must run (its report is what is read)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="paam_aot_"))
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    torch.manual_seed(0)
    seen: dict = {}
    rows: list[dict] = []
    k, n = shard
    for name, (make, size), coupling, dtype, dot, dim in _configs(quick)[k::n]:
        label = f"{name}/{coupling}/{dtype}/dot={dot}/dim={dim}"
        if only not in label:
            continue
        launches = record(make, size, coupling, dtype, dot, dim)
        if launches is None:
            log(f"  {label}: coupling refused by paamify (no launch)")
            continue
        for kernel, _grid, args, kwargs in launches:
            sig, const, attrs, opts = specialise(kernel, args, kwargs)
            key = _key(kernel, sig, const, attrs, opts)
            if key in seen:
                seen[key]["configs"].append(label)
                continue
            res = compile_one(kernel, sig, const, attrs, opts)
            row = {"kernel": kernel.__name__, "triton": triton.__version__,
                   "dot": const.get("DOT"), "block_dh": const.get("BLOCK_DH"),
                   "block_f": const.get("BLOCK_F"), "block_k": const.get("BLOCK_K"),
                   "num_warps": opts.get("num_warps", 4),
                   "constexprs": {k: str(v) for k, v in const.items()},
                   "configs": [label], **res}
            seen[key] = row
            rows.append(row)
            log(f"  {row['kernel']:<20} {label:<48} " + (
                f"smem {res['shared']:>6} regs {res['registers']} spill "
                f"{res['spill_stores']}/{res['spill_loads']} tc {res['tensor_cores']} "
                f"{res['seconds']}s" if res["compiles"] else "FAILS: " + res["error"][:300]))
    for row in rows:  # judged with every configuration that makes the launch
        row["problems"] = problems(row)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: kernel × (dot, BLOCK_DH, warps) with the worst case over its launches."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["triton"], r["kernel"], r["dot"], r["block_dh"], r["block_f"],
                           r["block_k"], r["num_warps"]), []).append(r)
    lines = ["| triton | kernel | dot | BLOCK_DH | BLOCK_F | BLOCK_K | warps | launches | "
             "compiles | shared (B, max) | registers (max) | spills (B, max) | tensor cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (tv, k, dot, bdh, bf, bk, nw), rs in sorted(groups.items(), key=lambda x: str(x[0])):
        ok = [r for r in rs if r["compiles"]]
        shared = max((r["shared"] for r in ok), default="-")
        regs = max((r["registers"] or 0 for r in ok), default="-")
        spills = max(((r["spill_stores"] or 0) + (r["spill_loads"] or 0) for r in ok),
                     default="-")
        tc = "yes" if ok and all(r["tensor_cores"] for r in ok) else "no" if ok else "-"
        lines.append(f"| {tv} | {k} | {dot or '-'} | {bdh or '-'} | {bf or '-'} | {bk or '-'} "
                     f"| {nw} | {len(rs)} | {len(ok)}/{len(rs)} | {shared} | {regs} | {spills} "
                     f"| {tc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="the default dot mode only for the non-default widths")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--table", action="store_true", help="print the markdown table")
    ap.add_argument("--only", default="", help="only the configurations whose label "
                    "(model/coupling/dtype/dot=../dim=..) contains this")
    ap.add_argument("--table-from", nargs="+", metavar="JSON",
                    help="print the markdown table of earlier runs' --json files and stop")
    ap.add_argument("--shard", default="0/1", help="K/N: the K-th of N interleaved shares of "
                    "the configurations (run N processes on N cores)")
    a = ap.parse_args(argv)
    if a.table_from:
        rows = []
        for path in a.table_from:
            with open(path) as f:
                rows += json.load(f)
        print(table(rows))
        return 0
    t0 = time.perf_counter()
    k, n = (int(v) for v in a.shard.split("/"))
    rows = run(a.quick, shard=(k, n), only=a.only)
    bad = [r for r in rows if r["problems"]]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.table:
        print(table(rows))
    print(f"{len(rows)} distinct launches compiled for sm_{TARGET_ARCH} in "
          f"{time.perf_counter() - t0:.0f} s; {len(bad)} with problems")
    for r in bad:
        print(f"  {r['kernel']} ({r['configs'][0]}): {'; '.join(r['problems'])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
