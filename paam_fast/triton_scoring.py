"""The fused Triton scoring path: registered ops around ``kernels/scoring.py``, with fake
implementations (torch.compile) and autograd, and the per-model unit table.

Forward: a ``torch.cat`` of the tokens and one of every trainable input, ``proj_fwd_kernel``
and ``attn_fwd_kernel``, which also writes the gated BN affines γ' = g·γ, β' = g·β of every site
(fresh tensors, never the Parameters).  Backward: ``attn_bwd_kernel`` (which adds the folds'
γ·dγ' + β·dβ' to dg and writes dγ = g·dγ', dβ = g·dβ') and ``proj_bwd_kernel``; no buffer needs
zero-filling.  The reference is ``paam_fast.scoring.score_batched``; the choice between them is
made in ``paam_fast.dispatch``.
"""

from __future__ import annotations

import math
import os

import torch

from .scoring import TOKEN_EPS

__all__ = ["UnitTable", "score_all"]


def _blocks(device: torch.device) -> dict:
    # Small tiles under the CPU interpreter (speed); GPU tiles sized for tensor-core dots.
    if device.type == "cpu":
        return {"BLOCK_F": 16, "BLOCK_K": 16}
    return {"BLOCK_F": 64, "BLOCK_K": 64}


def _bdh(dh: int) -> int:
    return max(16, _p2(dh))


def _p2(n: int) -> int:
    """The smallest power of two ≥ n (a Triton block size)."""
    return 1 << max(0, (n - 1).bit_length())


def _split(params: torch.Tensor, sizes: list[int], units: int):
    """The views wq, wk, wv (W,), w (U, DH), b (U,), gamma, beta (S,) of the flat inputs."""
    wq, wk, wv, w, b, gamma, beta = params.split(sizes)
    return wq, wk, wv, w.view(units, -1), b, gamma, beta


@torch.library.custom_op("paam_fast::score_units", mutates_args=())
def score_units(tok: torch.Tensor, params: torch.Tensor, alive: torch.Tensor,
                table: torch.Tensor, site_off: torch.Tensor, sizes: list[int], max_f: int,
                max_d: int, leak: float, norm_max: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gates of every unit. tok (T,) the tokens; params the trainable inputs in one flat
    tensor: wq, wk, wv (W,), w (U·DH,), b (U,), and the sites' BN affines gamma, beta (S,),
    of the lengths ``sizes``; alive (R,) int8, table (U, 8) int64, site_off (sites,) int64.
    Returns g (R,) fp32, the folded affines γ' then β' in one (2·S,) tensor, and the saved
    state qkv (R, 3·DH), ss (U, NFB), h (R, DH), lse (R,), s (R,), m (U,)."""
    from paam_fast.kernels import scoring as K

    u = table.shape[0]
    wq, wk, wv, w, b, gamma, beta = _split(params, sizes, u)
    dh = w.shape[1]
    r = alive.numel()
    dev = tok.device
    qkv, h = _out(r, 3 * dh, device=dev), _out(r, dh, device=dev)
    lse, s, g = _out(r, device=dev), _out(r, device=dev), _out(r, device=dev)
    m = _out(u, device=dev)
    gb = _like(params.new_empty(2 * gamma.numel()))
    gout, bout = gb.split(gamma.numel())
    bl = _blocks(dev)
    nfb = triton_cdiv(max_f, bl["BLOCK_F"])
    ss = _out(u, nfb, device=dev)  # every element written by proj_fwd_kernel
    ieee = _ieee()
    K.proj_fwd_kernel[(u, nfb)](
        tok, wq, wk, wv, alive, table, qkv, ss, DH=dh, BLOCK_F=bl["BLOCK_F"],
        BLOCK_K=bl["BLOCK_K"], BLOCK_DH=_bdh(dh), IEEE=ieee)
    K.attn_fwd_kernel[(u,)](
        qkv, ss, table, alive, w, b, h, lse, s, m, g, gamma, beta, site_off, gout, bout, leak,
        1.0 / math.sqrt(dh), TOKEN_EPS, nfb, DH=dh, NORM_MAX=norm_max, BLOCK_F=bl["BLOCK_F"],
        BLOCK_DH=_bdh(dh), IEEE=ieee, NFB_P2=_p2(nfb))
    return g, gb, qkv, ss, h, lse, s, m


def _like(t: torch.Tensor) -> torch.Tensor:
    """An output shaped like t (NaN-poisoned under PAAM_FAST_POISON=1)."""
    if os.environ.get("PAAM_FAST_POISON") == "1":
        return torch.full_like(t, float("nan"))
    return torch.empty_like(t)


def _out(*shape: int, device) -> torch.Tensor:
    """An fp32 output buffer; NaN-filled under PAAM_FAST_POISON=1 so that an element a kernel
    fails to write shows up in the tests."""
    if os.environ.get("PAAM_FAST_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _ieee() -> bool:
    """Dot precision of the kernels: full fp32 ("ieee", the default: the arithmetic is a small
    part of a step, accuracy first) or, with PAAM_FAST_TRITON_DOT=tf32, the tensor cores'
    TF32 (fp32 inputs) / the inputs' own precision (bf16 models)."""
    mode = os.environ.get("PAAM_FAST_TRITON_DOT", "ieee")
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"PAAM_FAST_TRITON_DOT must be 'ieee' or 'tf32', got {mode!r}")
    return mode == "ieee"


