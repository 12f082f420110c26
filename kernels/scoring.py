"""Fused Triton kernels of the scoring network (PAAM_METHOD.md §3), for every unit of a model at
once: two launches forward, two backward, whatever the depth, and no buffer to zero-fill.

Layout ("group-major" unit order, built once per model by ``paam_fast.triton_scoring``):
  tok    flat tokens: unit u's (F_u, D_u) raw filter matrix, row-major, at table[u, TOK]
  wq/wk/wv  flat projections: unit u's (D_u, DH) matrix at table[u, WOFF]
  w (U, DH) head weights, b (U,) head biases
  alive  (R,) int8, R = Σ F_u: 1 for alive filters; rows of unit u start at table[u, ROW]
  table  (U, 8) int64: F, D, ROW, TOK, WOFF, N_ALIVE, SITE0, NSITE
  gamma/beta  flat affine parameters of the BN sites the gates fold into (γ' = g·γ, β' = g·β):
         unit u's sites are site_off[SITE0 .. SITE0 + NSITE), each the offset of F_u values
Scratch / outputs (fp32): qkv (R, 3·DH) raw projections, ss (U, NFB) Σ of squared alive tokens
per block of BLOCK_F rows (summed in a fixed order by the attention kernels: no atomics, no
zero-fill, the same rms on every run),
h (R, DH) attention output, lse (R,) softmax log-normaliser, s (R,) leaky-exp scores, m (U,)
per-unit max, g (R,) gates, gout/bout the folded γ', β' (same layout as gamma/beta).
The rms scale r = (ss / (N_ALIVE·D) + eps)^-1/2 is applied to the
raw projections (Q = r·X·Wq), so tokens are never rescaled in memory.

Attention per unit is flash-style: online softmax over key blocks, dead or padded keys masked
with -inf.  The backward recomputes P from the saved lse.
"""

import triton
import triton.language as tl

TAB_F, TAB_D, TAB_ROW, TAB_TOK, TAB_WOFF, TAB_NALIVE, TAB_SITE0, TAB_NSITE = range(8)
TABLE_COLS = 8


@triton.jit
def _leaky_exp(e, leak):
    # exp(e) for e <= 0, 1 + leak·e above; the exp argument is clamped so the unused branch
    # cannot overflow.
    return tl.where(e <= 0, tl.exp(tl.minimum(e, 0.0)), 1.0 + leak * e)


@triton.jit
def _unit(table_ptr, u):
    """Row u of the unit table: F, D, first row, token offset, weight offset, alive count."""
    base = table_ptr + u * 8
    return (tl.load(base + 0), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3),
            tl.load(base + 4), tl.load(base + 5))


@triton.jit
def _sites(table_ptr, u):
    """First site index and number of sites of unit u (BN affines its gates fold into)."""
    base = table_ptr + u * 8
    return tl.load(base + 6), tl.load(base + 7)


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
    for k in range(site0, site0 + nsite):
        off = tl.load(site_off_ptr + k) + ri
        ga = tl.load(gamma_ptr + off, mask=imask, other=0.0).to(tl.float32)
        be = tl.load(beta_ptr + off, mask=imask, other=0.0).to(tl.float32)
        dga = tl.load(dgout_ptr + off, mask=imask, other=0.0).to(tl.float32)
        dbe = tl.load(dbout_ptr + off, mask=imask, other=0.0).to(tl.float32)
        dg += ga * dga + be * dbe
    return dg


