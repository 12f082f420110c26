"""The fused Triton scoring path: registered ops around ``kernels/scoring.py``, with fake
implementations (torch.compile) and autograd, the per-model unit table, and the launch plan.

Forward: a ``torch.cat`` of the tokens and one of every trainable input, then
``proj_fwd_kernel`` (Q, K and the head's value path z = X·Wv·w), ``attn_fwd_kernel`` (per query
block) and ``gate_fwd_kernel`` (the unit's max, the gates, and the gated BN affines γ' = g·γ,
β' = g·β of every site: fresh tensors, never the Parameters).  Backward: ``attn_bwd_q_kernel``
(which also adds the folds' γ·dγ' + β·dβ' to dg and writes dγ = g·dγ', dβ = g·dβ'),
``attn_bwd_kv_kernel``, ``proj_bwd_kernel`` and ``dw_reduce_kernel``; no buffer needs
zero-filling.  The reference is ``paam_fast.scoring.score_batched``; the choice between them is
made in ``paam_fast.dispatch``.

Every launch goes through :func:`_launch`, so that :func:`record_launches` can capture the
exact kernels, arguments and constexprs the library uses (``paam_fast.bench.aot`` compiles them
ahead of time for sm_90 without a GPU) and the tile plan (:func:`plan`) is one function, checked
against the GPU's limits by that compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading

import torch

from .scoring import TOKEN_EPS

__all__ = ["UnitTable", "score_all", "plan", "dot_mode", "record_launches", "MAX_DIM",
           "LaunchPlan"]

# The largest attention width d the kernels take: BLOCK_DH = 128 tiles still fit the H200's
# shared memory and registers (the AOT compile test checks every plan up to it).  Larger `dim`
# runs on the reference (``paam_fast.info`` says so); forcing Triton there is an error.
MAX_DIM = 128

_DOTS = ("tf32x3", "ieee", "tf32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and warps of the scoring kernels for one (d, dtype, dot mode, target).

    block_f: rows of a unit per program (query / key block, projection row block);
    block_k: token columns per projection step; block_dh: the padded attention width;
    warps_attn / warps_proj: num_warps of the attention and projection kernels."""

    block_f: int
    block_k: int
    block_dh: int
    warps_attn: int
    warps_proj: int
    dot: str
    # ptxas's own register heuristic (triton 3.6's ptxas) stops at 128 and spills a few words
    # rather than take more; allowing up to 255 leaves it no reason to spill (it then uses
    # 110-200: an occupancy of 1-2 blocks per SM, plenty with hundreds of programs per launch)
    maxnreg: int = 255


def _p2(n: int) -> int:
    """The smallest power of two ≥ n (a Triton block size)."""
    return 1 << max(0, (n - 1).bit_length())


def dot_mode(dtype: torch.dtype) -> str:
    """The kernels' dot precision for parameters of ``dtype``.  Default: tensor cores at the
    accuracy PyTorch itself gets for that dtype — "tf32x3" (three TF32 products, about fp32)
    for fp32, the parameters' own type (fp32 accumulation) for bf16/fp16.
    ``PAAM_FAST_TRITON_DOT=ieee`` (fp32 FMA, no tensor cores) or ``tf32`` (one TF32 product,
    ~1e-3 relative) overrides it for fp32 models."""
    mode = os.environ.get("PAAM_FAST_TRITON_DOT", "auto")
    if mode not in ("auto", "ieee", "tf32", "tf32x3"):
        raise ValueError("PAAM_FAST_TRITON_DOT must be 'auto', 'ieee', 'tf32' or 'tf32x3', "
                         f"got {mode!r}")
    if dtype == torch.bfloat16:
        return "bf16" if mode == "auto" else mode
    if dtype == torch.float16:
        return "fp16" if mode == "auto" else mode
    return "tf32x3" if mode == "auto" else mode


