"""Decomposition folded into the attention (docs/design.md §2 steps 2-3) without ever forming F.

Per head h and sub-feature k, with ``W_kh`` the (Dh, Dv) rows of W_f that make
head h of sub-feature k and ``b_kh`` their bias,

    r_h · F_(n,k),h = (r_h W_kh) · X_n + r_h · b_kh
    Σ_(n,k) A F_(n,k),h = Σ_k (Σ_n A_(n,k) X_n) W_khᵀ + Σ_k (Σ_n A_(n,k)) b_kh

so the attention runs over the raw image features with the requests pulled
into the vision width, ``Q = r W`` (B·H·R·S rows of width Dv), and the
weighted sums ``U = A X`` are pushed back through W_f. At the 7B shape (R=5,
H=12, S=1, N=257, Dv=1024, Di=768) that is 1.3 GMAC in place of the 6.5 GMAC
of forming F, and F (12.6 MB in bf16 there) is neither written nor kept.

The rows ``e = (h, r, k)`` of one batch row are few (H·R·S = 60 there), so
the scores (B, H·R·S, N) are a small fp32 tensor (2 MB there), and the
forward is four launches and the backward six (``_kernel`` left off below),
each with plenty of programs:

=================  =================================================  ===========
kernel             computes                                           grid
=================  =================================================  ===========
``_expand``        ``Y[h, b·R+r, k·Dv+v] = Σ_d A[b, r, h·Dh+d] ·      (H, B·R, S·Dv)
                   W_f[k·Di+h·Dh+d, v]``: Q from r (forward), dU
                   from dz (backward)
``_scores``        ``s[b, e, n] = scale · (Y_e · X_n + A_(b,r,h) ·    (B, rows, N)
                   b_kh)``, masked tokens -inf: the scores (forward),
                   dA (backward, scale 1, no mask); and per tile of
                   tokens the max and Σ exp (forward) or Σ A dA
                   (backward), the partials of the softmax's sums
``_weighted``      the softmax of s over each (h, r)'s S·N entries    (B, H·R, Dv)
                   and ``U = A X`` (forward; A and its sums over n
                   kept), or ``dS = scale·A(dA - Σ A dA)`` and
                   ``dQ = dS X`` (backward); every program along Dv
                   takes the row sums from the partials
``_reduce``        ``out[b, r, h·Dh+d] = Σ_(k,v) Y · W_f +             (H, B·R, Dh)
                   Σ_k sums · b_kh + residual``: z from U, c and r
                   (forward), d requests from dQ, Σ_n dS and dz
``_image_grad``    ``d X = Aᵀ dU + dSᵀ Q`` (backward)                  (B, N, Dv)
``_weight_grad``   ``d W_kh = dzᵀ U + rᵀ dQ``, ``d b_kh`` from the      (S·H, Dh, Dv)
                   row sums, accumulated in fp32 (backward)
=================  =================================================  ===========

Saved for backward: A (fp32, the size of the scores), Q and U (storage
dtype, B·H·R·S·Dv each: 3.9 MB in bf16 at the 7B shape) and the fp32 sums
``c = Σ_n A``. Every dot accumulates in fp32; Q, U, dU and dQ are stored in
the storage dtype, as the reference stores F.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_launch import (CONFIGS, Launch, as_is, cdiv, config_cache, dot_acc, dot_flags, interpret, op,
                            pow2)


# The batch, request and token counts are not specialised on (Triton would compile a variant per
# count that is 1 or a multiple of 16, e.g. at every batch size a server sees): they only bound
# loops and masks; the widths and strides that decide vectorised loads stay specialised.


@triton.jit
def _load_dot(ptr, offs, mask, DOT_FP32: tl.constexpr):
    t = tl.load(ptr + offs, mask=mask, other=0.0)
    if DOT_FP32:
        t = t.to(tl.float32)
    return t


@triton.jit(do_not_specialize=["B", "R"])
def _expand_kernel(
    a_ptr, w_ptr, y_ptr, B, R, DH, DI, DV, S,
    a_sb, a_sr, a_sd, w_sr, w_sd,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    h = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rc = tl.program_id(2) * BC + tl.arange(0, BC)
    m_ok = rm < B * R
    c_ok = rc < S * DV
    k = rc // DV
    v = rc % DV
    a_row = (rm // R).to(tl.int64) * a_sb + (rm % R) * a_sr
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for d0 in range(0, DH, BK):
        rd = d0 + tl.arange(0, BK)
        d_ok = rd < DH
        a = _load_dot(a_ptr, a_row[:, None] + (h * DH + rd)[None, :] * a_sd, m_ok[:, None] & d_ok[None, :], DOT_FP32)
        w = _load_dot(w_ptr, (k[None, :] * DI + h * DH + rd[:, None]).to(tl.int64) * w_sr + v[None, :] * w_sd,
                      d_ok[:, None] & c_ok[None, :], DOT_FP32)
        acc = dot_acc(a, w, acc, IEEE)
    y_off = (h * B * R + rm[:, None]).to(tl.int64) * S * DV + rc[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["B", "R", "N", "M"])
def _scores_kernel(
    y_ptr, x_ptr, a_ptr, bf_ptr, m_ptr, s_ptr, p_ptr, part_ptr, B, R, N, DH, DI, DV, S, M, NT, scale,
    x_sb, x_sn, x_sd, a_sb, a_sr, a_sd, m_sb, m_sn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PARTIALS: tl.constexpr, DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):
    """Also, per row and tile of tokens (B, rows, NT): with PARTIALS=1 the tile's max score and
    Σ exp(s - max) (forward; ``part_ptr`` holds both, the sums after the maxima), with PARTIALS=2
    Σ A dA from the A at ``p_ptr`` (backward), so that ``_weighted`` reads these instead of
    passing over every score for its normaliser."""
    b = tl.program_id(0)
    re = tl.program_id(1) * BE + tl.arange(0, BE)
    rn = tl.program_id(2) * BN + tl.arange(0, BN)
    e_ok = re < M
    n_ok = rn < N
    g = re // S
    k = re % S
    h = g // R
    r = g % R
    y_row = (((h * B + b) * R + r) * S + k).to(tl.int64) * DV
    x_row = b.to(tl.int64) * x_sb + rn.to(tl.int64) * x_sn
    acc = tl.zeros((BE, BN), dtype=tl.float32)
    for v0 in range(0, DV, BK):
        rv = v0 + tl.arange(0, BK)
        v_ok = rv < DV
        y = _load_dot(y_ptr, y_row[:, None] + rv[None, :], e_ok[:, None] & v_ok[None, :], DOT_FP32)
        x = _load_dot(x_ptr, x_row[:, None] + rv[None, :] * x_sd, n_ok[:, None] & v_ok[None, :], DOT_FP32)
        acc = dot_acc(y, tl.trans(x), acc, IEEE)
    if HAS_BIAS:
        # A_(b,r,h) · b_kh: constant over n, so it moves the softmax only across sub-features.
        beta = tl.zeros((BE,), dtype=tl.float32)
        a_row = b.to(tl.int64) * a_sb + r * a_sr
        for d0 in range(0, DH, BD):
            rd = d0 + tl.arange(0, BD)
            ok = e_ok[:, None] & (rd < DH)[None, :]
            a = tl.load(a_ptr + a_row[:, None] + (h[:, None] * DH + rd[None, :]) * a_sd, mask=ok, other=0.0)
            bias = tl.load(bf_ptr + k[:, None] * DI + h[:, None] * DH + rd[None, :], mask=ok, other=0.0)
            beta += tl.sum(a.to(tl.float32) * bias.to(tl.float32), axis=1)
        acc += beta[:, None]
    s = acc * scale
    if HAS_MASK:
        keep = tl.load(m_ptr + b.to(tl.int64) * m_sb + rn * m_sn, mask=n_ok, other=0)
        s = tl.where((keep != 0)[None, :], s, float("-inf"))
    ok = e_ok[:, None] & n_ok[None, :]
    s_off = (b.to(tl.int64) * M + re[:, None]) * N + rn[None, :]
    tl.store(s_ptr + s_off, s, mask=ok)
    part_off = (b.to(tl.int64) * M + re) * NT + tl.program_id(2)
    if PARTIALS == 1:
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_t = tl.max(s, axis=1)
        # A tile whose tokens are all masked: m = -inf and Σ = 0 (shifting by 0, not by -inf).
        l_t = tl.sum(tl.exp(s - tl.where(m_t == float("-inf"), 0.0, m_t)[:, None]), axis=1)
        tl.store(part_ptr + part_off, m_t, mask=e_ok)
        tl.store(part_ptr + B.to(tl.int64) * M * NT + part_off, l_t, mask=e_ok)
    if PARTIALS == 2:
        p = tl.load(p_ptr + s_off, mask=ok, other=0.0)
        tl.store(part_ptr + part_off, tl.sum(p * s, axis=1), mask=e_ok)


@triton.jit(do_not_specialize=["B", "R", "N", "M", "G"])
def _weighted_kernel(
    s_ptr, p_ptr, part_ptr, x_ptr, out_ptr, w_ptr, sum_ptr, B, R, N, DV, S, M, G, NT, scale,
    x_sb, x_sn, x_sd,
    BACKWARD: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BG: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
):
    """Forward: ``s_ptr`` holds the scores and the partials ``_scores`` wrote their tile maxima and
    sums; writes A to ``w_ptr``, Σ_n A to ``sum_ptr`` and U = A X. Backward: ``s_ptr`` holds dA,
    ``p_ptr`` A and the partials Σ A dA per tile; writes dS to ``w_ptr``, Σ_n dS to ``sum_ptr`` and
    dQ = dS X. Only the first program along Dv writes the weights and sums."""
    b = tl.program_id(0)
    rg = tl.program_id(1) * BG + tl.arange(0, BG)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    first = tl.program_id(2) == 0
    g_ok = rg < G
    v_ok = rv < DV
    h = rg // R
    r = rg % R
    # Offsets within one batch row fit int32; the batch's base moves the pointers.
    x_b = x_ptr + b.to(tl.int64) * x_sb
    s_b = s_ptr + b.to(tl.int64) * M * N
    p_b = p_ptr + b.to(tl.int64) * M * N
    w_b = w_ptr + b.to(tl.int64) * M * N
    # Pass 1, over the per-tile partials of all S·N entries of each softmax row
    # (h, r): the normaliser (forward) or delta = Σ A dA (backward).
    part_b = part_ptr + b.to(tl.int64) * M * NT
    # Forward: the sums follow the maxima of every batch row.
    part2_b = part_b + B.to(tl.int64) * M * NT
    if BACKWARD:
        delta = tl.zeros((BG,), dtype=tl.float32)
    else:
        m_i = tl.full((BG,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BG,), dtype=tl.float32)
    for k in range(0, S):
        prow = (rg * S + k) * NT
        for t0 in range(0, NT, BT):
            rt = t0 + tl.arange(0, BT)
            ok = g_ok[:, None] & (rt < NT)[None, :]
            if BACKWARD:
                delta += tl.sum(tl.load(part_b + prow[:, None] + rt[None, :], mask=ok, other=0.0), axis=1)
            else:
                m_t = tl.load(part_b + prow[:, None] + rt[None, :], mask=ok, other=float("-inf"))
                l_t = tl.load(part2_b + prow[:, None] + rt[None, :], mask=ok, other=0.0)
                m_new = tl.maximum(m_i, tl.max(m_t, axis=1))
                # A row that has seen only masked tokens keeps m = -inf; shifting
                # by 0 then gives exp(-inf) = 0 instead of NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(l_t * tl.exp(m_t - m_safe[:, None]), axis=1)
                m_i = m_new
    if not BACKWARD:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        # A row with every image token masked has l = 0: its A is 0, so z = r.
        inv = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
    for k in range(0, S):
        row = (rg * S + k) * N
        acc = tl.zeros((BG, BV), dtype=tl.float32)
        total = tl.zeros((BG,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            n_ok = rn < N
            ok = g_ok[:, None] & n_ok[None, :]
            if BACKWARD:
                p = tl.load(p_b + row[:, None] + rn[None, :], mask=ok, other=0.0)
                da = tl.load(s_b + row[:, None] + rn[None, :], mask=ok, other=0.0)
                wt = p * (da - delta[:, None]) * scale
            else:
                s = tl.load(s_b + row[:, None] + rn[None, :], mask=ok, other=float("-inf"))
                wt = tl.exp(s - m_safe[:, None]) * inv[:, None]
            tl.store(w_b + row[:, None] + rn[None, :], wt, mask=ok & first)
            total += tl.sum(wt, axis=1)
            x = tl.load(x_b + rn[:, None].to(tl.int64) * x_sn + rv[None, :] * x_sd,
                        mask=n_ok[:, None] & v_ok[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
            acc = dot_acc(wt.to(x.dtype), x, acc, IEEE)
        out_row = (((h * B + b) * R + r) * S + k).to(tl.int64) * DV
        tl.store(out_ptr + out_row[:, None] + rv[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & v_ok[None, :])
        tl.store(sum_ptr + b.to(tl.int64) * M + rg * S + k, total, mask=g_ok & first)


@triton.jit(do_not_specialize=["B", "R", "M"])
def _reduce_kernel(
    y_ptr, w_ptr, bf_ptr, sum_ptr, res_ptr, out_ptr, B, R, DH, DI, DV, S, M,
    w_sr, w_sd, res_sb, res_sr, res_sd,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
):
    h = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rd = tl.program_id(2) * BD + tl.arange(0, BD)
    m_ok = rm < B * R
    d_ok = rd < DH
    bb = rm // R
    r = rm % R
    y_row = (h * B * R + rm).to(tl.int64) * S * DV
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for c0 in range(0, S * DV, BK):
        rc = c0 + tl.arange(0, BK)
        c_ok = rc < S * DV
        y = _load_dot(y_ptr, y_row[:, None] + rc[None, :], m_ok[:, None] & c_ok[None, :], DOT_FP32)
        w = _load_dot(w_ptr, ((rc // DV)[:, None] * DI + h * DH + rd[None, :]).to(tl.int64) * w_sr
                      + (rc % DV)[:, None] * w_sd, c_ok[:, None] & d_ok[None, :], DOT_FP32)
        acc = dot_acc(y, w, acc, IEEE)
    if HAS_BIAS:
        for k in range(0, S):
            sums = tl.load(sum_ptr + bb.to(tl.int64) * M + (h * R + r) * S + k, mask=m_ok, other=0.0)
            bias = tl.load(bf_ptr + k * DI + h * DH + rd, mask=d_ok, other=0.0).to(tl.float32)
            acc += sums[:, None] * bias[None, :]
    ok = m_ok[:, None] & d_ok[None, :]
    res = tl.load(res_ptr + (bb.to(tl.int64) * res_sb + r * res_sr)[:, None] + (h * DH + rd)[None, :] * res_sd,
                  mask=ok, other=0.0)
    acc += res.to(tl.float32)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * DI + (h * DH + rd)[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit(do_not_specialize=["B", "R", "N", "M"])
def _image_grad_kernel(
    p_ptr, du_ptr, ds_ptr, q_ptr, dx_ptr, B, R, N, DV, S, M,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BE: tl.constexpr,
):
    b = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    n_ok = rn < N
    v_ok = rv < DV
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for e0 in range(0, M, BE):
        re = e0 + tl.arange(0, BE)
        e_ok = re < M
        g = re // S
        y_row = ((((g // R) * B + b) * R + g % R) * S + re % S).to(tl.int64) * DV
        w_off = (b.to(tl.int64) * M + re[None, :]) * N + rn[:, None]
        w_ok = n_ok[:, None] & e_ok[None, :]
        y_ok = e_ok[:, None] & v_ok[None, :]
        du = _load_dot(du_ptr, y_row[:, None] + rv[None, :], y_ok, DOT_FP32)
        p = tl.load(p_ptr + w_off, mask=w_ok, other=0.0).to(du.dtype)
        acc = dot_acc(p, du, acc, IEEE)
        q = _load_dot(q_ptr, y_row[:, None] + rv[None, :], y_ok, DOT_FP32)
        ds = tl.load(ds_ptr + w_off, mask=w_ok, other=0.0).to(q.dtype)
        acc = dot_acc(ds, q, acc, IEEE)
    tl.store(dx_ptr + (b.to(tl.int64) * N + rn[:, None]) * DV + rv[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=n_ok[:, None] & v_ok[None, :])


@triton.jit(do_not_specialize=["B", "R", "M"])
def _weight_grad_kernel(
    dz_ptr, u_ptr, r_ptr, dq_ptr, c_ptr, sg_ptr, dw_ptr, db_ptr, B, R, H, DH, DI, DV, S, M,
    dz_sb, dz_sr, dz_sd, r_sb, r_sr, r_sd,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr,
):
    k = tl.program_id(0) // H
    h = tl.program_id(0) % H
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    first = tl.program_id(2) == 0
    d_ok = rd < DH
    v_ok = rv < DV
    acc = tl.zeros((BD, BV), dtype=tl.float32)
    acc_b = tl.zeros((BD,), dtype=tl.float32)
    for m0 in range(0, B * R, BM):
        rm = m0 + tl.arange(0, BM)
        m_ok = rm < B * R
        bb = (rm // R).to(tl.int64)
        r = rm % R
        t_ok = d_ok[:, None] & m_ok[None, :]
        y_off = (h * B * R + rm[:, None]).to(tl.int64) * S * DV + k * DV + rv[None, :]
        y_ok = m_ok[:, None] & v_ok[None, :]
        dz_t = _load_dot(dz_ptr, (bb * dz_sb + r * dz_sr)[None, :] + (h * DH + rd)[:, None] * dz_sd, t_ok, DOT_FP32)
        acc = dot_acc(dz_t, _load_dot(u_ptr, y_off, y_ok, DOT_FP32), acc, IEEE)
        r_t = _load_dot(r_ptr, (bb * r_sb + r * r_sr)[None, :] + (h * DH + rd)[:, None] * r_sd, t_ok, DOT_FP32)
        acc = dot_acc(r_t, _load_dot(dq_ptr, y_off, y_ok, DOT_FP32), acc, IEEE)
        # d b_kh, also without a bias (the registered op returns it either way).
        e = bb * M + (h * R + r) * S + k
        c = tl.load(c_ptr + e, mask=m_ok, other=0.0)
        sg = tl.load(sg_ptr + e, mask=m_ok, other=0.0)
        acc_b += tl.sum(dz_t.to(tl.float32) * c[None, :] + r_t.to(tl.float32) * sg[None, :], axis=1)
    rows = k * DI + h * DH + rd
    tl.store(dw_ptr + rows[:, None].to(tl.int64) * DV + rv[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=d_ok[:, None] & v_ok[None, :])
    tl.store(db_ptr + rows, acc_b.to(db_ptr.dtype.element_ty), mask=d_ok & first)


class FoldedBlocks(NamedTuple):
    """Block sizes of each folded kernel, and the warps and pipeline depth they share."""

    expand: Tuple[int, int, int]  # BM, BC, BK
    scores: Tuple[int, int, int, int]  # BE, BN, BK, BD
    weighted: Tuple[int, int, int]  # BG, BN, BV
    reduce: Tuple[int, int, int]  # BM, BD, BK
    image_grad: Tuple[int, int, int]  # BN, BV, BE
    weight_grad: Tuple[int, int, int]  # BD, BV, BM
    num_warps: int
    num_stages: int


@config_cache
def folded_blocks(head_dim: int, exact: bool, config: str = "attend_folded") -> FoldedBlocks:
    """The ``FoldedBlocks`` of ``CONFIGS[config]`` for heads ``head_dim`` wide; ``exact``: fp32 operands."""
    c = CONFIGS[config]
    if interpret():
        # Small tiles keep the interpreter quick on the tests' small shapes.
        t = (16, 16, 16)
        return FoldedBlocks(t, (16, *t), t, t, t, t, 4, 1)
    bd = pow2(head_dim, 16, 64)
    # fp32 operands take twice the registers: at the bf16 width ptxas spills (compile_kernels.py).
    bv = max(16, c["BV"] // 2) if exact else c["BV"]
    # The scores kernel's bias term is a short vector sum: narrow chunks keep its registers low.
    return FoldedBlocks((c["BM"], bv, bd), (c["BE"], c["BN"], c["BK"], 16), (c["BG"], c["BN"], bv),
                        (c["BM"], bd, c["BK"]), (c["BN"], bv, c["BE"]), (bd, bv, c["BM"]),
                        c["num_warps"], c["num_stages"])


class _Dims(NamedTuple):
    """The sizes one call's launches share."""

    B: int
    R: int
    H: int
    DH: int
    DI: int
    DV: int
    S: int
    N: int
    M: int
    G: int
    scale: float

    @staticmethod
    def of(requests, image, num_heads, sub_features) -> "_Dims":
        batch, num_req, width = (int(s) for s in requests.shape)
        heads, subs = int(num_heads), int(sub_features)
        head_dim = width // heads
        return _Dims(batch, num_req, heads, head_dim, width, int(image.shape[2]), subs, int(image.shape[1]),
                     heads * num_req * subs, heads * num_req, 1.0 / math.sqrt(head_dim))


