"""Fused Triton kernels of the scoring network (PAAM_METHOD.md §3), for every unit of a model at
once: three launches forward, four backward, whatever the depth, and no buffer to zero-fill.

The head makes the value path rank one.  With z = X·(Wv·w) (one number per filter),

    e_i = (P·V)_i·w + b = Σ_j P_ij z_j + b,

so V is never formed: the attention is S = Q·Kᵀ/√d (a tensor-core dot) followed by a
P-weighted sum of z.  Backward, with de_i = dL/de_i and ẑ_i = e_i − b:

    dz_j = Σ_i P_ij de_i,   dS_ij = P_ij de_i (z_j − ẑ_i),   dQ = dS·K/√d,   dK = dSᵀ·Q/√d,
    dWv = (Xᵀ dz)·wᵀ,       dw = Wvᵀ·(Xᵀ dz),               db = Σ_i de_i.

The work is spread over the GPU by query block (forward, dQ) and key block (dK, dz): a program
owns BLOCK_F rows of one unit, so a 2,048-filter unit is 32 programs, not one.  The per-unit max
of the gate (g = s / max s) crosses blocks: ``attn_fwd_kernel`` writes one max per block and
``gate_fwd_kernel`` reduces them; backward, every query-block program recomputes the unit's
Σ dg·s (F loads, cheap beside its F·BLOCK_F·d dot) instead of a launch more.

Layout ("group-major" unit order, built once per model by ``paam_fast.triton_scoring``):
  tok    flat tokens: unit u's (F_u, D_u) raw filter matrix, row-major, at table[u, TOK] (fp32)
  wq/wk/wv  flat projections: unit u's (D_u, DH) matrix at table[u, WOFF]
  w (U, DH) head weights, b (U,) head biases
  alive  (R,) int8, R = Σ F_u: 1 for alive filters; rows of unit u start at table[u, ROW]
  table  (U, 8) int64: F, D, ROW, TOK, WOFF, N_ALIVE, SITE0, NSITE
  gamma/beta  flat affine parameters of the BN sites the gates fold into (γ' = g·γ, β' = g·β):
         unit u's sites are site_off[SITE0 .. SITE0 + NSITE), each the offset of F_u values
Saved between the passes (fp32): qk (R, 2·DH) raw projections X·Wq ‖ X·Wk, z (R,) raw X·Wv·w,
ss (U, NFB) Σ of squared alive tokens per block of BLOCK_F rows (summed in a fixed order: no
atomics, the same rms on every run), e (R,) head output, lse (R,) softmax log-normaliser,
s (R,) leaky-exp scores, bmax (U, NFB) per-block max of s, m (U,) per-unit max; outputs g (R,),
and gout/bout the folded γ', β' (same layout as gamma/beta).
The rms scale r = (ss / (N_ALIVE·D) + eps)^-1/2 is applied to the raw projections (Q = r·X·Wq),
so tokens are never rescaled in memory.

Dots (constexpr DOT): "tf32x3" for fp32 parameters (three TF32 tensor-core products, about fp32
accuracy), "bf16"/"fp16" for half-precision parameters (operands in that type, fp32
accumulation, as PyTorch's own half matmuls), "ieee" (plain fp32 FMA) and "tf32" on request.
"""

import triton
import triton.language as tl

TAB_F, TAB_D, TAB_ROW, TAB_TOK, TAB_WOFF, TAB_NALIVE, TAB_SITE0, TAB_NSITE = range(8)
TABLE_COLS = 8
DOT_MODES = ("tf32x3", "ieee", "tf32", "bf16", "fp16", "bf16emu")


@triton.jit
def _bf16_rne(x):
    # x (fp32) rounded to the nearest bf16 value (ties to even), kept in fp32.  The CPU
    # interpreter's bf16 is not usable for this: its casts truncate and its bf16 dots return
    # garbage (triton 3.8), so "bf16emu" computes there what the tensor cores compute on the
    # GPU: exact products of bf16 operands, accumulated in fp32.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, DOT: tl.constexpr):
    """acc + a·b with fp32 accumulation, operands as DOT says."""
    if DOT == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif DOT == "bf16emu":
        return tl.dot(_bf16_rne(a.to(tl.float32)), _bf16_rne(b.to(tl.float32)), acc,
                      input_precision="ieee")
    elif DOT == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT)


