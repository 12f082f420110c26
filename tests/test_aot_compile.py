"""Ahead-of-time compile of every Triton launch the library makes, for the H200 (sm_90), on
the CPU: the interpreter never runs Triton's code generator, so a kernel that passes every
interpreter test can still fail to compile, overflow shared memory or spill registers.  This
test is what catches that (``paam_fast.bench.aot`` records the real launches; nothing here
is hand-written)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from paam_fast import triton_scoring as ts  # noqa: E402


def _kernels():
    from paam_fast.kernels import scoring as K

    return {n for n in dir(K) if n.endswith("_kernel")}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Every distinct launch, compiled in two processes (two cores) over interleaved shares."""
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, "-m", "paam_fast.bench.aot", "--quick",
                               "--shard", f"{k}/2", "--json", str(tmp / f"{k}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for k in range(2)]
    logs = [p.communicate(timeout=1500)[0] for p in procs]
    data = []
    for k in range(2):
        assert (tmp / f"{k}.json").exists(), logs[k][-3000:]
        data += json.loads((tmp / f"{k}.json").read_text())
    return data, procs, logs


def test_every_launch_compiles_fits_and_does_not_spill(rows):
    data, procs, logs = rows
    bad = [(r["kernel"], r["configs"][0], r["problems"]) for r in data if r["problems"]]
    assert not bad, bad
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def test_every_kernel_and_configuration_is_covered(rows):
    data = rows[0]
    assert {r["kernel"] for r in data} == _kernels()
    configs = {c for r in data for c in r["configs"]}
    for model in ("resnet20", "resnet56", "resnet50"):
        for dtype in ("float32", "bfloat16"):
            for dot in ("auto", "ieee", "tf32"):
                assert any(c.startswith(f"{model}/internal/{dtype}/dot={dot}/dim=32")
                           for c in configs), (model, dtype, dot)
    assert any(c.startswith("resnet50/grouped/") for c in configs)
    assert any(c.startswith("resnet20/internal:none/") for c in configs)  # normalize="none"
    assert {r["constexprs"].get("NORM_MAX") for r in data} >= {"True", "False"}
    assert {int(c.rsplit("=", 1)[1]) for c in configs} >= {1, 8, 16, 24, 32, 40, 64, 72, 128}
    # the default configuration of every kernel, fp32 and bf16, does not spill at all
    for kernel in _kernels():
        for dtype in ("float32", "bfloat16"):
            default = [r for r in data if r["kernel"] == kernel and any(
                c.endswith("/dot=auto/dim=32") and f"/{dtype}/" in c for c in r["configs"])]
            assert default and all(r["spill_stores"] == r["spill_loads"] == 0
                                   for r in default), (kernel, dtype)
    # the default configuration runs on tensor cores: tf32x3 (fp32) and bf16 dots
    dots = {r["dot"] for r in data if r["dot"] is not None}
    assert {"tf32x3", "bf16", "ieee", "tf32"} <= dots
    for r in data:
        if r["dot"] in ("tf32x3", "bf16", "tf32"):
            assert r["tensor_cores"], (r["kernel"], r["configs"][0])


def _variant(d: int, dtype) -> tuple:
    # what of d reaches the compiled code: the tile plan, and the runtime's specialisation
    # of the DH argument (1 -> constexpr, a multiple of 16 -> divisibility hint, else none)
    return ts.plan(d, dtype), "1" if d == 1 else "D" if d % 16 == 0 else ""


def test_plan_covers_every_documented_dim_and_refuses_beyond():
    from paam_fast.bench.aot import DIMS

    compiled = {_variant(d, dt) for d in DIMS for dt in (torch.float32, torch.bfloat16)}
    for d in range(1, ts.MAX_DIM + 1):  # DH is a runtime argument: the plan is what compiles
        for dt in (torch.float32, torch.bfloat16):
            assert _variant(d, dt) in compiled, d
    with pytest.raises(ValueError, match=r"dim <= 128 \(paamify\(dim=...\) / --dim\), got 129"):
        ts.plan(129, torch.float32)


def test_wide_dim_falls_back_to_the_reference_with_its_reason(monkeypatch):
    from paam_fast import dispatch

    monkeypatch.delenv("PAAM_FAST_BACKEND", raising=False)
    cuda = torch.device("cuda")
    if torch.cuda.is_available():
        backend, why = dispatch.scoring_backend(cuda, torch.float32, dim=256)
        assert backend == "reference" and "dim <= 128" in why
    monkeypatch.setenv("PAAM_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="dim <= 128, this model has dim=256"):
        dispatch.scoring_backend(torch.device("cpu"), torch.float32, dim=256)
