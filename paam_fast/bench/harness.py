"""The one benchmark harness (ENGINEERING.md "Benchmarks").

* ``timeit``: median and 20th/80th percentiles; CUDA events via ``triton.testing.do_bench`` (or
  ``do_bench_cudagraph``) on the GPU, ``time.perf_counter`` on the CPU.
* ``wall_ms`` / ``compare_ms``: time per call on a named device (synchronised, calls batched
  so a sample is long enough to time), one function or several interleaved round by round (a
  machine whose load drifts then shifts all of them alike), by the wall clock or, for one CPU
  thread on a shared machine, by CPU time: what a latency table (:mod:`paam_fast.latency`) and
  the latency benchmark measure.
* ``count_ops``: ATen ops (forward and backward) and, on the GPU, kernel launches of one call,
  from ``torch.profiler``.
* ``environment`` / ``write_json``: every result file records device, versions, commit, mode.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional on the CPU
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else
        f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


def timeit(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20,
           cudagraph: bool = False) -> dict:
    """{"median_ms", "p20_ms", "p80_ms"} of ``fn()``."""
    if torch.cuda.is_available():
        from triton.testing import do_bench, do_bench_cudagraph

        if cudagraph:
            q = do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])
        else:
            q = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    qs = statistics.quantiles(ts, n=10)
    return {"median_ms": statistics.median(ts), "p20_ms": qs[1], "p80_ms": qs[7]}


def _sync(device) -> Callable[[], None]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def _stats(ts: list[float]) -> dict:
    ts = sorted(ts)
    q = (lambda f: ts[min(len(ts) - 1, int(f * len(ts)))])  # noqa: E731
    return {"median_ms": statistics.median(ts), "p20_ms": q(0.2), "p80_ms": q(0.8),
            "samples": len(ts)}


CLOCKS = ("wall", "cpu")


def _clock(clock: str, device) -> Callable[[], float]:
    """``"wall"``: elapsed time (latency as a user sees it).  ``"cpu"``: the process's CPU time,
    for a CPU run on one thread on a machine shared with other work: time spent descheduled
    is not counted, so it estimates the unloaded wall time (caches shared with the other
    work still slow it); with more threads it would sum them, so it is refused."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "wall":
        return time.perf_counter
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        raise ValueError("clock='cpu' measures a CPU run on one thread (torch.set_num_threads(1)"
                         f"); here: device {device}, {torch.get_num_threads()} threads")
    return time.process_time


def _calls_per_sample(fn, sync, min_ms: float, now) -> int:
    t = now()
    fn()
    sync()
    one = (now() - t) * 1e3
    return max(1, min(1000, math.ceil(min_ms / max(one, 1e-6))))


def wall_ms(fn: Callable[[], object], *, device="cpu", warmup: int = 2, reps: int = 5,
            min_ms: float = 1.0, clock: str = "wall") -> dict:
    """{"median_ms", "p20_ms", "p80_ms", "samples"}: time of one call of ``fn`` on ``device``
    (synchronised at the end of every sample), each of the ``reps`` samples running ``fn``
    often enough to last ``min_ms`` (a timer's resolution and a call's overhead are then small
    next to it).  ``clock``: "wall" or "cpu" (see ``_clock``)."""
    now = _clock(clock, device)
    sync = _sync(device)
    for _ in range(warmup):
        fn()
    sync()
    inner = _calls_per_sample(fn, sync, min_ms, now)
    ts = []
    for _ in range(reps):
        t = now()
        for _ in range(inner):
            fn()
        sync()
        ts.append((now() - t) * 1e3 / inner)
    return _stats(ts)


def compare_ms(fns: dict[str, Callable[[], object]], *, device="cpu", warmup: int = 2,
               rounds: int = 7, min_ms: float = 1.0, clock: str = "wall") -> dict[str, dict]:
    """``wall_ms`` of several functions, interleaved: every round takes one sample of each, so
    a change in the machine's load during the run moves all of them, not one."""
    now = _clock(clock, device)
    sync = _sync(device)
    inner = {}
    for k, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync()
        inner[k] = _calls_per_sample(fn, sync, min_ms, now)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = now()
            for _ in range(inner[k]):
                fn()
            sync()
            ts[k].append((now() - t) * 1e3 / inner[k])
    return {k: _stats(v) for k, v in ts.items()}


def count_ops(fn: Callable[[], object]) -> dict:
    """ATen ops (every ``aten::`` event, nested ones included, forward and backward) and GPU
    kernel launches of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    cuda = torch.autograd.DeviceType.CUDA
    launches = [e for e in events if getattr(e, "device_type", None) == cuda]
    return {"aten_ops": len(aten), "gpu_kernels": len(launches)}


@contextlib.contextmanager
def env_var(key: str, value: str | None):
    """Run the block with the environment variable ``key`` = value (None: unset), restoring it
    after."""
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def backend(name: str | None):
    """Run the block with PAAM_FAST_BACKEND=name (None: unset), restoring it after."""
    return env_var("PAAM_FAST_BACKEND", name)


def write_json(name: str, payload: dict, out_dir: str | None = None) -> str:
    out_dir = out_dir or os.environ.get("PAAM_BENCH_OUT", "benchmarks/results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"env": environment(), **payload}, f, indent=2)
    return path