def plan(dim: int, dtype: torch.dtype, target: str = "cuda") -> LaunchPlan:
    """The launch plan for attention width ``dim`` and parameters of ``dtype`` on ``target``
    ("cuda", or "cpu" for the interpreter's small tiles).  Raises ValueError naming ``dim``
    when no plan fits."""
    if dim > MAX_DIM:
        raise ValueError(f"the Triton scoring kernels take dim <= {MAX_DIM} (paamify(dim=...) / "
                         f"--dim), got {dim}; use PAAM_FAST_BACKEND=reference for wider scoring")
    bdh = max(16, _p2(dim))
    dot = dot_mode(dtype)
    if target == "cpu":  # the interpreter: small tiles are faster there, and its bf16 dots
        # are unusable (kernels/scoring.py: _bf16_rne), so bf16 operands are emulated
        return LaunchPlan(16, 16, bdh, 4, 4, "bf16emu" if dot == "bf16" else dot)
    # Chosen with the ahead-of-time compile (paam_fast.bench.aot, BENCHMARKS.md): the largest
    # tiles with no register spill on sm_90 at every width, tf32x3 (whose hi/lo operand split
    # doubles the live registers of a dot) being the tightest.  Every tile fits shared memory
    # with room to spare (the largest, BLOCK_DH = 128, needs ~90 KB of 227 KB).
    if bdh <= 32:
        block_f, block_k, warps_attn, warps_proj = 32, 32, 4, 8
    elif bdh <= 64:
        block_f, block_k, warps_attn, warps_proj = 32, 32, 8, 8
    else:
        block_f, block_k, warps_attn, warps_proj = 16, 16, 4, 8
    return LaunchPlan(block_f, block_k, bdh, warps_attn, warps_proj, dot)


_recording = threading.local()


@contextlib.contextmanager
def record_launches(target: str = "cuda"):
    """Capture every kernel launch of the scoring path instead of running it, with the tile
    plan of ``target`` whatever device the tensors are on.  Yields the list of launches, each
    ``(kernel, grid, args, kwargs)``; outputs are left unwritten."""
    prev = getattr(_recording, "state", None)
    launches: list = []
    _recording.state = (launches, target)
    try:
        yield launches
    finally:
        _recording.state = prev


def _target(device: torch.device) -> str:
    state = getattr(_recording, "state", None)
    if state is not None:
        return state[1]
    return "cpu" if device.type == "cpu" else "cuda"


def _interpreter_compat() -> None:
    """Triton 3.6's CPU interpreter turns a scalar into a Python int with ``int(array)``, and
    its scalars are 1-element arrays, which NumPy 2 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"): every ``range(0, f, ...)`` over a loaded F fails there.
    Triton 3.8 squeezes the array first; this applies the same fix to older interpreters.
    Only the interpreter (TRITON_INTERPRET=1) is touched: compiled kernels never see it."""
    if getattr(_interpreter_compat, "done", False):
        return
    _interpreter_compat.done = True
    try:
        from triton.runtime import interpreter
    except Exception:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_paam_squeezed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._paam_squeezed = True
    interpreter._patch_lang_tensor = patched


def _launch(kernel, grid, *args, **kwargs) -> None:
    state = getattr(_recording, "state", None)
    if state is not None:
        state[0].append((kernel, grid, args, kwargs))
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        _interpreter_compat()
    kernel[grid](*args, **kwargs)


def _split(params: torch.Tensor, sizes: list[int], units: int):
    """The views wq, wk, wv (W,), w (U, DH), b (U,), gamma, beta (S,) of the flat inputs."""
    wq, wk, wv, w, b, gamma, beta = params.split(sizes)
    return wq, wk, wv, w.view(units, -1), b, gamma, beta


def _nfb(max_f: int, pl: LaunchPlan) -> int:
    return triton_cdiv(max_f, pl.block_f)