def _common(d: _Dims, dtype: torch.dtype) -> Tuple[FoldedBlocks, dict]:
    """Block sizes of each kernel, and the constants every launch passes."""
    dot_fp32, ieee = dot_flags(dtype)
    blocks = folded_blocks(d.DH, dot_fp32)
    return blocks, dict(DOT_FP32=dot_fp32, IEEE=ieee, num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _expand_launch(d: _Dims, a_strides, w_strides, blocks: FoldedBlocks, common) -> Launch:
    """Y (H, B·R, S·Dv) from rows of ``a`` (B, R, Di) per head through W_f."""
    bm, bc, bk = blocks.expand
    grid = (d.H, cdiv(d.B * d.R, bm), cdiv(d.S * d.DV, bc)) if d.H * d.B * d.R * d.S * d.DV else None
    return Launch(grid, (d.B, d.R, d.DH, d.DI, d.DV, d.S, *a_strides, *w_strides),
                   dict(BM=bm, BC=bc, BK=bk, **common))


def _tiles(d: _Dims, blocks: FoldedBlocks) -> int:
    """The tiles of tokens a row of scores spans: the partials per row (``_scores_kernel``)."""
    be, bn, bk, bd = blocks.scores
    return cdiv(d.N, bn)


def _scores_launch(d: _Dims, x_strides, a_strides, m_strides, scale, has_bias, backward, blocks: FoldedBlocks,
                   common) -> Launch:
    """(B, H·R·S, N) fp32 ``scale · (Y X_nᵀ + a · b_kh)``; with ``m_strides``, tokens not kept -inf;
    and the per-tile partials, (B, H·R·S, tiles) each."""
    be, bn, bk, bd = blocks.scores
    grid = (d.B, cdiv(d.M, be), cdiv(d.N, bn)) if d.B * d.M * d.N else None
    return Launch(grid, (d.B, d.R, d.N, d.DH, d.DI, d.DV, d.S, d.M, _tiles(d, blocks), scale, *x_strides,
                          *a_strides, *(m_strides or (0, 0))),
                   dict(HAS_BIAS=has_bias, HAS_MASK=m_strides is not None, PARTIALS=2 if backward else 1,
                        BE=be, BN=bn, BK=bk, BD=bd, **common))


def _weighted_launch(d: _Dims, x_strides, backward, blocks: FoldedBlocks, common) -> Launch:
    """The weights (fp32, like the scores), their sums over n (B, H·R·S) fp32 and weights · X as Y."""
    bg, bn, bv = blocks.weighted
    tiles = _tiles(d, blocks)
    # At least one program along Dv, as the first one writes the weights and sums.
    grid = (d.B, cdiv(d.G, bg), max(1, cdiv(d.DV, bv))) if d.B * d.G else None
    return Launch(grid, (d.B, d.R, d.N, d.DV, d.S, d.M, d.G, tiles, d.scale, *x_strides),
                   dict(BACKWARD=backward, BG=bg, BN=bn, BV=bv, BT=pow2(tiles, 16, 64), **common))


def _reduce_launch(d: _Dims, w_strides, res_strides, has_bias, blocks: FoldedBlocks, common) -> Launch:
    """(B, R, Di): Y back through W_f per head, plus ``sums · b_kh`` and the residual."""
    bm, bd, bk = blocks.reduce
    grid = (d.H, cdiv(d.B * d.R, bm), cdiv(d.DH, bd)) if d.B * d.R * d.DI else None
    return Launch(grid, (d.B, d.R, d.DH, d.DI, d.DV, d.S, d.M, *w_strides, *res_strides),
                   dict(HAS_BIAS=has_bias, BM=bm, BD=bd, BK=bk, **common))


class FoldedPlan(NamedTuple):
    """Everything of a forward's four launches that follows from the inputs' metadata."""

    dims: _Dims
    tiles: int
    dtype: torch.dtype
    device: torch.device
    expand: Launch
    scores: Launch
    weighted: Launch
    reduce: Launch


def plan_forward(requests, image, image_mask, w_f, b_f, num_heads, sub_features) -> FoldedPlan:
    d = _Dims.of(requests, image, num_heads, sub_features)
    blocks, common = _common(d, requests.dtype)
    w_strides, r_strides = (w_f.stride(0), w_f.stride(1)), requests.stride()
    # The bool mask is read as bytes (same strides).
    m_strides = None if image_mask is None else (image_mask.stride(0), image_mask.stride(1))
    return FoldedPlan(d, _tiles(d, blocks), requests.dtype, requests.device,
                      _expand_launch(d, r_strides, w_strides, blocks, common),
                      _scores_launch(d, image.stride(), r_strides, m_strides, d.scale, b_f is not None, False, blocks,
                                     common),
                      _weighted_launch(d, image.stride(), False, blocks, common),
                      _reduce_launch(d, w_strides, r_strides, b_f is not None, blocks, common))


def run_forward(wrap, plan: FoldedPlan, requests, image, image_mask, w_f, b_f):
    """z, A (B, H·R·S, N) fp32, Q and U (H, B·R, S·Dv), c = Σ_n A (B, H·R·S) fp32."""
    d, device = plan.dims, plan.device
    y_shape = (d.H, d.B * d.R, d.S * d.DV)
    q = torch.empty(y_shape, device=device, dtype=plan.dtype)
    scores = torch.empty((d.B, d.M, d.N), device=device, dtype=torch.float32)
    # The per-tile maxima of every batch row, then their sums.
    partials = torch.empty((2, d.B, d.M, plan.tiles), device=device, dtype=torch.float32)
    probs = torch.empty((d.B, d.M, d.N), device=device, dtype=torch.float32)
    sums = torch.empty((d.B, d.M), device=device, dtype=torch.float32)
    u = torch.empty(y_shape, device=device, dtype=plan.dtype)
    z = torch.empty((d.B, d.R, d.DI), device=device, dtype=plan.dtype)
    keep = scores if image_mask is None else image_mask.view(torch.uint8)
    plan.expand.run(wrap, _expand_kernel, requests, w_f, q)
    plan.scores.run(wrap, _scores_kernel, q, image, requests, requests if b_f is None else b_f, keep, scores, scores,
                    partials)
    plan.weighted.run(wrap, _weighted_kernel, scores, scores, partials, image, u, probs, sums)
    plan.reduce.run(wrap, _reduce_kernel, u, w_f, w_f if b_f is None else b_f, sums, requests, z)
    return z, probs, q, u, sums


def _fwd_fake(requests, image, image_mask, w_f, b_f, num_heads, sub_features):
    batch, num_req, width = requests.shape
    rows = num_heads * num_req * sub_features
    f32 = torch.float32
    y_shape = (num_heads, batch * num_req, sub_features * image.shape[2])
    return (requests.new_empty(requests.shape), requests.new_empty((batch, rows, image.shape[1]), dtype=f32),
            image.new_empty(y_shape), image.new_empty(y_shape), requests.new_empty((batch, rows), dtype=f32))


@op("attend_folded_fwd_triton", _fwd_fake)
def attend_folded_fwd(wrap, requests: torch.Tensor, image: torch.Tensor, image_mask: Optional[torch.Tensor],
                      w_f: torch.Tensor, b_f: Optional[torch.Tensor], num_heads: int, sub_features: int
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z, then what the backward takes: A (B, H·R·S, N) fp32, Q and U (H, B·R, S·Dv), c = Σ_n A (B, H·R·S)."""
    plan = plan_forward(requests, image, image_mask, w_f, b_f, num_heads, sub_features)
    return run_forward(wrap, plan, requests, image, image_mask, w_f, b_f)


def _bwd_fake(grad, requests, image, w_f, b_f, probs, q, u, sums, num_heads, sub_features, image_grad=True):
    return (requests.new_empty(requests.shape), image.new_empty(image.shape if image_grad else (0,)),
            w_f.new_empty(w_f.shape), w_f.new_empty((w_f.shape[0],)))


@op("attend_folded_bwd_triton", _bwd_fake)
def attend_folded_bwd(wrap, grad: torch.Tensor, requests: torch.Tensor, image: torch.Tensor, w_f: torch.Tensor,
                      b_f: Optional[torch.Tensor], probs: torch.Tensor, q: torch.Tensor, u: torch.Tensor,
                      sums: torch.Tensor, num_heads: int, sub_features: int, image_grad: bool = True
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of requests, image (empty without ``image_grad``: a frozen vision encoder spares
    its kernel), W_f and b_f from what ``attend_folded_fwd`` returned (no mask: A is zero at masked
    tokens, so their gradients are too)."""
    d = _Dims.of(requests, image, num_heads, sub_features)
    expected = (d.H, d.B * d.R, d.S * d.DV)
    for name, t, shape, dtype in (("q", q, expected, requests.dtype), ("u", u, expected, requests.dtype),
                                  ("probs", probs, (d.B, d.M, d.N), torch.float32),
                                  ("sums", sums, (d.B, d.M), torch.float32)):
        if t.shape != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name}: expected the forward's contiguous {dtype} tensor of shape {shape}, "
                             f"got {t.dtype} {tuple(t.shape)} with strides {t.stride()}")
    blocks, common = _common(d, requests.dtype)
    device, dtype = requests.device, requests.dtype
    w_strides, g_strides = (w_f.stride(0), w_f.stride(1)), grad.stride()
    has_bias = b_f is not None
    bias = w_f if b_f is None else b_f
    d_u = torch.empty(expected, device=device, dtype=dtype)
    _expand_launch(d, g_strides, w_strides, blocks, common).run(wrap, _expand_kernel, grad, w_f, d_u)
    # dA = dU X + dz · b_kh (the bias reaches z through Σ_n A), unscaled and unmasked: A is 0 there.
    d_a = torch.empty((d.B, d.M, d.N), device=device, dtype=torch.float32)
    delta_parts = torch.empty((d.B, d.M, _tiles(d, blocks)), device=device, dtype=torch.float32)
    _scores_launch(d, image.stride(), g_strides, None, 1.0, has_bias, True, blocks, common).run(
        wrap, _scores_kernel, d_u, image, grad, bias, d_a, d_a, probs, delta_parts)
    # dS (scaled) = A (dA - Σ A dA) / sqrt(Dh), its sums over n, and dQ = dS X.
    d_s, d_beta = torch.empty_like(d_a), torch.empty((d.B, d.M), device=device, dtype=torch.float32)
    d_q = torch.empty(expected, device=device, dtype=dtype)
    _weighted_launch(d, image.stride(), True, blocks, common).run(
        wrap, _weighted_kernel, d_a, probs, delta_parts, image, d_q, d_s, d_beta)
    d_req = torch.empty((d.B, d.R, d.DI), device=device, dtype=dtype)
    _reduce_launch(d, w_strides, g_strides, has_bias, blocks, common).run(
        wrap, _reduce_kernel, d_q, w_f, bias, d_beta, grad, d_req)
    d_image = torch.empty((d.B, d.N, d.DV) if image_grad else (0,), device=device, dtype=dtype)
    bn, bv, be = blocks.image_grad
    grid = (d.B, cdiv(d.N, bn), cdiv(d.DV, bv)) if image_grad and d_image.numel() else None
    Launch(grid, (d.B, d.R, d.N, d.DV, d.S, d.M), dict(BN=bn, BV=bv, BE=be, **common)).run(
        wrap, _image_grad_kernel, probs, d_u, d_s, q, d_image)
    d_w = torch.empty(w_f.shape, device=device, dtype=w_f.dtype)
    d_b = torch.empty((w_f.shape[0],), device=device, dtype=w_f.dtype)
    bd, bv, bm = blocks.weight_grad
    # At least one program along Dv, as the first one writes d b_f.
    grid = (d.S * d.H, cdiv(d.DH, bd), max(1, cdiv(d.DV, bv))) if d_b.numel() else None
    Launch(grid, (d.B, d.R, d.H, d.DH, d.DI, d.DV, d.S, d.M, *g_strides, *requests.stride()),
           dict(BD=bd, BV=bv, BM=bm, **common)).run(wrap, _weight_grad_kernel, grad, u, requests, d_q, sums, d_beta,
                                                    d_w, d_b)
    return d_req, d_image, d_w, d_b


def folded_forward(plan: Optional[FoldedPlan], requests, image, image_mask, w_f, b_f, num_heads, sub_features):
    """``attend_folded_fwd``'s results from the cached plan of an eager call, or from the op while tracing
    (``plan`` None); the arguments checked (``b_f`` dense) by ``attend.attend_decomposed``."""
    if plan is None:
        return attend_folded_fwd(requests, image, image_mask, w_f, b_f, num_heads, sub_features)
    return run_forward(as_is, plan, requests, image, image_mask, w_f, b_f)