@triton.jit
def _leaky_exp(e, leak):
    # exp(e) for e <= 0, 1 + leak·e above; the exp argument is clamped so the unused branch
    # cannot overflow.
    return tl.where(e <= 0, tl.exp(tl.minimum(e, 0.0)), 1.0 + leak * e)


@triton.jit
def _scalar(ptr):
    # A scalar read from memory, as a 0-d value on every Triton version (the 3.6 interpreter
    # hands back a 1-element array, which range() cannot take).
    return tl.sum(tl.load(ptr + tl.arange(0, 1)), axis=0)


@triton.jit
def _unit(table_ptr, u):
    """Row u of the unit table: F, D, first row, token offset, weight offset, alive count."""
    base = table_ptr + u * 8
    return (_scalar(base + 0), _scalar(base + 1), _scalar(base + 2), _scalar(base + 3),
            _scalar(base + 4), _scalar(base + 5))


@triton.jit
def _sites(table_ptr, u):
    """First site index and number of sites of unit u (BN affines its gates fold into)."""
    base = table_ptr + u * 8
    return _scalar(base + 6), _scalar(base + 7)


@triton.jit
def _rms_scale(ss_ptr, u, nfb, n_alive, d, eps, NFB_P2: tl.constexpr):
    """r = (Σ x² / (N_ALIVE·D) + eps)^-1/2 of unit u, from its per-block partial sums."""
    parts = tl.arange(0, NFB_P2)
    ss = tl.sum(tl.load(ss_ptr + u * nfb + parts, mask=parts < nfb, other=0.0), axis=0)
    return 1.0 / tl.sqrt(ss / (n_alive * d).to(tl.float32) + eps)


@triton.jit
def _dg_total(dg_ptr, gamma_ptr, beta_ptr, dgout_ptr, dbout_ptr, site_off_ptr, site0, nsite,
              row0, ri, imask):
    """dL/dg of rows ri: the gates' own gradient plus, through every site's fold,
    γ·dL/dγ' + β·dL/dβ'."""
    dg = tl.load(dg_ptr + row0 + ri, mask=imask, other=0.0)
    for si in range(site0, site0 + nsite):
        off = _scalar(site_off_ptr + si) + ri
        ga = tl.load(gamma_ptr + off, mask=imask, other=0.0).to(tl.float32)
        be = tl.load(beta_ptr + off, mask=imask, other=0.0).to(tl.float32)
        dga = tl.load(dgout_ptr + off, mask=imask, other=0.0).to(tl.float32)
        dbe = tl.load(dbout_ptr + off, mask=imask, other=0.0).to(tl.float32)
        dg += ga * dga + be * dbe
    return dg


