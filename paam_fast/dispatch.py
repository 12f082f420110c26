"""One place that chooses the implementation of each op (ENGINEERING.md "Ops").

``PAAM_FAST_BACKEND=reference|triton`` forces a backend; unset, the fastest available one for
the tensors' device is used: the fused Triton scoring kernels on CUDA, the batched PyTorch
reference elsewhere; the C++ mask-aware ops when the extension is built.  Forcing a backend that
cannot run raises a clear error instead of silently running something else.
"""

from __future__ import annotations

import os

import torch

from . import _ext, masked_ops
from .scoring import score_batched

__all__ = ["BACKENDS", "scoring_backend", "score", "masked_backend", "masked", "describe"]

BACKENDS = ("reference", "triton")


def _requested() -> str | None:
    value = os.environ.get("PAAM_FAST_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"PAAM_FAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _triton_problem(device: torch.device | None, dtype: torch.dtype | None,
                    dim: int | None = None) -> str | None:
    """Why the Triton scoring path cannot run here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"Triton is not importable ({type(e).__name__}: {e})"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is not None and device.type != "cuda" and not interpret:
        return f"Triton kernels run on CUDA tensors (these are on {device}); " \
               "TRITON_INTERPRET=1 runs them on the CPU through the interpreter"
    if device is None and not torch.cuda.is_available() and not interpret:
        return "no CUDA GPU (TRITON_INTERPRET=1 runs the kernels on the CPU)"
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the kernels take fp32/bf16/fp16 parameters, not {dtype}"
    from .triton_scoring import MAX_DIM

    if dim is not None and dim > MAX_DIM:
        return f"the kernels take an attention width dim <= {MAX_DIM}, this model has dim={dim}"
    return None


def scoring_backend(device: torch.device | None = None, dtype: torch.dtype | None = None,
                    dim: int | None = None) -> tuple[str, str]:
    """(backend, reason) for the scoring op on ``device`` with parameters of ``dtype`` and
    attention width ``dim``."""
    req = _requested()
    if req == "reference":
        return "reference", "forced by PAAM_FAST_BACKEND=reference"
    problem = _triton_problem(device, dtype, dim)
    if req == "triton":
        if problem:
            raise RuntimeError(f"PAAM_FAST_BACKEND=triton, but {problem}")
        return "triton", "forced by PAAM_FAST_BACKEND=triton"
    if problem is None and (device is None or device.type == "cuda"):
        return "triton", "fused Triton kernels, the default on CUDA"
    return "reference", problem or "the batched PyTorch reference, the default off CUDA"


def score(x, wq, wk, wv, w, b, alive, leak, normalize, residual=False,
          reference=score_batched):
    """Gates of a (F, D) group of units by the reference; see
    :func:`paam_fast.scoring.score_batched` (the Triton path scores all groups at once, in
    :meth:`paam_fast.paamify.PaamController.compute_gates`)."""
    return reference(x, wq, wk, wv, w, b, alive, leak, normalize, residual)


class _ExtOps:
    """The C++ ops under the reference's names (torch.ops.paam_fast.*)."""

    @staticmethod
    def masked_conv2d(*args, **kw):
        return torch.ops.paam_fast.masked_conv2d(*args, **kw)

    @staticmethod
    def masked_batch_norm(*args, **kw):
        return torch.ops.paam_fast.masked_batch_norm(*args, **kw)

    @staticmethod
    def masked_linear(*args, **kw):
        return torch.ops.paam_fast.masked_linear(*args, **kw)


class _RefOps:
    """The reference ops (``paam_fast.masked_ops``) under the same names.  A class, not the
    module itself: modules hold this namespace, and a module object would make a masked model
    impossible to deepcopy or pickle."""

    masked_conv2d = staticmethod(masked_ops.masked_conv2d)
    masked_batch_norm = staticmethod(masked_ops.masked_batch_norm)
    masked_linear = staticmethod(masked_ops.masked_linear)


def masked_backend() -> tuple[str, str]:
    """(backend, reason) of the mask-aware compacted conv/BN/linear ops."""
    if _requested() == "reference":
        return "reference", "forced by PAAM_FAST_BACKEND=reference"
    if _ext.load():
        return "cpp", _ext.status()[1]
    return "reference", _ext.status()[1]


def masked():
    """The namespace of masked_conv2d / masked_batch_norm / masked_linear to call."""
    return _ExtOps if masked_backend()[0] == "cpp" else _RefOps


def describe() -> dict[str, tuple[str, str]]:
    """{op: (backend, reason)} for ``python -m paam_fast.info``."""
    try:
        scoring = scoring_backend()
    except RuntimeError as e:
        scoring = ("error", str(e))
    return {
        "scoring (attention network + gate)": scoring,
        "masked conv/BN/linear (after_select='masked')": masked_backend(),
    }
