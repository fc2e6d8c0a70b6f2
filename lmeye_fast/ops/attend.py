"""The split attention schedule (docs/design.md §2 steps 2-3, §5), flash style.

One program per (batch row, group of ``HEADS_PER_PROGRAM`` heads): a group shares
each tile of X, so X is re-read from L2 H/HEADS_PER_PROGRAM times instead of H
times. It walks the image tokens in tiles; for each tile and sub-feature k it
takes the group's slice of ``F = X W_fᵀ + b_f``, scores it against the requests
of every head of the group in one dot (a row per (head, request), zero outside
that head's columns), and folds it into an online softmax over all N·S
sub-features.

Where the tiles of F come from is a per-layer tile option (``AttentionSchedule``,
``checks.FEATURE_TILES``): **materialized** (the default: measured faster at the
7B shape on an H200, 30 µs against 49 µs, as cuBLAS runs the decomposition GEMM
at a far higher rate than the per-head tiles can), F is written whole by one
dense product (``_features``) and the kernels load its tiles; **on chip**, each
tile is formed inside the kernel (rounded to the storage dtype, as the reference
stores F) and the (B, N·S, Di) tensor F is never written. So is the number of
heads a program takes (``heads_per_program``).

Saved for backward: the fp32 log-sum-exp (B, H, R) and, when the forward
materialized F, F itself (B, N·S, Di) in the storage dtype: 12.6 MB in bf16 at
the 7B shape, the same tensor the reference's autograd holds, and keeping it
spares the backward the decomposition GEMM (13 GFLOP at that shape) that would
form it again. A forward that formed F on chip keeps none; its backward forms F
again, materialized or on chip as its own option (``backward_features``) says.
The backward walks the sub-features twice: once for the normaliser and
``delta = Σ p·dp`` of the softmax of its own scores (see the kernel), once for ``d requests`` (finished in the kernel) and ``dF`` (B, N·S,
Di), written in the storage dtype; ``d image``, ``d W_f`` and ``d b_f`` (fp32
column sums) then come from two dense GEMMs, ``torch.mm`` on every device
(cuBLAS on a GPU, fp32 accumulation; fp32 inputs stay exact IEEE fp32 unless
the caller enabled TF32), so the interpreter's tests run the GPU's backward.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ..checks import AttentionSchedule, check_operand, check_schedule, check_tensor, metadata_key
from .attend_folded import FoldedPlan, attend_folded_bwd, folded_forward, plan_forward
from .triton_launch import (CONFIGS, Launch, PlanCache, as_is, cdiv, compiling, config_cache, dense_bias, dot_acc,
                            dot_flags, interpret, needs_grad, on_device, op, pow2)


@triton.jit
def _feature_tile(x_ptr, w_ptr, bf_ptr, x_base, rn, n_ok, wrow, d_ok, DV, x_sn, x_sd, w_sr, w_sd,
                  HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
                  BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    """One head slice of one sub-feature for a tile of tokens: (BN, BD), rounded to the storage dtype."""
    f = tl.zeros((BN, BD), dtype=tl.float32)
    for c0 in range(0, DV, BK):
        rc = c0 + tl.arange(0, BK)
        c_ok = rc < DV
        x = tl.load(x_ptr + x_base + rn[:, None].to(tl.int64) * x_sn + rc[None, :] * x_sd,
                    mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_ptr + wrow[None, :].to(tl.int64) * w_sr + rc[:, None] * w_sd,
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        f = dot_acc(x, w, f, IEEE)
    if HAS_BIAS:
        f += tl.load(bf_ptr + wrow, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    f = f.to(x_ptr.dtype.element_ty)
    if DOT_FP32:
        f = f.to(tl.float32)
    return f


@triton.jit
def _f_tile(f_ptr, x_ptr, w_ptr, bf_ptr, b, x_base, rn, n_ok, k, col, d_ok, N, S, DI, DV, x_sn, x_sd, w_sr, w_sd,
            MATERIALIZED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
            BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    """The (BN, BD) tile of F: loaded from the materialized F when MATERIALIZED, else formed on chip."""
    if MATERIALIZED:
        f = tl.load(f_ptr + (b.to(tl.int64) * N * S + rn[:, None] * S + k) * DI + col[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            f = f.to(tl.float32)
    else:
        f = _feature_tile(x_ptr, w_ptr, bf_ptr, x_base, rn, n_ok, k * DI + col, d_ok, DV, x_sn, x_sd,
                          w_sr, w_sd, HAS_BIAS, DOT_FP32, IEEE, BN, BD, BK)
    return f


@triton.jit
def _token_tile(n0, N, m_ptr, b, m_sb, m_sn, HAS_MASK: tl.constexpr, BN: tl.constexpr):
    """Image tokens [n0, n0 + BN): their indices, which exist, and which exist and are unmasked."""
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < N
    valid = n_ok
    if HAS_MASK:
        keep = tl.load(m_ptr + b.to(tl.int64) * m_sb + rn * m_sn, mask=n_ok, other=0)
        valid = valid & (keep != 0)
    return rn, n_ok, valid


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _expanded(h0, R, DI, DH, H, HEADS_PER_PROGRAM: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr,
              BD: tl.constexpr):
    """Row/column indices of a program's head group, one row per (head j, request r).

    Row ``e = j * BR + r`` keeps only head ``h0 + j``'s columns, so one dot over
    all BD columns scores every head of the group at once; the result at
    (e, col) belongs to the output only where ``col`` is in head j (``own``).
    """
    re = tl.arange(0, BE)
    j = re // BR
    rr = re % BR
    rd = tl.arange(0, BD)
    col = h0 * DH + rd
    d_ok = (rd < HEADS_PER_PROGRAM * DH) & (col < DI)
    row_ok = (rr < R) & (j < HEADS_PER_PROGRAM) & (h0 + j < H)
    own = row_ok[:, None] & d_ok[None, :] & ((rd // DH)[None, :] == j[:, None])
    return rr, j, col, d_ok, row_ok, own


@triton.jit
def _attend_fwd_kernel(
    r_ptr, x_ptr, m_ptr, w_ptr, bf_ptr, f_ptr, z_ptr, lse_ptr,
    R, N, DV, S, DI, DH, H, scale,
    r_sb, r_sr, r_sd, x_sb, x_sn, x_sd, m_sb, m_sn, w_sr, w_sd,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    MATERIALIZED: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, SAVE: tl.constexpr,
):
    b = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS_PER_PROGRAM
    rr, j, col, d_ok, row_ok, own = _expanded(h0, R, DI, DH, H, HEADS_PER_PROGRAM, BR, BE, BD)
    r = tl.load(r_ptr + b.to(tl.int64) * r_sb + rr[:, None] * r_sr + col[None, :] * r_sd, mask=own, other=0.0)
    r32 = r.to(tl.float32)
    if DOT_FP32:
        r = r32
    x_base = b.to(tl.int64) * x_sb
    m_i = tl.full((BE,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BE,), dtype=tl.float32)
    acc = tl.zeros((BE, BD), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn, n_ok, valid = _token_tile(n0, N, m_ptr, b, m_sb, m_sn, HAS_MASK, BN)
        for k in range(0, S):
            f = _f_tile(f_ptr, x_ptr, w_ptr, bf_ptr, b, x_base, rn, n_ok, k, col, d_ok, N, S, DI, DV, x_sn, x_sd,
                        w_sr, w_sd, MATERIALIZED, HAS_BIAS, DOT_FP32, IEEE, BN, BD, BK)
            s = _mm(r, tl.trans(f), IEEE) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen only masked tokens keeps m = -inf; shifting by 0
            # then gives exp(-inf) = 0 instead of NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _mm(p.to(f.dtype), f, IEEE)
            m_i = m_new
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    out_off = (b.to(tl.int64) * R + rr[:, None]) * DI + col[None, :]
    tl.store(z_ptr + out_off, (o + r32).to(z_ptr.dtype.element_ty), mask=own)
    if SAVE:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0)
        tl.store(lse_ptr + (b.to(tl.int64) * H + h0 + j) * R + rr, lse, mask=row_ok)


@triton.jit
def _attend_bwd_kernel(
    r_ptr, x_ptr, m_ptr, w_ptr, bf_ptr, f_ptr, dz_ptr, lse_ptr, dr_ptr, df_ptr,
    R, N, DV, S, DI, DH, H, scale,
    r_sb, r_sr, r_sd, x_sb, x_sn, x_sd, m_sb, m_sn, w_sr, w_sd, dz_sb, dz_sr, dz_sd,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    MATERIALIZED: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, BR: tl.constexpr, BE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
):
    b = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS_PER_PROGRAM
    rr, j, col, d_ok, row_ok, own = _expanded(h0, R, DI, DH, H, HEADS_PER_PROGRAM, BR, BE, BD)
    r = tl.load(r_ptr + b.to(tl.int64) * r_sb + rr[:, None] * r_sr + col[None, :] * r_sd, mask=own, other=0.0)
    dz = tl.load(dz_ptr + b.to(tl.int64) * dz_sb + rr[:, None] * dz_sr + col[None, :] * dz_sd,
                 mask=own, other=0.0)
    dz32 = dz.to(tl.float32)
    if DOT_FP32:
        r = r.to(tl.float32)
        dz = dz32
    lse = tl.load(lse_ptr + (b.to(tl.int64) * H + h0 + j) * R + rr, mask=row_ok, other=0.0)
    x_base = b.to(tl.int64) * x_sb
    # Pass 1: the softmax of this kernel's own scores, exp(s - lse) / total, and
    # delta = sum_j p_j dp_j under it. The forward's lse and output came from
    # scores rounded along another path (an online softmax, F perhaps formed
    # another way); taking delta from them leaves ds = p (dp - delta) a
    # difference of two near-equal numbers that disagree by that rounding,
    # many times the reference's error where the softmax is nearly one-hot.
    total = tl.zeros((BE,), dtype=tl.float32)
    weighted = tl.zeros((BE,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn, n_ok, valid = _token_tile(n0, N, m_ptr, b, m_sb, m_sn, HAS_MASK, BN)
        pmask = row_ok[:, None] & valid[None, :]
        for k in range(0, S):
            f = _f_tile(f_ptr, x_ptr, w_ptr, bf_ptr, b, x_base, rn, n_ok, k, col, d_ok, N, S, DI, DV, x_sn, x_sd,
                        w_sr, w_sd, MATERIALIZED, HAS_BIAS, DOT_FP32, IEEE, BN, BD, BK)
            e = tl.where(pmask, tl.exp(_mm(r, tl.trans(f), IEEE) * scale - lse[:, None]), 0.0)
            total += tl.sum(e, axis=1)
            weighted += tl.sum(e * _mm(dz, tl.trans(f), IEEE), axis=1)
    # A row with every image token masked has total 0: its p, ds and dF are 0.
    inv = tl.where(total > 0.0, 1.0 / tl.where(total > 0.0, total, 1.0), 0.0)
    delta = weighted * inv
    dr = tl.zeros((BE, BD), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn, n_ok, valid = _token_tile(n0, N, m_ptr, b, m_sb, m_sn, HAS_MASK, BN)
        pmask = row_ok[:, None] & valid[None, :]
        for k in range(0, S):
            f = _f_tile(f_ptr, x_ptr, w_ptr, bf_ptr, b, x_base, rn, n_ok, k, col, d_ok, N, S, DI, DV, x_sn, x_sd,
                        w_sr, w_sd, MATERIALIZED, HAS_BIAS, DOT_FP32, IEEE, BN, BD, BK)
            s = _mm(r, tl.trans(f), IEEE) * scale
            p = tl.where(pmask, tl.exp(s - lse[:, None]), 0.0) * inv[:, None]
            dp = _mm(dz, tl.trans(f), IEEE)
            ds = p * (dp - delta[:, None])
            dr += _mm(ds.to(f.dtype), f, IEEE)
            # Rows of r and dz are zero outside their own head's columns, so the
            # sums over the expanded rows give each column its own head's dF.
            df = _mm(tl.trans(p.to(f.dtype)), dz, IEEE) + _mm(tl.trans(ds.to(f.dtype)), r, IEEE) * scale
            df_off = (b.to(tl.int64) * N * S + rn[:, None] * S + k) * DI + col[None, :]
            tl.store(df_ptr + df_off, df.to(df_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    out_off = (b.to(tl.int64) * R + rr[:, None]) * DI + col[None, :]
    tl.store(dr_ptr + out_off, (dr * scale + dz32).to(dr_ptr.dtype.element_ty), mask=own)


# The widest head group (heads per program x head width, padded to a power of two) the kernels above hold on
# chip: each keeps (BN, BD) tiles of F and a (BE, BD) fp32 accumulator whole. ptxas for sm_90
# (benchmarks/compile_kernels.py): one 768-wide head asked for 270 KB of shared memory and
# spilled 23 KB a thread; at 128 the backward still spilled (32 B a thread in bf16, 1.7 KB in
# fp32, even with BN halved). Wider heads take the folded schedule, which tiles the head width.
MAX_HEAD_GROUP_WIDTH = 64


def folds(head_dim: int, schedule: str = "auto") -> bool:
    """Whether attention with heads ``head_dim`` wide runs the folded schedule (ops/attend_folded.py):
    when it is asked for (``schedule``, a name), or when one head is too wide for these kernels."""
    return schedule == "folded" or pow2(head_dim, 1) > MAX_HEAD_GROUP_WIDTH


class SplitOptions(NamedTuple):
    """An ``AttentionSchedule``'s tile options as the split kernels take them: whether the forward, and a
    backward whose forward kept no F, materialize F (else form its tiles on chip), and the heads a
    program takes; None where the schedule leaves an option to its default (``tile_options``)."""

    forward_materialized: Optional[bool]
    backward_materialized: Optional[bool]
    heads_per_program: Optional[int]

    @staticmethod
    def of(schedule: AttentionSchedule) -> "SplitOptions":
        def materialized(features):
            return None if features is None else features == "materialized"

        return SplitOptions(materialized(schedule.forward_features), materialized(schedule.backward_features),
                            schedule.heads_per_program)


def tile_options(config: str, materialized: Optional[bool], heads_per_program: Optional[int]) -> Tuple[bool, int]:
    """(materialized, heads per program) with an option left None at its default: materialized, one head,
    unless ``CONFIGS[config]`` still sets the deprecated ``SPLIT`` / ``HEADS``."""
    c = CONFIGS[config]
    return (bool(c.get("SPLIT", True)) if materialized is None else bool(materialized),
            int(c.get("HEADS", 1)) if heads_per_program is None else int(heads_per_program))


class AttendBlocks(NamedTuple):
    """Launch parameters of the split kernels: all requests and ``heads`` heads per program (expanded
    to ``be`` = heads·br score rows), as many as fit ``MAX_HEAD_GROUP_WIDTH``; ``materialized`` loads
    the tiles of a materialized F instead of forming them in the kernel."""

    materialized: bool
    heads: int
    br: int
    be: int
    bd: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int

    def constexprs(self) -> dict:
        return dict(MATERIALIZED=self.materialized, HEADS_PER_PROGRAM=self.heads, BR=self.br, BE=self.be,
                    BD=self.bd, BN=self.bn, BK=self.bk, num_warps=self.num_warps, num_stages=self.num_stages)


@config_cache
def attend_blocks(num_req: int, head_dim: int, num_heads: int, config: str, materialized: bool = True,
                  heads_per_program: int = 1) -> AttendBlocks:
    """The ``AttendBlocks`` of ``CONFIGS[config]``'s tile sizes for this shape, with F ``materialized``
    or formed on chip and up to ``heads_per_program`` heads in a program (``benchmarks/tune_triton.py``
    sweeps both)."""
    c = CONFIGS[config]
    heads = max(1, min(heads_per_program, num_heads, MAX_HEAD_GROUP_WIDTH // pow2(head_dim, 1)))
    if interpret():
        bn, bk, warps, stages = 16, 32, 4, 1
    else:
        bn, bk, warps, stages = c["BN"], c["BK"], c["num_warps"], c["num_stages"]
    br = pow2(num_req, 1)
    return AttendBlocks(bool(materialized), heads, br, pow2(heads * br), pow2(heads * head_dim), bn, bk, warps,
                        stages)


def _features(image: torch.Tensor, w_f: torch.Tensor, b_f: Optional[torch.Tensor]) -> torch.Tensor:
    """``F = X W_fᵀ + b_f`` in the storage dtype, contiguous (B, N, S·Di) (row ``n*S + k`` of
    the (B, N·S, Di) view is sub-feature k of token n): one dense product, ``F.linear`` (cuBLAS on a
    GPU; fp32 accumulation on both), so the interpreter's tests run the GPU's code. The product is
    taken on the (B·N, Dv) rows (a copy where the image's strides allow no such view): a 3-D input
    that is not contiguous sends ``F.linear`` to a matmul with the bias added after the product was
    rounded, two roundings of F where this is one."""
    batch, tokens, vision = image.shape
    rows = image.reshape(batch * tokens, vision)
    out = torch.mm(rows, w_f.t()) if b_f is None else torch.addmm(b_f, rows, w_f.t())
    return out.view(batch, tokens, w_f.shape[0])


def _mask_arg(image_mask: Optional[torch.Tensor], image: torch.Tensor):
    if image_mask is None:
        return image, 0, 0
    # A bool tensor reinterpreted as bytes: no copy, and loads as plain integers.
    keep = image_mask.view(torch.uint8)
    return keep, keep.stride(0), keep.stride(1)


def _fwd_fake(requests, image, image_mask, w_f, b_f, num_heads, sub_features, materialized=None,
              heads_per_program=None):
    batch, num_req, width = requests.shape
    materialized = tile_options("attend_fwd", materialized, heads_per_program)[0]
    # F comes back where the forward materializes it; empty where its tiles are formed on chip.
    feats_shape = (batch, image.shape[1], sub_features * width) if materialized else (0,)
    return (requests.new_empty(requests.shape), requests.new_empty((batch, num_heads, num_req), dtype=torch.float32),
            image.new_empty(feats_shape))


class SplitPlan(NamedTuple):
    """Everything of the split forward that follows from the inputs' metadata: z's and the
    log-sum-exp's shapes, whether F is materialized by a dense product first, the attention launch,
    and the tile options the backward takes."""

    shape: Tuple[int, int, int]
    lse_shape: Tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device
    materialized: bool
    attend: Launch
    options: SplitOptions


def _fwd_plan(requests, image, image_mask, w_f, b_f, num_heads, sub_features, materialized: Optional[bool],
              heads_per_program: Optional[int], options: Optional[SplitOptions] = None) -> SplitPlan:
    """The forward's plan: F ``materialized`` by a dense product first or formed on chip, up to
    ``heads_per_program`` heads a program (``tile_options``); ``options`` (the backward's) are kept with it."""
    materialized, heads_per_program = tile_options("attend_fwd", materialized, heads_per_program)
    batch, num_req, width = requests.shape
    tokens, vision = image.shape[1], image.shape[2]
    head_dim = width // num_heads
    dot_fp32, ieee = dot_flags(requests.dtype)
    blocks = attend_blocks(int(num_req), int(head_dim), int(num_heads), "attend_fwd", materialized,
                           heads_per_program)
    # The bool mask is read as bytes (same strides).
    m_sb, m_sn = (0, 0) if image_mask is None else (image_mask.stride(0), image_mask.stride(1))
    scalars = (num_req, tokens, vision, sub_features, width, head_dim, num_heads, 1.0 / math.sqrt(head_dim),
               requests.stride(0), requests.stride(1), requests.stride(2),
               image.stride(0), image.stride(1), image.stride(2), m_sb, m_sn, w_f.stride(0), w_f.stride(1))
    constexprs = dict(HAS_MASK=image_mask is not None, HAS_BIAS=b_f is not None, DOT_FP32=dot_fp32, IEEE=ieee,
                      **blocks.constexprs())
    grid = None if batch == 0 or num_req == 0 else (batch, cdiv(num_heads, blocks.heads))
    return SplitPlan((batch, num_req, width), (batch, num_heads, num_req), requests.dtype, requests.device,
                     blocks.materialized, Launch(grid, scalars, constexprs), options)


def _fwd_launch(wrap, plan: SplitPlan, save, requests, image, image_mask, w_f, b_f):
    """Run the forward plan: z, and with ``save`` the fp32 log-sum-exp kept for backward (otherwise z
    stands in for it and the kernel skips that store); last, F where the plan materializes it, else None."""
    z = torch.empty(plan.shape, device=plan.device, dtype=plan.dtype)
    lse = torch.empty(plan.lse_shape, device=plan.device, dtype=torch.float32) if save else z
    feats = _features(image, w_f, b_f) if plan.materialized else None
    keep = _mask_arg(image_mask, image)[0]
    plan.attend.run(wrap, _attend_fwd_kernel, requests, image, keep, w_f, w_f if b_f is None else b_f,
                    z if feats is None else feats, z, lse, SAVE=save)
    return z, lse, feats


@op("attend_fwd_triton", _fwd_fake)
def attend_fwd(wrap, requests: torch.Tensor, image: torch.Tensor, image_mask: Optional[torch.Tensor],
               w_f: torch.Tensor, b_f: Optional[torch.Tensor], num_heads: int, sub_features: int,
               materialized: Optional[bool] = None, heads_per_program: Optional[int] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z, the fp32 log-sum-exp, and F (``materialized`` by a dense product first; empty where the
    forward forms its tiles on chip); the options left None take their defaults (``tile_options``)."""
    plan = _fwd_plan(requests, image, image_mask, w_f, b_f, num_heads, sub_features, materialized,
                     heads_per_program)
    z, lse, feats = _fwd_launch(wrap, plan, True, requests, image, image_mask, w_f, b_f)
    return z, lse, image.new_empty((0,)) if feats is None else feats


def _bwd_fake(grad, requests, image, image_mask, w_f, b_f, lse, features, num_heads, sub_features, image_grad=True,
              materialized=None, heads_per_program=None):
    return (requests.new_empty(requests.shape), image.new_empty(image.shape if image_grad else (0,)),
            w_f.new_empty(w_f.shape), w_f.new_empty((w_f.shape[0],)))


@op("attend_bwd_triton", _bwd_fake)
def attend_bwd(wrap, grad: torch.Tensor, requests: torch.Tensor, image: torch.Tensor,
               image_mask: Optional[torch.Tensor], w_f: torch.Tensor, b_f: Optional[torch.Tensor],
               lse: torch.Tensor, features: Optional[torch.Tensor], num_heads: int, sub_features: int,
               image_grad: bool = True, materialized: Optional[bool] = None,
               heads_per_program: Optional[int] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of requests, image (empty without ``image_grad``: a frozen vision encoder spares
    the dF W_f product), W_f and b_f; ``features`` is the F the forward returned (kept for backward),
    or None or empty (what a forward that formed F on chip returns) to form F again: ``materialized``
    by a dense product, else tile by tile on chip (None: ``tile_options``' default)."""
    materialized, heads_per_program = tile_options("attend_bwd", materialized, heads_per_program)
    batch, num_req, width = requests.shape
    tokens, vision = image.shape[1], image.shape[2]
    head_dim = width // num_heads
    d_req = torch.empty((batch, num_req, width), device=requests.device, dtype=requests.dtype)
    d_feat = torch.empty((batch, tokens * sub_features, width), device=image.device, dtype=image.dtype)
    keep, m_sb, m_sn = _mask_arg(image_mask, image)
    dot_fp32, ieee = dot_flags(requests.dtype)
    if features is not None and features.numel():
        expected = (batch, tokens, sub_features * width)
        if features.shape != expected or not features.is_contiguous():
            raise ValueError(f"features: expected the forward's contiguous F of shape {expected}, "
                             f"got {tuple(features.shape)} with strides {features.stride()}")
        feats, materialized = features, True
    else:
        feats = _features(image, w_f, b_f) if materialized else d_feat
    blocks = attend_blocks(int(num_req), int(head_dim), int(num_heads), "attend_bwd", materialized,
                           heads_per_program)
    with on_device(d_req):
        wrap(_attend_bwd_kernel)[(batch, cdiv(num_heads, blocks.heads))](
            requests, image, keep, w_f, b_f if b_f is not None else w_f, feats, grad, lse, d_req, d_feat,
            num_req, tokens, vision, sub_features, width, head_dim, num_heads, 1.0 / math.sqrt(head_dim),
            requests.stride(0), requests.stride(1), requests.stride(2),
            image.stride(0), image.stride(1), image.stride(2), m_sb, m_sn, w_f.stride(0), w_f.stride(1),
            grad.stride(0), grad.stride(1), grad.stride(2),
            HAS_MASK=image_mask is not None, HAS_BIAS=b_f is not None, DOT_FP32=dot_fp32, IEEE=ieee,
            **blocks.constexprs(),
        )
    # Row n of dF viewed (B*N, S*Di) is token n's S sub-feature gradients side by side.
    d_feat_rows = d_feat.view(batch * tokens, sub_features * width)
    d_image = torch.mm(d_feat_rows, w_f).view(batch, tokens, vision) if image_grad else image.new_empty((0,))
    d_w = torch.mm(d_feat_rows.t(), image.reshape(batch * tokens, vision))
    d_b = d_feat_rows.sum(0, dtype=torch.float32).to(w_f.dtype)
    return d_req, d_image, d_w, d_b


def _forward(plan, options: Optional[SplitOptions], save: bool, requests, image, image_mask, w_f, b_f, num_heads,
             sub_features):
    """z, then what the backward takes (split: with ``save``): from the cached plan of an eager call, or
    from the registered op while tracing (``plan`` None; ``options`` None for the folded schedule)."""
    if plan is None and options is not None:
        return attend_fwd(requests, image, image_mask, w_f, b_f, num_heads, sub_features,
                          options.forward_materialized, options.heads_per_program)
    if plan is None or isinstance(plan, FoldedPlan):
        return folded_forward(plan, requests, image, image_mask, w_f, b_f, num_heads, sub_features)
    return _fwd_launch(as_is, plan, save, requests, image, image_mask, w_f, b_f)


class AttendFunction(torch.autograd.Function):
    """Both schedules: ``options`` None picks the folded one's forward and backward (ops/attend_folded.py),
    else the split one's with these tile options."""

    @staticmethod
    def forward(ctx, requests, image, image_mask, w_f, b_f, num_heads, sub_features, plan, options):
        z, *saved = _forward(plan, options, True, requests, image, image_mask, w_f, b_f, num_heads, sub_features)
        ctx.save_for_backward(requests, image, image_mask, w_f, b_f, *saved)
        ctx.num_heads, ctx.sub_features, ctx.options = num_heads, sub_features, options
        return z

    @staticmethod
    def backward(ctx, grad):
        requests, image, image_mask, w_f, b_f, *saved = ctx.saved_tensors
        image_grad = ctx.needs_input_grad[1]
        options = ctx.options
        if options is None:
            # The folded backward takes no mask: its saved weights are zero at masked tokens.
            grads = attend_folded_bwd(grad, requests, image, w_f, b_f, *saved, ctx.num_heads, ctx.sub_features,
                                      image_grad)
        else:
            grads = attend_bwd(grad, requests, image, image_mask, w_f, b_f, *saved, ctx.num_heads,
                               ctx.sub_features, image_grad, options.backward_materialized,
                               options.heads_per_program)
        d_req, d_image, d_w, d_b = grads
        return (d_req, d_image if image_grad else None, None, d_w, (d_b if b_f is not None else None), None, None,
                None, None)


def _check(requests, image, image_mask, w_f, b_f, num_heads, sub_features, schedule) -> Optional[SplitOptions]:
    """The arguments' checks; then the split kernels' tile options, or None where the folded schedule runs."""
    record = check_schedule(schedule)
    device, dtype = requests.device, requests.dtype
    check_operand("requests", requests, (None, None, None), dtype, device, "(B, R, Di)")
    batch, _, width = requests.shape
    if not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing Di={width}, got {num_heads!r}")
    if not isinstance(sub_features, int) or sub_features < 1:
        raise ValueError(f"sub_features: expected a positive int, got {sub_features!r}")
    check_operand("image", image, (batch, None, None), dtype, device, "(B, N, Dv)")
    check_operand("w_f", w_f, (sub_features * width, image.shape[2]), dtype, device, "(S*Di, Dv)")
    check_operand("b_f", b_f, (sub_features * width,), dtype, device, "(S*Di,)")
    if image_mask is not None:
        check_tensor("image_mask", image_mask, image.shape[:2], (torch.bool,), device, "(B, N)")
    return None if folds(width // num_heads, record.name) else SplitOptions.of(record)


# Launch plans of both schedules: a FoldedPlan where ``folds`` says so.
_PLANS = PlanCache()


def attend_decomposed(requests: torch.Tensor, image: torch.Tensor, image_mask: Optional[torch.Tensor],
                      w_f: torch.Tensor, b_f: Optional[torch.Tensor], num_heads: int,
                      sub_features: int, schedule: Union[str, AttentionSchedule] = "auto") -> torch.Tensor:
    """Decomposition + attention, ``softmax(r Fᵀ / sqrt(Di/H)) F + r`` per head -> (B, R, Di).

    Same semantics as ``reference.attend_decomposed``; ``schedule`` is a name of
    ``ops.ATTENTION_SCHEDULES`` or an ``AttentionSchedule`` with tile options (docs/design.md §5).
    """
    b_f = dense_bias(b_f)
    args = (requests, image, image_mask, w_f, b_f, num_heads, sub_features)
    if compiling():
        plan, options = None, _check(*args, schedule)
    else:
        key = metadata_key(*args, schedule)
        plan = _PLANS.get(key)
        if plan is None:
            options = _check(*args, schedule)
            plan = _PLANS.add(key, plan_forward(*args) if options is None else _fwd_plan(
                *args, options.forward_materialized, options.heads_per_program, options))
        options = None if isinstance(plan, FoldedPlan) else plan.options
    if needs_grad(requests, image, w_f, b_f):
        return AttendFunction.apply(*args, plan, options)
    return _forward(plan, options, False, *args)[0]