@triton.jit
def proj_fwd_kernel(tok_ptr, wq_ptr, wk_ptr, wv_ptr, w_ptr, alive_ptr, table_ptr, qk_ptr, z_ptr,
                    ss_ptr, DH, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DH: tl.constexpr, DOT: tl.constexpr):
    """Grid (U, NFB = ceil(max F / BLOCK_F)): raw X·Wq, X·Wk and z = X·(Wv·w) of BLOCK_F rows
    of unit u, and their Σ x² over alive rows into ss[u, fb] (0 for blocks past the unit's F)."""
    u = tl.program_id(0)
    fb = tl.program_id(1)
    nfb = tl.num_programs(1)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    if fb * BLOCK_F >= f:
        tl.store(ss_ptr + u * nfb + fb, 0.0)
    else:
        rows = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        rmask = rows < f
        cols = tl.arange(0, BLOCK_DH)
        cmask = cols < DH
        wh = tl.load(w_ptr + u * DH + cols, mask=cmask, other=0.0).to(tl.float32)
        accq = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        acck = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        z = tl.zeros((BLOCK_F,), dtype=tl.float32)
        sq = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d
            x = tl.load(tok_ptr + toff + rows[:, None].to(tl.int64) * d + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
            woffs = woff + ks[:, None].to(tl.int64) * DH + cols[None, :]
            wmask = kmask[:, None] & cmask[None, :]
            accq = _dot(x, tl.load(wq_ptr + woffs, mask=wmask, other=0.0), accq, DOT)
            acck = _dot(x, tl.load(wk_ptr + woffs, mask=wmask, other=0.0), acck, DOT)
            # Wv·w for these BLOCK_K token columns: a vector, so z costs F·D, not F·D·d
            wvw = tl.sum(tl.load(wv_ptr + woffs, mask=wmask, other=0.0).to(tl.float32)
                         * wh[None, :], axis=1)
            z += tl.sum(x * wvw[None, :], axis=1)
        alive = tl.load(alive_ptr + row0 + rows, mask=rmask, other=0)
        tl.store(ss_ptr + u * nfb + fb, tl.sum(tl.where(alive != 0, sq, 0.0), axis=0))
        out = qk_ptr + (row0 + rows[:, None]).to(tl.int64) * (2 * DH) + cols[None, :]
        omask = rmask[:, None] & cmask[None, :]
        tl.store(out, accq, mask=omask)
        tl.store(out + DH, acck, mask=omask)
        tl.store(z_ptr + row0 + rows, z, mask=rmask)


@triton.jit
def attn_fwd_kernel(qk_ptr, z_ptr, ss_ptr, table_ptr, alive_ptr, b_ptr, e_ptr, lse_ptr, s_ptr,
                    bmax_ptr, leak, scale, eps, nfb, DH, BLOCK_F: tl.constexpr,
                    BLOCK_DH: tl.constexpr, DOT: tl.constexpr, NFB_P2: tl.constexpr):
    """Grid (U, NFB): BLOCK_F query rows of unit u against all its alive keys (flash-style
    online softmax of Q·Kᵀ/√d, weighting z), the head e, the leaky-exp s, and the block's max
    of s into bmax[u, qb] (0 for blocks past the unit's F)."""
    u = tl.program_id(0)
    qb = tl.program_id(1)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    if qb * BLOCK_F >= f:
        tl.store(bmax_ptr + u * nfb + qb, 0.0)
    else:
        r = _rms_scale(ss_ptr, u, nfb, n_alive, d, eps, NFB_P2)
        cols = tl.arange(0, BLOCK_DH)
        cmask = cols < DH
        bh = _scalar(b_ptr + u).to(tl.float32)
        ri = qb * BLOCK_F + tl.arange(0, BLOCK_F)
        imask = ri < f
        qrow = qk_ptr + (row0 + ri[:, None]).to(tl.int64) * (2 * DH) + cols[None, :]
        q = tl.load(qrow, mask=imask[:, None] & cmask[None, :], other=0.0) * (r * scale)
        m_i = tl.full((BLOCK_F,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_F,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for j0 in range(0, f, BLOCK_F):
            rj = j0 + tl.arange(0, BLOCK_F)
            jmask = rj < f
            krow = qk_ptr + (row0 + rj[:, None]).to(tl.int64) * (2 * DH) + DH + cols[None, :]
            kt = tl.load(krow, mask=jmask[:, None] & cmask[None, :], other=0.0) * r
            zj = tl.load(z_ptr + row0 + rj, mask=jmask, other=0.0) * r
            sij = _dot(q, tl.trans(kt), tl.zeros((BLOCK_F, BLOCK_F), dtype=tl.float32), DOT)
            key_ok = jmask & (tl.load(alive_ptr + row0 + rj, mask=jmask, other=0) != 0)
            sij = tl.where(key_ok[None, :], sij, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sij, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sij - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha + tl.sum(p * zj[None, :], axis=1)
            m_i = m_new
        e = acc / l_i + bh
        alive_i = imask & (tl.load(alive_ptr + row0 + ri, mask=imask, other=0) != 0)
        s = tl.where(alive_i, _leaky_exp(e, leak), 0.0)
        tl.store(e_ptr + row0 + ri, e, mask=imask)
        tl.store(lse_ptr + row0 + ri, m_i + tl.log(l_i), mask=imask)
        tl.store(s_ptr + row0 + ri, s, mask=imask)
        tl.store(bmax_ptr + u * nfb + qb, tl.max(s, axis=0))  # s >= 0: padding adds nothing


@triton.jit
def gate_fwd_kernel(s_ptr, bmax_ptr, table_ptr, m_ptr, g_ptr, gamma_ptr, beta_ptr,
                    site_off_ptr, gout_ptr, bout_ptr, nfb, NORM_MAX: tl.constexpr,
                    BLOCK_F: tl.constexpr, NFB_P2: tl.constexpr):
    """Grid (U, NFB): the unit's max m (from the block maxima), the gates g = s / m of BLOCK_F
    rows, and those rows folded into every site's BN affine (γ' = g·γ, β' = g·β)."""
    u = tl.program_id(0)
    qb = tl.program_id(1)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    if qb * BLOCK_F < f:
        parts = tl.arange(0, NFB_P2)
        m = tl.max(tl.load(bmax_ptr + u * nfb + parts, mask=parts < nfb, other=0.0), axis=0)
        if qb == 0:
            tl.store(m_ptr + u, m)
        ri = qb * BLOCK_F + tl.arange(0, BLOCK_F)
        imask = ri < f
        s = tl.load(s_ptr + row0 + ri, mask=imask, other=0.0)
        if NORM_MAX:
            s = s / m
        tl.store(g_ptr + row0 + ri, s, mask=imask)
        site0, nsite = _sites(table_ptr, u)
        for si in range(site0, site0 + nsite):
            off = _scalar(site_off_ptr + si) + ri
            ga = tl.load(gamma_ptr + off, mask=imask, other=0.0).to(tl.float32)
            be = tl.load(beta_ptr + off, mask=imask, other=0.0).to(tl.float32)
            tl.store(gout_ptr + off, (s * ga).to(gout_ptr.dtype.element_ty), mask=imask)
            tl.store(bout_ptr + off, (s * be).to(bout_ptr.dtype.element_ty), mask=imask)


@triton.jit
def attn_bwd_q_kernel(qk_ptr, z_ptr, ss_ptr, table_ptr, alive_ptr, b_ptr, e_ptr, lse_ptr, s_ptr,
                      m_ptr, dg_ptr, gamma_ptr, beta_ptr, site_off_ptr, dgout_ptr, dbout_ptr,
                      dgamma_ptr, dbeta_ptr, de_ptr, dqk_ptr, leak, scale, eps, nfb, DH,
                      NORM_MAX: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DH: tl.constexpr,
                      DOT: tl.constexpr, NFB_P2: tl.constexpr):
    """Grid (U, NFB): for BLOCK_F query rows of unit u, from dg (and the folded affines'
    dγ', dβ') to the sites' dγ = g·dγ', dβ = g·dβ', de (R,) and the raw dQ (into dqk[:, :DH])."""
    u = tl.program_id(0)
    qb = tl.program_id(1)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    if qb * BLOCK_F < f:
        r = _rms_scale(ss_ptr, u, nfb, n_alive, d, eps, NFB_P2)
        m = _scalar(m_ptr + u)
        bh = _scalar(b_ptr + u).to(tl.float32)
        site0, nsite = _sites(table_ptr, u)
        # g = s / max s: the max's gradient, shared equally by tied maxima (as torch.amax), needs
        # Σ dg·s over the whole unit; each program sums it itself (F reads) rather than a launch
        dm = 0.0
        cnt = 0.0
        if NORM_MAX:
            dm_acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
            cnt_acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
            for a0 in range(0, f, BLOCK_F):
                ra = a0 + tl.arange(0, BLOCK_F)
                amask = ra < f
                sa = tl.load(s_ptr + row0 + ra, mask=amask, other=0.0)
                dga = _dg_total(dg_ptr, gamma_ptr, beta_ptr, dgout_ptr, dbout_ptr,
                                site_off_ptr, site0, nsite, row0, ra, amask)
                dm_acc += -dga * sa / (m * m)
                cnt_acc += tl.where(amask & (sa == m), 1.0, 0.0)
            dm = tl.sum(dm_acc, axis=0)
            cnt = tl.sum(cnt_acc, axis=0)
        ri = qb * BLOCK_F + tl.arange(0, BLOCK_F)
        imask = ri < f
        alive_i = imask & (tl.load(alive_ptr + row0 + ri, mask=imask, other=0) != 0)
        s = tl.load(s_ptr + row0 + ri, mask=imask, other=0.0)
        dg = _dg_total(dg_ptr, gamma_ptr, beta_ptr, dgout_ptr, dbout_ptr, site_off_ptr, site0,
                       nsite, row0, ri, imask)
        gi = s / m if NORM_MAX else s
        for si in range(site0, site0 + nsite):
            off = _scalar(site_off_ptr + si) + ri
            dga = tl.load(dgout_ptr + off, mask=imask, other=0.0).to(tl.float32)
            dbe = tl.load(dbout_ptr + off, mask=imask, other=0.0).to(tl.float32)
            tl.store(dgamma_ptr + off, gi * dga, mask=imask)
            tl.store(dbeta_ptr + off, gi * dbe, mask=imask)
        if NORM_MAX:
            ds = dg / m + tl.where(s == m, dm / cnt, 0.0)
        else:
            ds = dg
        e = tl.load(e_ptr + row0 + ri, mask=imask, other=0.0)
        de = tl.where(alive_i, ds * tl.where(e <= 0, tl.exp(tl.minimum(e, 0.0)), leak), 0.0)
        tl.store(de_ptr + row0 + ri, de, mask=imask)
        zhat = e - bh
        lse = tl.load(lse_ptr + row0 + ri, mask=imask, other=0.0)
        cols = tl.arange(0, BLOCK_DH)
        cmask = cols < DH
        qmask = imask[:, None] & cmask[None, :]
        qrow = qk_ptr + (row0 + ri[:, None]).to(tl.int64) * (2 * DH) + cols[None, :]
        q = tl.load(qrow, mask=qmask, other=0.0) * (r * scale)
        dq = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        for j0 in range(0, f, BLOCK_F):
            rj = j0 + tl.arange(0, BLOCK_F)
            jmask = rj < f
            krow = qk_ptr + (row0 + rj[:, None]).to(tl.int64) * (2 * DH) + DH + cols[None, :]
            kt = tl.load(krow, mask=jmask[:, None] & cmask[None, :], other=0.0) * r
            zj = tl.load(z_ptr + row0 + rj, mask=jmask, other=0.0) * r
            sij = _dot(q, tl.trans(kt), tl.zeros((BLOCK_F, BLOCK_F), dtype=tl.float32), DOT)
            key_ok = jmask & (tl.load(alive_ptr + row0 + rj, mask=jmask, other=0) != 0)
            p = tl.where(imask[:, None] & key_ok[None, :], tl.exp(sij - lse[:, None]), 0.0)
            dsij = p * de[:, None] * (zj[None, :] - zhat[:, None])
            dq = _dot(dsij, kt, dq, DOT)
        tl.store(dqk_ptr + (row0 + ri[:, None]).to(tl.int64) * (2 * DH) + cols[None, :],
                 dq * (r * scale), mask=qmask)


@triton.jit
def attn_bwd_kv_kernel(qk_ptr, z_ptr, ss_ptr, table_ptr, alive_ptr, b_ptr, e_ptr, lse_ptr,
                       de_ptr, dqk_ptr, dz_ptr, db_ptr, scale, eps, nfb, DH,
                       BLOCK_F: tl.constexpr, BLOCK_DH: tl.constexpr, DOT: tl.constexpr,
                       NFB_P2: tl.constexpr):
    """Grid (U, NFB): for BLOCK_F key rows of unit u, the raw dK (into dqk[:, DH:]) and dz
    (both summed over all query rows here: no atomics), and, in block 0, db = Σ de."""
    u = tl.program_id(0)
    kb = tl.program_id(1)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    if kb * BLOCK_F < f:
        r = _rms_scale(ss_ptr, u, nfb, n_alive, d, eps, NFB_P2)
        bh = _scalar(b_ptr + u).to(tl.float32)
        cols = tl.arange(0, BLOCK_DH)
        cmask = cols < DH
        rj = kb * BLOCK_F + tl.arange(0, BLOCK_F)
        jmask = rj < f
        kmask = jmask[:, None] & cmask[None, :]
        krow = qk_ptr + (row0 + rj[:, None]).to(tl.int64) * (2 * DH) + DH + cols[None, :]
        kt = tl.load(krow, mask=kmask, other=0.0) * r
        zj = tl.load(z_ptr + row0 + rj, mask=jmask, other=0.0) * r
        key_ok = jmask & (tl.load(alive_ptr + row0 + rj, mask=jmask, other=0) != 0)
        dk = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        dz = tl.zeros((BLOCK_F,), dtype=tl.float32)
        db = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for i0 in range(0, f, BLOCK_F):
            ri = i0 + tl.arange(0, BLOCK_F)
            imask = ri < f
            qrow = qk_ptr + (row0 + ri[:, None]).to(tl.int64) * (2 * DH) + cols[None, :]
            q = tl.load(qrow, mask=imask[:, None] & cmask[None, :], other=0.0) * (r * scale)
            lse = tl.load(lse_ptr + row0 + ri, mask=imask, other=0.0)
            de = tl.load(de_ptr + row0 + ri, mask=imask, other=0.0)
            zhat = tl.load(e_ptr + row0 + ri, mask=imask, other=0.0) - bh
            sij = _dot(q, tl.trans(kt), tl.zeros((BLOCK_F, BLOCK_F), dtype=tl.float32), DOT)
            p = tl.where(imask[:, None] & key_ok[None, :], tl.exp(sij - lse[:, None]), 0.0)
            pde = p * de[:, None]
            dz += tl.sum(pde, axis=0)
            dsij = pde * (zj[None, :] - zhat[:, None])
            dk = _dot(tl.trans(dsij), q, dk, DOT)
            db += de
        tl.store(dqk_ptr + (row0 + rj[:, None]).to(tl.int64) * (2 * DH) + DH + cols[None, :],
                 dk * r, mask=kmask)
        tl.store(dz_ptr + row0 + rj, dz * r, mask=jmask)
        if kb == 0:
            tl.store(db_ptr + u, tl.sum(db, axis=0))


@triton.jit
def proj_bwd_kernel(tok_ptr, dqk_ptr, dz_ptr, table_ptr, wv_ptr, w_ptr, dwq_ptr, dwk_ptr,
                    dwv_ptr, dwp_ptr, DH, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DH: tl.constexpr, DOT: tl.constexpr):
    """Grid (U, NKB = ceil(max D / BLOCK_K)): for BLOCK_K token columns of unit u,
    dWq = Xᵀ·dQraw, dWk = Xᵀ·dKraw, t = Xᵀ·dz, dWv = t·wᵀ, and this block's share of
    dw = Wvᵀ·t into dwp[u, kb] (0 for blocks past the unit's D)."""
    u = tl.program_id(0)
    kb = tl.program_id(1)
    nkb = tl.num_programs(1)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    cols = tl.arange(0, BLOCK_DH)
    cmask = cols < DH
    if kb * BLOCK_K >= d:
        tl.store(dwp_ptr + (u * nkb + kb) * DH + cols, tl.zeros((BLOCK_DH,), tl.float32),
                 mask=cmask)
    else:
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < d
        aq = tl.zeros((BLOCK_K, BLOCK_DH), dtype=tl.float32)
        ak = tl.zeros((BLOCK_K, BLOCK_DH), dtype=tl.float32)
        t = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for i0 in range(0, f, BLOCK_F):
            ri = i0 + tl.arange(0, BLOCK_F)
            imask = ri < f
            # Xᵀ loaded as such (BLOCK_K, BLOCK_F): no transpose of a register tile
            xt = tl.load(tok_ptr + toff + ri[None, :].to(tl.int64) * d + ks[:, None],
                         mask=kmask[:, None] & imask[None, :], other=0.0).to(tl.float32)
            drow = dqk_ptr + (row0 + ri[:, None]).to(tl.int64) * (2 * DH) + cols[None, :]
            dmask = imask[:, None] & cmask[None, :]
            aq = _dot(xt, tl.load(drow, mask=dmask, other=0.0), aq, DOT)
            ak = _dot(xt, tl.load(drow + DH, mask=dmask, other=0.0), ak, DOT)
            dz = tl.load(dz_ptr + row0 + ri, mask=imask, other=0.0)
            t += tl.sum(xt * dz[None, :], axis=1)
        woffs = woff + ks[:, None].to(tl.int64) * DH + cols[None, :]
        wmask = kmask[:, None] & cmask[None, :]
        wh = tl.load(w_ptr + u * DH + cols, mask=cmask, other=0.0).to(tl.float32)
        wv = tl.load(wv_ptr + woffs, mask=wmask, other=0.0).to(tl.float32)
        tl.store(dwq_ptr + woffs, aq, mask=wmask)
        tl.store(dwk_ptr + woffs, ak, mask=wmask)
        tl.store(dwv_ptr + woffs, t[:, None] * wh[None, :], mask=wmask)
        tl.store(dwp_ptr + (u * nkb + kb) * DH + cols, tl.sum(wv * t[:, None], axis=0),
                 mask=cmask)


@triton.jit
def dw_reduce_kernel(dwp_ptr, dw_ptr, nkb, DH, BLOCK_R: tl.constexpr, BLOCK_DH: tl.constexpr):
    """Grid (U,): dw[u] = Σ over the D blocks of dwp[u, :] (a fixed order: deterministic)."""
    u = tl.program_id(0)
    cols = tl.arange(0, BLOCK_DH)
    cmask = cols < DH
    acc = tl.zeros((BLOCK_R, BLOCK_DH), dtype=tl.float32)
    for k0 in range(0, nkb, BLOCK_R):
        kr = k0 + tl.arange(0, BLOCK_R)
        acc += tl.load(dwp_ptr + (u * nkb + kr[:, None]) * DH + cols[None, :],
                       mask=(kr[:, None] < nkb) & cmask[None, :], other=0.0)
    tl.store(dw_ptr + u * DH + cols, tl.sum(acc, axis=0), mask=cmask)
