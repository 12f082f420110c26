"""What a recorded figure depends on besides its command: the data, the split, the machine.

A training run on the CPU is a chaotic function of floating-point rounding: the same command
on a CPU with other vector kernels (AVX-512 vs AVX2), or with another thread count, follows
another trajectory (RESULTS.md, "Why the recorded proxy rows did not come back").  So
``report.json`` records, beside the command, the data archive's sha256, a digest of the exact
training / validation images, the thread count, the CPU and its ATen kernel level, and the
library versions.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys

import torch

__all__ = ["environment", "file_sha256", "tensor_digest"]


def file_sha256(path: str, limit: int = 1 << 30) -> str | None:
    """sha256 of a file up to ``limit`` bytes (None for a folder or a larger file)."""
    if not path or not os.path.isfile(path) or os.path.getsize(path) > limit:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the tensors' bytes: the same images in the same order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed
        return None


def environment() -> dict:
    """The machine and libraries a run's figures depend on."""
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "pillow": _version("pillow"),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
    return env
