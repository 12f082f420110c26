"""The scoring network (attention network, AN) of PAAM_METHOD.md §3: pure-PyTorch reference.

For a unit with F filters, its tokens X (F, D) are the unit's filters flattened and divided by
their rms.  Then

    Q, K, V = X·Wq, X·Wk, X·Wv          (D -> d, no bias)
    P = softmax(Q·Kᵀ / √d)              (F×F, over the unit's alive filters)
    e = (P·V)·w + b                     (w ∈ R^d, b scalar)
    e = (V + P·V)·w + b                 with ``residual=True`` (ours, an option): each filter's
                                        own projection beside the attended one, as in every
                                        transformer block, so near-uniform attention no longer
                                        gives every filter nearly the same e
    s = leaky_exp(e)                    (exp(e) for e ≤ 0, 1 + α·e above; slope 1 at 0)
    g = s / max_alive s                 (normalize="max"), or g = s (normalize="none")

Units with equal (F, D) are scored together by one chain of batched matmuls (``score_batched``):
this is the CPU path and the float64 oracle of the Triton kernels.  ``score_unit`` is the same
maths for one unit alone (the "one chain per layer" baseline of the benchmarks).
"""

from __future__ import annotations

import math

import torch

__all__ = ["leaky_exp", "rms_tokens", "score_batched", "score_unit", "TOKEN_EPS"]

# Added to the mean square of the tokens so an all-zero unit scores without NaN.
TOKEN_EPS = 1e-12


def leaky_exp(e: torch.Tensor, leak: float) -> torch.Tensor:
    """exp(e) for e ≤ 0, 1 + leak·e for e > 0. Shape-preserving, any float dtype.

    At e = 0 the value is 1 from both sides and the derivative is taken from the exp branch
    (1): ``torch.where`` routes the gradient only to the selected branch, and e ≤ 0 selects exp.
    """
    neg = e <= 0
    return torch.where(neg, torch.exp(torch.where(neg, e, torch.zeros_like(e))), 1 + leak * e)


def rms_tokens(x: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Divide tokens x (G, F, D) by the rms of each unit's alive rows. Returns (G, F, D)."""
    sq = x.square().sum(-1)  # (G, F)
    if alive is None:
        ms = sq.mean(-1) / x.shape[-1]
    else:
        a = alive.to(sq.dtype)
        ms = (sq * a).sum(-1) / (a.sum(-1).clamp_min(1) * x.shape[-1])
    return x * torch.rsqrt(ms + TOKEN_EPS)[:, None, None]


def score_batched(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                  w: torch.Tensor, b: torch.Tensor, alive: torch.Tensor | None = None,
                  leak: float = 0.01, normalize: str = "max",
                  residual: bool = False) -> torch.Tensor:
    """Gates of G units with equal (F, D), one batched matmul chain.

    Args:
        x: (G, F, D) raw tokens (filters, flattened; detached by the caller).
        wq, wk, wv: (G, D, d) projections; w: (G, d) head; b: (G,) head bias.
        alive: (G, F) bool, the filters still alive (None: all). Dead filters take no part in
            the attention, the rms or the max, and get g = 0.
        leak: slope α of the leaky-exp above 0.
        normalize: "max" (g = s / max s, scale-free) or "none" (g = s).
        residual: add each filter's own value row to its attended one (H = V + P·V).
    Returns:
        g: (G, F) in the promoted float type of the inputs and float32 (fp32 under autocast).
    """
    if normalize not in ("max", "none"):
        raise ValueError(f"normalize must be 'max' or 'none', got {normalize!r}")
    d = wq.shape[-1]
    x = rms_tokens(x, alive)
    q = torch.bmm(x, wq)
    k = torch.bmm(x, wk)
    v = torch.bmm(x, wv)
    # The softmax, e, s and g are computed in (at least) fp32 whatever autocast chose above.
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = torch.bmm(q, k.transpose(1, 2)).to(acc) / math.sqrt(d)
    if alive is not None:
        logits = logits.masked_fill(~alive[:, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    h = torch.bmm(p, v.to(acc))  # (G, F, d)
    if residual:
        h = h + v.to(acc)
    e = torch.bmm(h, w.to(acc)[:, :, None])[..., 0] + b.to(acc)[:, None]
    s = leaky_exp(e, leak)
    if alive is not None:
        s = s * alive.to(acc)
    if normalize == "max":
        s = s / s.amax(dim=-1, keepdim=True)
    return s


def score_unit(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
               w: torch.Tensor, b: torch.Tensor, alive: torch.Tensor | None = None,
               leak: float = 0.01, normalize: str = "max") -> torch.Tensor:
    """Gates of one unit, its own chain of ops: x (F, D), wq/wk/wv (D, d), w (d,), b () -> (F,)."""
    return score_batched(x[None], wq[None], wk[None], wv[None], w[None], b.reshape(1),
                         None if alive is None else alive[None], leak, normalize)[0]
