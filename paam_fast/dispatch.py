"""One place that chooses the implementation of each op (ENGINEERING.md "Ops").

``PAAM_FAST_BACKEND=reference|triton`` forces a backend; unset, the fastest available one for
the tensors' device is used.  Only the pure-PyTorch reference exists in this build: the fused
Triton scoring kernels and the C++ mask-aware conv/BN ops are separate work items, and asking
for them explicitly raises a clear error instead of silently running something else.
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


def scoring_backend(device: torch.device | None = None) -> tuple[str, str]:
    """(backend, reason) for the scoring op on ``device``."""
    req = _requested()
    if req == "triton":
        raise RuntimeError("PAAM_FAST_BACKEND=triton, but this build of paam_fast has no Triton "
                           "scoring kernels yet; unset it or use PAAM_FAST_BACKEND=reference")
    if req == "reference":
        return "reference", "forced by PAAM_FAST_BACKEND=reference"
    return "reference", "the only scoring implementation in this build"


def score(x, wq, wk, wv, w, b, alive, leak, normalize, reference=score_batched):
    """Gates of a (F, D) group of units; see :func:`paam_fast.scoring.score_batched`."""
    scoring_backend(x.device)
    return reference(x, wq, wk, wv, w, b, alive, leak, normalize)


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


def masked_backend() -> tuple[str, str]:
    """(backend, reason) of the mask-aware compacted conv/BN/linear ops."""
    if _requested() == "reference":
        return "reference", "forced by PAAM_FAST_BACKEND=reference"
    if _ext.load():
        return "cpp", _ext.status()[1]
    return "reference", _ext.status()[1]


def masked():
    """The namespace of masked_conv2d / masked_batch_norm / masked_linear to call."""
    return _ExtOps if masked_backend()[0] == "cpp" else masked_ops


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
