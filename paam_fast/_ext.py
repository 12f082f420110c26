"""Loading the C++ extension ``paam_fast._C`` (csrc/): prebuilt by setup.py, else JIT-built with
ninja on first use, else absent (the reference ops run; ``python -m paam_fast.info`` says why).

``PAAM_FAST_EXT=0`` disables the extension; ``PAAM_FAST_EXT=jit`` skips the prebuilt module and
JIT-builds from csrc/ (how the JIT path is tested)."""

from __future__ import annotations

import glob
import os
import threading

_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "why": "not loaded yet"}


def _csrc() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    d = os.path.join(os.path.dirname(here), "csrc")
    return d if glob.glob(os.path.join(d, "*.cpp")) else None


def load(jit: bool = True) -> bool:
    """True when the ``torch.ops.paam_fast`` ops of the extension are registered."""
    with _lock:
        if _state["tried"] and (_state["ok"] or not jit or _state.get("jit_tried")):
            return _state["ok"]
        _state["tried"] = True
        if os.environ.get("PAAM_FAST_EXT", "1") == "0":
            _state["why"] = "disabled by PAAM_FAST_EXT=0"
            return False
        try:
            if os.environ.get("PAAM_FAST_EXT") == "jit":
                raise ImportError("skipped by PAAM_FAST_EXT=jit")
            from . import _C  # noqa: F401  (registers the ops)

            _state.update(ok=True, why="prebuilt paam_fast._C")
            return True
        except ImportError as e:
            _state["why"] = f"no prebuilt paam_fast._C ({e})"
        if not jit:
            return False
        _state["jit_tried"] = True
        src = _csrc()
        if src is None:
            _state["why"] += "; no csrc/ sources to JIT-build from"
            return False
        try:
            from torch.utils.cpp_extension import load as jit_load

            build = os.path.join(os.environ.get("PAAM_FAST_CACHE", os.path.join(
                os.path.expanduser("~"), ".cache", "paam_fast")), "ext")
            os.makedirs(build, exist_ok=True)
            jit_load("paam_fast_C", sorted(glob.glob(os.path.join(src, "*.cpp"))),
                     extra_cflags=["-O3"], build_directory=build, verbose=False)
            _state.update(ok=True, why=f"JIT-built with ninja in {build}")
            return True
        except Exception as e:  # compiler missing, ninja missing, build error: fall back
            _state["why"] += f"; JIT build failed ({type(e).__name__}: {str(e)[:200]})"
            return False


def status() -> tuple[bool, str]:
    return _state["ok"], _state["why"]
