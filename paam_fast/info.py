"""``python -m paam_fast.info``: versions, devices, and which backend each op uses and why."""

from __future__ import annotations

import importlib
import platform


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as e:  # report, never fail: this is the diagnostics command
        return f"not available ({type(e).__name__}: {e})"


def info() -> dict:
    import torch

    from . import __version__, dispatch

    return {
        "paam_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "cuda available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "backends": dispatch.describe(),
        "triton scoring dots (fp32 / bf16 models)": _dots(),
    }


def _dots() -> str:
    try:
        import torch

        from .triton_scoring import MAX_DIM, dot_mode

        return (f"{dot_mode(torch.float32)} / {dot_mode(torch.bfloat16)} "
                f"(PAAM_FAST_TRITON_DOT overrides; dim <= {MAX_DIM})")
    except Exception as e:  # a bad PAAM_FAST_TRITON_DOT is reported, not raised, here
        return f"error: {e}"


def main() -> None:
    for k, v in info().items():
        if k == "backends":
            print("backends:")
            for op, (backend, why) in v.items():
                print(f"  {op}: {backend} ({why})")
        else:
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