@torch.library.custom_op("paam_fast::score_units", mutates_args=())
def score_units(tok: torch.Tensor, params: torch.Tensor, alive: torch.Tensor,
                table: torch.Tensor, site_off: torch.Tensor, sizes: list[int], max_f: int,
                max_d: int, leak: float, norm_max: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gates of every unit. tok (T,) the tokens (the parameters' dtype); params the trainable
    inputs in one flat tensor: wq, wk, wv (W,), w (U·DH,), b (U,), and the sites' BN affines
    gamma, beta (S,), of the lengths ``sizes``; alive (R,) int8, table (U, 8) int64,
    site_off (sites,) int64.  Returns g (R,) fp32, the folded affines γ' then β' in one
    (2·S,) tensor, and the saved state qk (R, 2·DH), z (R,), ss (U, NFB), e (R,), lse (R,),
    s (R,), m (U,)."""
    from paam_fast.kernels import scoring as K

    u = table.shape[0]
    wq, wk, wv, w, b, gamma, beta = _split(params, sizes, u)
    dh = w.shape[1]
    r = alive.numel()
    dev = tok.device
    pl = plan(dh, params.dtype, _target(dev))
    nfb = _nfb(max_f, pl)
    qk, z = _out(r, 2 * dh, device=dev), _out(r, device=dev)
    e, lse, s, g = (_out(r, device=dev) for _ in range(4))
    ss, bmax = _out(u, nfb, device=dev), _out(u, nfb, device=dev)  # every element written
    m = _out(u, device=dev)
    gb = _like(params.new_empty(2 * gamma.numel()))
    gout, bout = gb.split(gamma.numel())
    _launch(K.proj_fwd_kernel, (u, nfb), tok, wq, wk, wv, w, alive, table, qk, z, ss, dh,
            BLOCK_F=pl.block_f, BLOCK_K=pl.block_k, BLOCK_DH=pl.block_dh, DOT=pl.dot,
            num_warps=pl.warps_proj, maxnreg=pl.maxnreg)
    _launch(K.attn_fwd_kernel, (u, nfb), qk, z, ss, table, alive, b, e, lse, s, bmax, leak,
            1.0 / math.sqrt(dh), TOKEN_EPS, nfb, dh, BLOCK_F=pl.block_f,
            BLOCK_DH=pl.block_dh, DOT=pl.dot, NFB_P2=_p2(nfb), num_warps=pl.warps_attn,
            maxnreg=pl.maxnreg)
    _launch(K.gate_fwd_kernel, (u, nfb), s, bmax, table, m, g, gamma, beta, site_off, gout,
            bout, nfb, NORM_MAX=norm_max, BLOCK_F=pl.block_f, NFB_P2=_p2(nfb), num_warps=4)
    return g, gb, qk, z, ss, e, lse, s, m


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


def triton_cdiv(a: int, b: int) -> int:
    return max(1, -(-a // b))


@score_units.register_fake
def _(tok, params, alive, table, site_off, sizes, max_f, max_d, leak, norm_max):
    u = table.shape[0]
    dh = sizes[3] // u
    r = alive.shape[0]
    new = lambda *s: tok.new_empty(s, dtype=torch.float32)
    nfb = _nfb(max_f, plan(dh, params.dtype, _target(tok.device)))
    return (new(r), params.new_empty(2 * sizes[5]), new(r, 2 * dh), new(r), new(u, nfb),
            new(r), new(r), new(r), new(u))


@torch.library.custom_op("paam_fast::score_units_backward", mutates_args=())
def score_units_backward(dg: torch.Tensor, dgb: torch.Tensor, tok: torch.Tensor,
                         params: torch.Tensor, alive: torch.Tensor, table: torch.Tensor,
                         site_off: torch.Tensor, qk: torch.Tensor, z: torch.Tensor,
                         ss: torch.Tensor, e: torch.Tensor, lse: torch.Tensor, s: torch.Tensor,
                         m: torch.Tensor, sizes: list[int], max_f: int, max_d: int,
                         leak: float, norm_max: bool) -> torch.Tensor:
    """The gradient of the flat ``params`` (one tensor, laid out as they are) from dg (R,) and
    the folded affines' dgb (2·S,)."""
    from paam_fast.kernels import scoring as K

    u = table.shape[0]
    wq, wk, wv, w, b, gamma, beta = _split(params, sizes, u)
    dh = w.shape[1]
    dev = tok.device
    pl = plan(dh, params.dtype, _target(dev))
    nfb = ss.shape[1]
    nkb = triton_cdiv(max_d, pl.block_k)
    # the gradient of a sum() arrives expanded (stride 0): the kernels index flat memory
    dg, dgb = dg.contiguous().float(), dgb.contiguous()
    dgout, dbout = dgb.split(gamma.numel())
    r = alive.numel()
    # every element of these is written by the kernels (NaN-poisoned in tests): no zero-fill
    dqk, dz, de = _out(r, 2 * dh, device=dev), _out(r, device=dev), _out(r, device=dev)
    dwp = _out(u, nkb, dh, device=dev)
    # one cast at the end where the parameters are not fp32
    dflat = _out(params.numel(), device=dev)
    dwq, dwk, dwv, dw, db, dgamma, dbeta = _split(dflat, sizes, u)
    scale = 1.0 / math.sqrt(dh)
    _launch(K.attn_bwd_q_kernel, (u, nfb), qk, z, ss, table, alive, b, e, lse, s, m, dg, gamma,
            beta, site_off, dgout, dbout, dgamma, dbeta, de, dqk, leak, scale, TOKEN_EPS, nfb,
            dh, NORM_MAX=norm_max, BLOCK_F=pl.block_f, BLOCK_DH=pl.block_dh, DOT=pl.dot,
            NFB_P2=_p2(nfb), num_warps=pl.warps_attn, maxnreg=pl.maxnreg)
    _launch(K.attn_bwd_kv_kernel, (u, nfb), qk, z, ss, table, alive, b, e, lse, de, dqk, dz, db,
            scale, TOKEN_EPS, nfb, dh, BLOCK_F=pl.block_f, BLOCK_DH=pl.block_dh, DOT=pl.dot,
            NFB_P2=_p2(nfb), num_warps=pl.warps_attn, maxnreg=pl.maxnreg)
    _launch(K.proj_bwd_kernel, (u, nkb), tok, dqk, dz, table, wv, w, dwq, dwk, dwv, dwp, dh,
            BLOCK_F=pl.block_f, BLOCK_K=pl.block_k, BLOCK_DH=pl.block_dh, DOT=pl.dot,
            num_warps=pl.warps_proj, maxnreg=pl.maxnreg)
    _launch(K.dw_reduce_kernel, (u,), dwp, dw, nkb, dh, BLOCK_R=32, BLOCK_DH=pl.block_dh,
            num_warps=4)
    return dflat.to(params.dtype)


@score_units_backward.register_fake
def _(dg, dgb, tok, params, alive, table, site_off, qk, z, ss, e, lse, s, m, sizes, max_f,
      max_d, leak, norm_max):
    return torch.empty_like(params)


def _setup(ctx, inputs, output):
    tok, params, alive, table, site_off, sizes, max_f, max_d, leak, norm_max = inputs
    g, gb, qk, z, ss, e, lse, s, m = output
    ctx.save_for_backward(tok, params, alive, table, site_off, qk, z, ss, e, lse, s, m)
    ctx.cfg = (list(sizes), max_f, max_d, leak, norm_max)


def _backward(ctx, dg, dgb, *_unused):
    tok, params, alive, table, site_off, qk, z, ss, e, lse, s, m = ctx.saved_tensors
    sizes, max_f, max_d, leak, norm_max = ctx.cfg
    if dg is None:
        dg = torch.zeros_like(s)
    if dgb is None:
        dgb = params.new_zeros(2 * sizes[5])
    dparams = score_units_backward(dg, dgb, tok, params, alive, table, site_off, qk, z, ss, e,
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
    # the tokens in the weights' own dtype: this cat moves the whole model's conv weights, so
    # a bf16 model's tokens stay bf16 (half the bytes); the kernels accumulate in fp32
    tok = torch.cat([ctrl.tokens(i).reshape(-1) for i in tab.order])
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
    tok = tok.to(flat.dtype)
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