@triton.jit
def proj_fwd_kernel(tok_ptr, wq_ptr, wk_ptr, wv_ptr, alive_ptr, table_ptr, qkv_ptr, ss_ptr,
                    DH: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DH: tl.constexpr, IEEE: tl.constexpr):
    """Grid (U, NFB = ceil(max F / BLOCK_F)): raw Q, K, V of BLOCK_F rows of unit u, and their
    Σ x² over alive rows into ss[u, fb] (0 for blocks past the unit's F)."""
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
        accq = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        acck = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        accv = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        sq = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d
            x = tl.load(tok_ptr + toff + rows[:, None].to(tl.int64) * d + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            xf = x.to(tl.float32)
            sq += tl.sum(xf * xf, axis=1)
            woffs = woff + ks[:, None].to(tl.int64) * DH + cols[None, :]
            wmask = kmask[:, None] & cmask[None, :]
            wq = tl.load(wq_ptr + woffs, mask=wmask, other=0.0)
            wk = tl.load(wk_ptr + woffs, mask=wmask, other=0.0)
            wv = tl.load(wv_ptr + woffs, mask=wmask, other=0.0)
            if IEEE:
                accq += tl.dot(xf, wq.to(tl.float32), input_precision="ieee")
                acck += tl.dot(xf, wk.to(tl.float32), input_precision="ieee")
                accv += tl.dot(xf, wv.to(tl.float32), input_precision="ieee")
            else:
                accq += tl.dot(x, wq.to(x.dtype))
                acck += tl.dot(x, wk.to(x.dtype))
                accv += tl.dot(x, wv.to(x.dtype))
        alive = tl.load(alive_ptr + row0 + rows, mask=rmask, other=0)
        tl.store(ss_ptr + u * nfb + fb, tl.sum(tl.where(alive != 0, sq, 0.0), axis=0))
        out = qkv_ptr + (row0 + rows[:, None]).to(tl.int64) * (3 * DH) + cols[None, :]
        omask = rmask[:, None] & cmask[None, :]
        tl.store(out, accq, mask=omask)
        tl.store(out + DH, acck, mask=omask)
        tl.store(out + 2 * DH, accv, mask=omask)


@triton.jit
def attn_fwd_kernel(qkv_ptr, ss_ptr, table_ptr, alive_ptr, w_ptr, b_ptr, h_ptr, lse_ptr, s_ptr,
                    m_ptr, g_ptr, gamma_ptr, beta_ptr, site_off_ptr, gout_ptr, bout_ptr, leak,
                    scale, eps, nfb, DH: tl.constexpr, NORM_MAX: tl.constexpr,
                    BLOCK_F: tl.constexpr, BLOCK_DH: tl.constexpr, IEEE: tl.constexpr,
                    NFB_P2: tl.constexpr):
    """Grid (U,): attention over the unit's alive filters, head, leaky-exp, max, gate, and the
    gate folded into every site's BN affine (γ' = g·γ, β' = g·β)."""
    u = tl.program_id(0)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    r = _rms_scale(ss_ptr, u, nfb, n_alive, d, eps, NFB_P2)
    cols = tl.arange(0, BLOCK_DH)
    cmask = cols < DH
    wh = tl.load(w_ptr + u * DH + cols, mask=cmask, other=0.0).to(tl.float32)
    bh = tl.load(b_ptr + u).to(tl.float32)
    smax = tl.zeros((BLOCK_F,), dtype=tl.float32)  # s > 0, so 0 is below every alive score
    for i0 in range(0, f, BLOCK_F):
        ri = i0 + tl.arange(0, BLOCK_F)
        imask = ri < f
        qrow = qkv_ptr + (row0 + ri[:, None]).to(tl.int64) * (3 * DH) + cols[None, :]
        q = tl.load(qrow, mask=imask[:, None] & cmask[None, :], other=0.0) * r
        m_i = tl.full((BLOCK_F,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_F,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        for j0 in range(0, f, BLOCK_F):
            rj = j0 + tl.arange(0, BLOCK_F)
            jmask = rj < f
            krow = qkv_ptr + (row0 + rj[:, None]).to(tl.int64) * (3 * DH) + cols[None, :]
            kvmask = jmask[:, None] & cmask[None, :]
            k = tl.load(krow + DH, mask=kvmask, other=0.0) * r
            v = tl.load(krow + 2 * DH, mask=kvmask, other=0.0) * r
            if IEEE:
                sij = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                sij = tl.dot(q, tl.trans(k)) * scale
            key_ok = jmask & (tl.load(alive_ptr + row0 + rj, mask=jmask, other=0) != 0)
            sij = tl.where(key_ok[None, :], sij, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sij, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(sij - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        h = acc / l_i[:, None]
        e = tl.sum(h * wh[None, :], axis=1) + bh
        alive_i = imask & (tl.load(alive_ptr + row0 + ri, mask=imask, other=0) != 0)
        s = tl.where(alive_i, _leaky_exp(e, leak), 0.0)
        tl.store(h_ptr + (row0 + ri[:, None]).to(tl.int64) * DH + cols[None, :], h,
                 mask=imask[:, None] & cmask[None, :])
        tl.store(lse_ptr + row0 + ri, m_i + tl.log(l_i), mask=imask)
        tl.store(s_ptr + row0 + ri, s, mask=imask)
        smax = tl.maximum(smax, s)
    m = tl.max(smax, axis=0)
    tl.store(m_ptr + u, m)
    tl.debug_barrier()  # the s written above is read back by other threads of this program
    site0, nsite = _sites(table_ptr, u)
    for i0 in range(0, f, BLOCK_F):
        ri = i0 + tl.arange(0, BLOCK_F)
        imask = ri < f
        s = tl.load(s_ptr + row0 + ri, mask=imask, other=0.0)
        if NORM_MAX:
            s = s / m
        tl.store(g_ptr + row0 + ri, s, mask=imask)
        for k in range(site0, site0 + nsite):
            off = tl.load(site_off_ptr + k) + ri
            ga = tl.load(gamma_ptr + off, mask=imask, other=0.0).to(tl.float32)
            be = tl.load(beta_ptr + off, mask=imask, other=0.0).to(tl.float32)
            tl.store(gout_ptr + off, (s * ga).to(gout_ptr.dtype.element_ty), mask=imask)
            tl.store(bout_ptr + off, (s * be).to(bout_ptr.dtype.element_ty), mask=imask)


@triton.jit
def attn_bwd_kernel(qkv_ptr, ss_ptr, table_ptr, alive_ptr, w_ptr, b_ptr, h_ptr, lse_ptr, s_ptr,
                    m_ptr, dg_ptr, gamma_ptr, beta_ptr, site_off_ptr, dgout_ptr, dbout_ptr,
                    dgamma_ptr, dbeta_ptr, dqkv_ptr, dw_ptr, db_ptr, leak, scale, eps, nfb,
                    DH: tl.constexpr, NORM_MAX: tl.constexpr, BLOCK_F: tl.constexpr,
                    BLOCK_DH: tl.constexpr, IEEE: tl.constexpr, NFB_P2: tl.constexpr):
    """Grid (U,): from dg (and the folded affines' gradients dγ', dβ') to the raw projections'
    gradients dqkv (= r·dQ, r·dK, r·dV, every element written: dK and dV accumulate over
    query blocks), dw, db, and the sites' dγ = g·dγ', dβ = g·dβ'."""
    u = tl.program_id(0)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    r = _rms_scale(ss_ptr, u, nfb, n_alive, d, eps, NFB_P2)
    cols = tl.arange(0, BLOCK_DH)
    cmask = cols < DH
    wh = tl.load(w_ptr + u * DH + cols, mask=cmask, other=0.0).to(tl.float32)
    bh = tl.load(b_ptr + u).to(tl.float32)
    m = tl.load(m_ptr + u)
    site0, nsite = _sites(table_ptr, u)
    # g = s / max s: the max's gradient is shared equally by the tied maxima (as torch.amax)
    dm_acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    cnt_acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    if NORM_MAX:
        for i0 in range(0, f, BLOCK_F):
            ri = i0 + tl.arange(0, BLOCK_F)
            imask = ri < f
            s = tl.load(s_ptr + row0 + ri, mask=imask, other=0.0)
            dg = _dg_total(dg_ptr, gamma_ptr, beta_ptr, dgout_ptr, dbout_ptr, site_off_ptr,
                           site0, nsite, row0, ri, imask)
            dm_acc += -dg * s / (m * m)
            cnt_acc += tl.where(imask & (s == m), 1.0, 0.0)
    dm = tl.sum(dm_acc, axis=0)
    cnt = tl.sum(cnt_acc, axis=0)
    dw = tl.zeros((BLOCK_DH,), dtype=tl.float32)
    db = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for i0 in range(0, f, BLOCK_F):
        ri = i0 + tl.arange(0, BLOCK_F)
        imask = ri < f
        alive_i = imask & (tl.load(alive_ptr + row0 + ri, mask=imask, other=0) != 0)
        s = tl.load(s_ptr + row0 + ri, mask=imask, other=0.0)
        dg = _dg_total(dg_ptr, gamma_ptr, beta_ptr, dgout_ptr, dbout_ptr, site_off_ptr,
                       site0, nsite, row0, ri, imask)
        gi = s / m if NORM_MAX else s
        for k in range(site0, site0 + nsite):
            off = tl.load(site_off_ptr + k) + ri
            dga = tl.load(dgout_ptr + off, mask=imask, other=0.0).to(tl.float32)
            dbe = tl.load(dbout_ptr + off, mask=imask, other=0.0).to(tl.float32)
            tl.store(dgamma_ptr + off, gi * dga, mask=imask)
            tl.store(dbeta_ptr + off, gi * dbe, mask=imask)
        if NORM_MAX:
            ds = dg / m + tl.where(s == m, dm / cnt, 0.0)
        else:
            ds = dg
        hmask = imask[:, None] & cmask[None, :]
        h = tl.load(h_ptr + (row0 + ri[:, None]).to(tl.int64) * DH + cols[None, :], mask=hmask,
                    other=0.0)
        e = tl.sum(h * wh[None, :], axis=1) + bh
        de = tl.where(alive_i, ds * tl.where(e <= 0, tl.exp(tl.minimum(e, 0.0)), leak), 0.0)
        dw += tl.sum(de[:, None] * h, axis=0)
        db += de
        dh = de[:, None] * wh[None, :]
        delta = tl.sum(dh * h, axis=1)
        lse = tl.load(lse_ptr + row0 + ri, mask=imask, other=0.0)
        qrow = qkv_ptr + (row0 + ri[:, None]).to(tl.int64) * (3 * DH) + cols[None, :]
        q = tl.load(qrow, mask=hmask, other=0.0) * r
        dq = tl.zeros((BLOCK_F, BLOCK_DH), dtype=tl.float32)
        for j0 in range(0, f, BLOCK_F):
            rj = j0 + tl.arange(0, BLOCK_F)
            jmask = rj < f
            krow = (row0 + rj[:, None]).to(tl.int64) * (3 * DH) + cols[None, :]
            kvmask = jmask[:, None] & cmask[None, :]
            k = tl.load(qkv_ptr + krow + DH, mask=kvmask, other=0.0) * r
            v = tl.load(qkv_ptr + krow + 2 * DH, mask=kvmask, other=0.0) * r
            if IEEE:
                sij = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                dp = tl.dot(dh, tl.trans(v), input_precision="ieee")
            else:
                sij = tl.dot(q, tl.trans(k)) * scale
                dp = tl.dot(dh, tl.trans(v))
            key_ok = jmask & (tl.load(alive_ptr + row0 + rj, mask=jmask, other=0) != 0)
            ok = imask[:, None] & key_ok[None, :]
            p = tl.where(ok, tl.exp(sij - lse[:, None]), 0.0)
            dsij = p * (dp - delta[:, None])
            if IEEE:
                dq += tl.dot(dsij, k, input_precision="ieee") * scale
                dk = tl.dot(tl.trans(dsij), q, input_precision="ieee") * scale
                dv = tl.dot(tl.trans(p), dh, input_precision="ieee")
            else:
                dq += tl.dot(dsij, k) * scale
                dk = tl.dot(tl.trans(dsij), q) * scale
                dv = tl.dot(tl.trans(p), dh)
            # this program owns unit u: read-modify-write of its dK, dV rows without atomics
            # the first query block initialises dK, dV (no zero-filled buffer needed)
            acc_mask = kvmask & (i0 > 0)
            dk_old = tl.load(dqkv_ptr + krow + DH, mask=acc_mask, other=0.0)
            dv_old = tl.load(dqkv_ptr + krow + 2 * DH, mask=acc_mask, other=0.0)
            tl.store(dqkv_ptr + krow + DH, dk_old + dk * r, mask=kvmask)
            tl.store(dqkv_ptr + krow + 2 * DH, dv_old + dv * r, mask=kvmask)
            tl.debug_barrier()
        tl.store(dqkv_ptr + (row0 + ri[:, None]).to(tl.int64) * (3 * DH) + cols[None, :],
                 dq * r, mask=hmask)
    tl.store(dw_ptr + u * DH + cols, dw, mask=cmask)
    tl.store(db_ptr + u, tl.sum(db, axis=0))


@triton.jit
def proj_bwd_kernel(tok_ptr, dqkv_ptr, table_ptr, dwq_ptr, dwk_ptr, dwv_ptr,
                    DH: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_DH: tl.constexpr, IEEE: tl.constexpr):
    """Grid (U, ceil(max D / BLOCK_K)): dWq = Xᵀ·dQraw (and K, V) for BLOCK_K token columns."""
    u = tl.program_id(0)
    kb = tl.program_id(1)
    f, d, row0, toff, woff, n_alive = _unit(table_ptr, u)
    if kb * BLOCK_K < d:
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < d
        cols = tl.arange(0, BLOCK_DH)
        cmask = cols < DH
        aq = tl.zeros((BLOCK_K, BLOCK_DH), dtype=tl.float32)
        ak = tl.zeros((BLOCK_K, BLOCK_DH), dtype=tl.float32)
        av = tl.zeros((BLOCK_K, BLOCK_DH), dtype=tl.float32)
        for i0 in range(0, f, BLOCK_F):
            ri = i0 + tl.arange(0, BLOCK_F)
            imask = ri < f
            x = tl.load(tok_ptr + toff + ri[:, None].to(tl.int64) * d + ks[None, :],
                        mask=imask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            drow = dqkv_ptr + (row0 + ri[:, None]).to(tl.int64) * (3 * DH) + cols[None, :]
            dmask = imask[:, None] & cmask[None, :]
            dq = tl.load(drow, mask=dmask, other=0.0)
            dk = tl.load(drow + DH, mask=dmask, other=0.0)
            dv = tl.load(drow + 2 * DH, mask=dmask, other=0.0)
            xt = tl.trans(x)
            if IEEE:
                aq += tl.dot(xt, dq, input_precision="ieee")
                ak += tl.dot(xt, dk, input_precision="ieee")
                av += tl.dot(xt, dv, input_precision="ieee")
            else:
                aq += tl.dot(xt, dq)
                ak += tl.dot(xt, dk)
                av += tl.dot(xt, dv)
        woffs = woff + ks[:, None].to(tl.int64) * DH + cols[None, :]
        wmask = kmask[:, None] & cmask[None, :]
        tl.store(dwq_ptr + woffs, aq, mask=wmask)
        tl.store(dwk_ptr + woffs, ak, mask=wmask)
        tl.store(dwv_ptr + woffs, av, mask=wmask)