def triton_cdiv(a: int, b: int) -> int:
    return max(1, -(-a // b))


@score_units.register_fake
def _(tok, params, alive, table, site_off, sizes, max_f, max_d, leak, norm_max):
    u = table.shape[0]
    dh = sizes[3] // u
    r = alive.shape[0]
    new = lambda *s: tok.new_empty(s, dtype=torch.float32)
    nfb = triton_cdiv(max_f, _blocks(tok.device)["BLOCK_F"])
    return (new(r), params.new_empty(2 * sizes[5]), new(r, 3 * dh), new(u, nfb), new(r, dh),
            new(r), new(r), new(u))


@torch.library.custom_op("paam_fast::score_units_backward", mutates_args=())
def score_units_backward(dg: torch.Tensor, dgb: torch.Tensor, tok: torch.Tensor,
                         params: torch.Tensor, alive: torch.Tensor, table: torch.Tensor,
                         site_off: torch.Tensor, qkv: torch.Tensor, ss: torch.Tensor,
                         h: torch.Tensor, lse: torch.Tensor, s: torch.Tensor, m: torch.Tensor,
                         sizes: list[int], max_f: int, max_d: int, leak: float, norm_max: bool
                         ) -> torch.Tensor:
    """The gradient of the flat ``params`` (one tensor, laid out as they are) from dg (R,) and
    the folded affines' dgb (2·S,)."""
    from paam_fast.kernels import scoring as K

    u = table.shape[0]
    _, _, _, w, b, gamma, beta = _split(params, sizes, u)
    dh = w.shape[1]
    dev = tok.device
    # the gradient of a sum() arrives expanded (stride 0): the kernels index flat memory
    dg, dgb = dg.contiguous().float(), dgb.contiguous()
    dgout, dbout = dgb.split(gamma.numel())
    dqkv = _out(*qkv.shape, device=dev)  # attn_bwd_kernel writes every element
    # every element of the fp32 gradient is written by one of the two kernels (poisoned in
    # tests): no zero-fill; one cast at the end where the parameters are not fp32
    dflat = _out(params.numel(), device=dev)
    dwq, dwk, dwv, dw, db, dgamma, dbeta = _split(dflat, sizes, u)
    bl = _blocks(dev)
    K.attn_bwd_kernel[(u,)](
        qkv, ss, table, alive, w, b, h, lse, s, m, dg, gamma, beta, site_off, dgout, dbout,
        dgamma, dbeta, dqkv, dw, db, leak, 1.0 / math.sqrt(dh), TOKEN_EPS, ss.shape[1], DH=dh,
        NORM_MAX=norm_max, BLOCK_F=bl["BLOCK_F"], BLOCK_DH=_bdh(dh), IEEE=_ieee(),
        NFB_P2=_p2(ss.shape[1]))
    K.proj_bwd_kernel[(u, triton_cdiv(max_d, bl["BLOCK_K"]))](
        tok, dqkv, table, dwq, dwk, dwv, DH=dh, BLOCK_F=bl["BLOCK_F"], BLOCK_K=bl["BLOCK_K"],
        BLOCK_DH=_bdh(dh), IEEE=_ieee())
    return dflat.to(params.dtype)


@score_units_backward.register_fake
def _(dg, dgb, tok, params, alive, table, site_off, qkv, ss, h, lse, s, m, sizes, max_f, max_d,
      leak, norm_max):
    return torch.empty_like(params)


def _setup(ctx, inputs, output):
    tok, params, alive, table, site_off, sizes, max_f, max_d, leak, norm_max = inputs
    g, gb, qkv, ss, h, lse, s, m = output
    ctx.save_for_backward(tok, params, alive, table, site_off, qkv, ss, h, lse, s, m)
    ctx.cfg = (list(sizes), max_f, max_d, leak, norm_max)


def _backward(ctx, dg, dgb, *_unused):
    tok, params, alive, table, site_off, qkv, ss, h, lse, s, m = ctx.saved_tensors
    sizes, max_f, max_d, leak, norm_max = ctx.cfg
    if dg is None:
        dg = torch.zeros_like(s)
    if dgb is None:
        dgb = params.new_zeros(2 * sizes[5])
    dparams = score_units_backward(dg, dgb, tok, params, alive, table, site_off, qkv, ss, h,
                                   lse, s, m, sizes, max_f, max_d, leak, norm_max)
    return None, dparams, None, None, None, None, None, None, None, None


class UnitTable:
    """The device-side description of a model's units, built once per model (and rebuilt when
    masks change the alive counts).  Units are taken group-major, so every flat buffer is the
    concatenation of the shape groups' stacked tensors and gates come back as (G, F) views."""

    def __init__(self, ctrl) -> None:
        self.order = [i for idx in ctrl.group_units for i in idx]
        dev = ctrl.mask(0).device
        folded = set(ctrl._fold_sites)
        rows, tok, woff = 0, 0, 0
        tab, self.sites, site_off, flat = [], [], [], 0
        for gi, idx in enumerate(ctrl.group_units):
            d_tok = ctrl.groups[gi].wq.shape[1]
            f = ctrl.units[idx[0]].width
            for i in idx:
                mine = [n for n in ctrl.units[i].sites if n in folded]
                tab.append([f, d_tok, rows, tok, woff, 0, len(self.sites), len(mine)])
                for n in mine:  # the fold sites in table order: the flat γ/β layout
                    self.sites.append(n)
                    site_off.append(flat)
                    flat += f
                rows += f
                tok += f * d_tok
                woff += d_tok * ctrl.dim
        self.table_cpu = torch.tensor(tab, dtype=torch.int64)
        # one element at least: a kernel argument must have storage even when never read
        self.site_off = torch.tensor(site_off or [0], dtype=torch.int64, device=dev)
        self.rows = rows
        self.max_f = max(t[0] for t in tab)
        self.max_d = max(t[1] for t in tab)
        self.device = dev
        self.refresh(ctrl)

    def refresh(self, ctrl) -> None:
        """Alive masks and counts changed (selection events): update the device copies."""
        masks = [ctrl.mask(i) for i in self.order]
        self.table_cpu[:, 5] = torch.tensor([int(m.sum()) for m in masks])
        self.table = self.table_cpu.to(self.device)
        self.alive = torch.cat(masks).to(torch.int8)


score_units.register_autograd(_backward, setup_context=_setup)


class FlatGates(list):
    """The (G, F) gates of every shape group, views of one flat tensor ``flat`` (group-major,
    as ``torch.cat`` of the views would be).  The penalty reads ``flat``: a gradient through
    the views instead would zero-fill a buffer of the flat size once per group."""

    flat: torch.Tensor


def score_all(ctrl) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Gates of every unit of ``ctrl``'s model, as (G, F) per shape group (fp32), and the
    folded (γ', β') of every BN site in ``ctrl._fold_sites``, by site name."""
    tab = ctrl.__dict__.get("_triton_table")
    if tab is None or tab.device != ctrl.mask(0).device:
        tab = UnitTable(ctrl)
        ctrl._triton_table = tab
    tok = torch.cat([ctrl.tokens(i).reshape(-1) for i in tab.order]).float()
    # Every trainable input in one flat buffer: one launch forward, one backward (the
    # gradients meet again in one cat before autograd hands each parameter its slice).
    # The tokens stay apart: they take no gradient, and a zero-filled one would be large.
    mods = [ctrl._mods[n] for n in tab.sites]
    kinds = [[g.wq for g in ctrl.groups], [g.wk for g in ctrl.groups],
             [g.wv for g in ctrl.groups], [g.w for g in ctrl.groups], [g.b for g in ctrl.groups],
             [m.weight for m in mods], [m.bias for m in mods]]
    if not mods:  # no BN site to fold into: a dummy element each for γ and β
        dummy = ctrl.groups[0].b.new_zeros(1)
        kinds[5], kinds[6] = [dummy], [dummy]
    flat = torch.cat([t.reshape(-1) for ts in kinds for t in ts])
    sizes = [sum(t.numel() for t in ts) for ts in kinds]
    g, gb = score_units(tok, flat, tab.alive, tab.table, tab.site_off, sizes, tab.max_f,
                        tab.max_d, ctrl.leak, ctrl.normalize == "max")[:2]
    out, row = FlatGates(), 0
    for idx in ctrl.group_units:
        n, f = len(idx), ctrl.units[idx[0]].width
        out.append(g[row:row + n * f].view(n, f))
        row += n * f
    out.flat = g
    # one split of γ'‖β' into the sites' views: its backward is one cat
    per_site = [m.weight.shape[0] for m in mods]
    views = gb.split(per_site * 2) if mods else []
    folds = {n: (views[k], views[len(mods) + k]) for k, n in enumerate(tab.sites)}
    return out, folds

