"""Shared pieces of the Triton ops: interpreter detection, block sizes, dtypes,
and one gather/scatter GEMM that the request (forward and gradients) and the
transmission's forward are built from.

The GEMM computes ``C[m, n] (+)= sum_k A[m, k] B[k, n] (+ bias[n]) (+ rowbias[m % g, n])``
where the rows of A, B (its k index) and C are each described by a ``Rows`` record and
addressed, with ``g`` its ``group``, as

    row(i) = (i // g) * outer_stride + (i % g) * group_stride
             + index[(i // g) * index_outer_stride + (i % g) * index_group_stride] * position_stride

(the ``index`` term only when there is an index), so a batched (B, R, ...) tensor with
arbitrary strides is one matrix without a copy, and a row gather (``hidden[b, request_pos[b]]``)
or scatter (``E[b, slot_pos[b, j]]``) costs nothing extra. Rows whose position falls outside
``[0, limit)`` are never read (zeros) nor written, so bad positions cannot touch memory outside
the tensor.

A launch may also run P such GEMMs side by side (the third grid axis, ``batch``):
GEMM p offsets A and B by ``(p // gemms_per_block) * gemm_stride`` elements, C by
``p * gemm_stride`` and C's index by ``p * index_gemm_stride``, and the bias and row bias by
their own stride times p, so the per-slot transmission's K matrices (slot j reading request
``j // (K/R)``) are one launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton



@functools.lru_cache(maxsize=None)
def interpret() -> bool:
    """True when kernels run on the CPU through the Triton interpreter (read
    once: the variable only matters before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    # triton.cdiv is a constexpr function in newer tritons, several µs per host call.
    return -(-a // b)


def pow2(n: int, low: int = 16, high: Optional[int] = None) -> int:
    """The next power of two >= n, at least ``low`` (tl.dot needs 16), at most ``high``."""
    size = max(low, 1 << (max(int(n), 1) - 1).bit_length())
    return size if high is None else min(size, high)


def dot_flags(dtype: torch.dtype):
    """(DOT_FP32, IEEE): the interpreter cannot dot fp16/bf16 reliably, so it
    computes in fp32; on a GPU fp16/bf16 dot natively with fp32 accumulation and
    fp32 uses exact (non-tf32) products so fp32 parity stays tight."""
    if interpret():
        return True, False
    return dtype == torch.float32, dtype == torch.float32


def dense_bias(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels read a bias (or each row of a (P, N) one) as a unit-stride vector (and launch plans
    are cached on that assumption), so a strided one is copied first; autograd sees the copy."""
    if bias is None or bias.stride(-1) == 1:
        return bias
    return bias.contiguous()


_NO_GUARD = contextlib.nullcontext()


def on_device(tensor: torch.Tensor):
    """A context in which ``tensor``'s CUDA device is current. Triton launches on the current
    device and its current stream, so without it a model on cuda:1 while cuda:0 is current would
    launch on the wrong device (an illegal access), or unordered against cuda:1's stream (as
    csrc's launches avoid with ``CUDAGuard``)."""
    if tensor.device.type != "cuda":
        return _NO_GUARD
    return torch.cuda.device(tensor.device)


def bump_version(tensor: torch.Tensor) -> None:
    """Record an in-place write that autograd did not see (a kernel launched outside it), as
    built-in in-place ops do, so that a graph that saved ``tensor`` refuses to run its backward
    instead of silently using the new values."""
    torch.autograd.graph.increment_version(tensor)


def needs_grad(*tensors) -> bool:
    """Whether autograd must record this call: grad mode on and some input requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def as_is(kernel):
    """The launcher of an eager call: the kernel itself."""
    return kernel


def compiling() -> bool:
    """True while torch.compile traces: the ops are then reached through the registered
    ``torch.ops.lmeye_fast`` ops (which the compiler understands), never through launch plans."""
    return torch.compiler.is_compiling()


def op(name: str, fake, mutates_args=()):
    """Register ``fn(wrap, ...)`` as ``torch.ops.lmeye_fast.<name>`` with the fake (shape-only) impl
    ``fake``, and hand back the op's one entry point: the registered op while torch.compile traces,
    ``fn(as_is, ...)`` otherwise. ``fn`` launches every kernel as ``wrap(kernel)``.

    On a GPU the op is a ``triton_op`` launching ``wrap_triton(kernel)``, so torch.compile sees and
    can fuse the kernels. The interpreter's kernels cannot be traced (``wrap_triton`` hands them
    back unwrapped and they would run on fake tensors), so there the op is an opaque ``custom_op``
    that compiled graphs call as a unit, launching the kernels as they are.

    Eager calls skip the registered op: a trip through the dispatcher, the custom-op autograd
    wrapper and the triton_op backend costs about 150 µs of CPU per call, several times the
    kernels' GPU time. The IPN's eager forwards (``request``, ``attend_decomposed``,
    ``transmit_interleave``) go further and launch from cached plans (``PlanCache``) without ``fn``.
    """

    def register(fn):
        wrap = as_is if interpret() else wrap_triton

        def body(*args, **kwargs):
            return fn(wrap, *args, **kwargs)

        # The schema is inferred from the signature, less ``wrap``, with its annotations resolved
        # where ``fn`` is defined.
        signature = inspect.signature(fn, eval_str=True)
        body.__signature__ = signature.replace(parameters=tuple(signature.parameters.values())[1:])
        make = custom_op if interpret() else triton_op
        make(f"lmeye_fast::{name}", body, mutates_args=mutates_args).register_fake(fake)
        registered = getattr(torch.ops.lmeye_fast, name)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if compiling():
                return registered(*args, **kwargs)
            return fn(as_is, *args, **kwargs)

        call.__signature__ = body.__signature__
        return call

    return register


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rows:
    """How the rows of one GEMM operand are addressed (see the module docstring); built by name only.
    ``tensor`` may be None where only the addressing is needed (a cached launch plan)."""

    tensor: Optional[torch.Tensor]
    outer_stride: int
    column_stride: int  # stride of the other (column) index
    group: int = 1
    group_stride: int = 0
    index: Optional[torch.Tensor] = None
    index_outer_stride: int = 0
    index_group_stride: int = 0
    position_stride: int = 0  # the tensor's stride per unit of an index value
    limit: int = 0  # index values outside [0, limit) address no row
    gemm_stride: int = 0  # between the GEMMs of a batched launch (see the module docstring)
    gemms_per_block: int = 1  # A and B: GEMM p reads block p // gemms_per_block
    index_gemm_stride: int = 0  # C: the index's stride between GEMMs


def rows2d(t: torch.Tensor, transpose: bool = False) -> Rows:
    """A plain 2-D matrix (or its transpose) as GEMM rows."""
    if transpose:
        return Rows(tensor=t, outer_stride=t.stride(1), column_stride=t.stride(0))
    return Rows(tensor=t, outer_stride=t.stride(0), column_stride=t.stride(1))


def rows3d(t: torch.Tensor) -> Rows:
    """A (P, Q, W) tensor as P*Q rows of width W, any strides."""
    return Rows(tensor=t, outer_stride=t.stride(0), column_stride=t.stride(2), group=t.shape[1],
                group_stride=t.stride(1))


class RowBias(NamedTuple):
    """How a GEMM launch adds its row bias: row ``m % group`` of a (group, N) tensor to row m of one GEMM,
    or, batched, row p of a (P, N) tensor to every row of GEMM p (``gemm_stride`` between them)."""

    group: int
    row_stride: int
    column_stride: int
    gemm_stride: int


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b``; IEEE keeps float32 products exact (no tf32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _row_offsets(i, g, s0, s1, idx_ptr, is0, is1, si, lim, valid, HAS_IDX: tl.constexpr):
    outer = i // g
    inner = i % g
    off = outer.to(tl.int64) * s0 + inner.to(tl.int64) * s1
    if HAS_IDX:
        pos = tl.load(idx_ptr + outer * is0 + inner * is1, mask=valid, other=0).to(tl.int64)
        valid = valid & (pos >= 0) & (pos < lim)
        off += pos * si
    return off, valid


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, rowbias_ptr, colsum_ptr, a_idx, b_idx, c_idx,
    M, N, K,
    a_g, a_s0, a_s1, a_k, a_is0, a_is1, a_si, a_lim,
    b_g, b_s0, b_s1, b_n, b_is0, b_is1, b_si, b_lim,
    c_g, c_s0, c_s1, c_n, c_is0, c_is1, c_si, c_lim,
    rb_g, rb_s, rb_n,
    a_sp, a_pdiv, b_sp, b_pdiv, c_sp, c_isp, bias_sp, rb_sp,
    A_IDX: tl.constexpr, B_IDX: tl.constexpr, C_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ROWBIAS: tl.constexpr, ACCUMULATE: tl.constexpr, COLSUM: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_p = tl.program_id(2)
    p64 = pid_p.to(tl.int64)
    a_ptr += (pid_p // a_pdiv).to(tl.int64) * a_sp
    b_ptr += (pid_p // b_pdiv).to(tl.int64) * b_sp
    c_ptr += p64 * c_sp
    c_idx += p64 * c_isp
    bias_ptr += p64 * bias_sp
    rowbias_ptr += p64 * rb_sp
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    a_off, a_ok = _row_offsets(rm, a_g, a_s0, a_s1, a_idx, a_is0, a_is1, a_si, a_lim, m_ok, A_IDX)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rsum = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        b_off, b_ok = _row_offsets(rk, b_g, b_s0, b_s1, b_idx, b_is0, b_is1, b_si, b_lim, k_ok, B_IDX)
        a = tl.load(a_ptr + a_off[:, None] + rk[None, :].to(tl.int64) * a_k,
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_off[:, None] + rn[None, :].to(tl.int64) * b_n,
                    mask=b_ok[:, None] & n_ok[None, :], other=0.0)
        if COLSUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        acc = dot_acc(a, b, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ROWBIAS:
        rb = tl.load(rowbias_ptr + (rm % rb_g)[:, None] * rb_s + rn[None, :] * rb_n,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += rb.to(tl.float32)
    c_off, c_ok = _row_offsets(rm, c_g, c_s0, c_s1, c_idx, c_is0, c_is1, c_si, c_lim, m_ok, C_IDX)
    c_ptrs = c_ptr + c_off[:, None] + rn[None, :].to(tl.int64) * c_n
    c_mask = c_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    if COLSUM:
        tl.store(colsum_ptr + rm, rsum.to(colsum_ptr.dtype.element_ty), mask=m_ok & (pid_n == 0))


# Launch configurations (block sizes, warps, software-pipeline depth) of the
# kernels whose best choice depends on the GPU, as measured at the LMEye-7B
# shape on an H200 (`benchmarks/tune_triton.py` times the candidates and prints this
# dict). Block sizes shrink by themselves for smaller problems.
CONFIGS = {
    "request_fwd": {"BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4},
    "transmit_fwd": {"BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
    "attend_fwd": {"BN": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
    "attend_bwd": {"BN": 64, "BK": 64, "num_warps": 4, "num_stages": 2},
    # Not yet timed on a GPU: the largest tiles that ptxas compiles for sm_90 in bf16 without
    # spills (benchmarks/compile_kernels.py).
    "attend_folded": {"BM": 32, "BE": 64, "BG": 64, "BN": 32, "BV": 64, "BK": 64, "num_warps": 8,
                      "num_stages": 3},
}


_CONFIG_CACHES = []
CONFIG_CACHED = []  # the memoised configuration functions, for their cache_info()


CONFIG_CACHE_LIMIT = 1024


def config_cache(fn):
    """Memoise a launch-configuration function (at most ``CONFIG_CACHE_LIMIT`` shapes, least
    recently used dropped first); ``set_config`` invalidates it."""
    cached = functools.lru_cache(maxsize=CONFIG_CACHE_LIMIT)(fn)
    _CONFIG_CACHES.append(cached.cache_clear)
    CONFIG_CACHED.append(cached)
    return cached


class Launch(NamedTuple):
    """One kernel launch as metadata: its grid (None when there is nothing to compute), the scalar
    arguments after the tensors, and the compile-time constants with num_warps/num_stages."""

    grid: Optional[Tuple[int, ...]]
    scalars: tuple
    constexprs: dict

    def run(self, wrap, kernel, *tensors, **constexprs) -> None:
        """Launch ``wrap(kernel)`` on ``tensors`` (then the scalars) on their device; ``constexprs``
        are a call's own constants beside the plan's."""
        if self.grid is not None:
            with on_device(tensors[0]):
                wrap(kernel)[self.grid](*tensors, *self.scalars, **self.constexprs, **constexprs)


NOTHING = Launch(None, (), {})


PLAN_CACHES = []  # every op's PlanCache


class PlanCache(dict):
    """Launch plans of one op keyed by its inputs' metadata (shapes, strides,
    dtypes, devices, flags). A key is stored only after the op's argument
    checks passed for it, so a hit skips both the checks and the launch
    arithmetic; ``set_config`` empties it. Bounded, as shapes that change on
    every call (a growing sequence) would otherwise grow it forever."""

    LIMIT = 512

    def __init__(self):
        super().__init__()
        _CONFIG_CACHES.append(self.clear)
        PLAN_CACHES.append(self)

    def add(self, key, plan):
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = plan
        return plan


def set_config(name: str, values: dict) -> None:
    """Replace ``CONFIGS[name]`` (e.g. with a sweep's winner) for every later launch."""
    if name not in CONFIGS:
        raise KeyError(f"name: expected one of {tuple(CONFIGS)}, got {name!r}")
    if name in ("attend_fwd", "attend_bwd") and ("SPLIT" in values or "HEADS" in values):
        warnings.warn(f"CONFIGS[{name!r}]: the keys SPLIT and HEADS are deprecated (still honoured as the default "
                      "of layers that leave the option unset): set the tile options per layer, "
                      "InteractiveLayer(attention=AttentionSchedule('split', forward_features=..., "
                      "backward_features=..., heads_per_program=...))", DeprecationWarning, stacklevel=2)
    CONFIGS[name] = dict(values)
    for clear in _CONFIG_CACHES:
        clear()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _heuristic_blocks(m: int, n: int, k: int, device_index: int):
    # Small-M GEMMs here are weight-bandwidth bound, so N is split until every
    # SM has a program streaming the weight.
    bm = pow2(m, 16, 64)
    bk = 64 if bm >= 64 else 128
    sms = _sm_count(device_index)
    bn = 128
    while bn > 16 and cdiv(n, bn) * cdiv(m, bm) < 2 * sms:
        bn //= 2
    if bm * bn >= 64 * 128:
        # At 4 warps a 64x128 tile spills registers (1.4 KB a thread in bf16, 8.8 KB in fp32 by
        # ptxas for sm_90: benchmarks/compile_kernels.py); 8 warps with BK=32 keep it in registers.
        return bm, bn, 32, 8, 3
    return bm, bn, bk, 4, 3


# Callers pass plain ints: a traced (symbolic) size is specialised here, as the
# kernels' block sizes are compile-time constants anyway.
@config_cache
def gemm_blocks(m: int, n: int, k: int, device_index: int, config: Optional[str] = None):
    """(BM, BN, BK, num_warps, num_stages) for one GEMM shape, cached so a launch costs no arithmetic."""
    if interpret():
        return pow2(m, 16, 32), pow2(n, 16, 32), pow2(k, 16, 32), 4, 1
    if config is None:
        return _heuristic_blocks(m, n, k, device_index)
    c = CONFIGS[config]
    return pow2(m, 16, 64), pow2(n, 16, c["BN"]), pow2(k, 16, c["BK"]), c["num_warps"], c["num_stages"]


def row_bias(rowbias: Optional[torch.Tensor], batch: int = 1) -> Optional[RowBias]:
    """``gemm_plan``'s description of a row bias: (g, N) added as ``rowbias[m % g]`` by one GEMM, or
    (P, N) with row p added to every row of GEMM p of a batched launch."""
    if rowbias is None:
        return None
    if batch == 1:
        return RowBias(group=rowbias.shape[0], row_stride=rowbias.stride(0), column_stride=rowbias.stride(-1),
                       gemm_stride=0)
    return RowBias(group=1, row_stride=0, column_stride=rowbias.stride(1), gemm_stride=rowbias.stride(0))


def bias_stride(bias: Optional[torch.Tensor], batch: int = 1) -> int:
    """The bias's stride between the GEMMs of a batched launch ((P, N), unit-stride rows)."""
    return 0 if bias is None or batch == 1 else bias.stride(0)


def device_index(t: torch.Tensor) -> int:
    index = t.device.index
    return 0 if index is None else index


_NO_ROW_BIAS = RowBias(group=1, row_stride=0, column_stride=0, gemm_stride=0)


def _row_scalars(r: Rows) -> tuple:
    return (r.group, r.outer_stride, r.group_stride, r.column_stride, r.index_outer_stride, r.index_group_stride,
            r.position_stride, r.limit)


def gemm_plan(*, a: Rows, b: Rows, c: Rows, m: int, n: int, k: int, dtype: torch.dtype, device: int,
              bias: bool = False, rowbias: Optional[RowBias] = None, colsum: bool = False,
              accumulate: bool = False, config: Optional[str] = None, batch: int = 1, bias_gemm_stride: int = 0):
    """The ``Launch`` of ``batch`` GEMMs (``NOTHING`` when there is nothing to compute).

    Only the addressing of ``a``, ``b``, ``c`` is read (their ``tensor`` may be None); ``rowbias``
    describes the row bias (``row_bias``), ``bias_gemm_stride`` is the bias's stride between GEMMs.
    ``launch_gemm`` supplies the pointers, so a plan can be cached.
    """
    if m == 0 or n == 0 or batch == 0:
        return NOTHING
    dot_fp32, ieee = dot_flags(dtype)
    bm, bn, bk, warps, stages = gemm_blocks(int(m), int(n), int(k), device, config)
    rb = _NO_ROW_BIAS if rowbias is None else rowbias
    scalars = (
        m, n, k, *_row_scalars(a), *_row_scalars(b), *_row_scalars(c),
        rb.group, rb.row_stride, rb.column_stride,
        a.gemm_stride, a.gemms_per_block, b.gemm_stride, b.gemms_per_block, c.gemm_stride, c.index_gemm_stride,
        bias_gemm_stride, rb.gemm_stride,
    )
    constexprs = dict(
        A_IDX=a.index is not None, B_IDX=b.index is not None, C_IDX=c.index is not None,
        HAS_BIAS=bias, HAS_ROWBIAS=rowbias is not None, ACCUMULATE=accumulate,
        COLSUM=colsum, DOT_FP32=dot_fp32, IEEE=ieee, BM=bm, BN=bn, BK=bk,
        num_warps=warps, num_stages=stages,
    )
    return Launch((cdiv(n, bn), cdiv(m, bm), batch), scalars, constexprs)


def launch_gemm(wrap, plan: Launch, *, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                bias: Optional[torch.Tensor] = None, rowbias: Optional[torch.Tensor] = None,
                colsum: Optional[torch.Tensor] = None, a_index: Optional[torch.Tensor] = None,
                b_index: Optional[torch.Tensor] = None, c_index: Optional[torch.Tensor] = None) -> None:
    """Launch ``plan`` (from ``gemm_plan``) on these tensors, each named. The kernel takes a pointer for
    every operand, so an absent one is passed as ``c``; the plan's flags keep the kernel from reading it."""
    plan.run(wrap, _gemm_kernel, a, b, c, c if bias is None else bias, c if rowbias is None else rowbias,
             c if colsum is None else colsum, c if a_index is None else a_index, c if b_index is None else b_index,
             c if c_index is None else c_index)


def gemm(wrap, *, a: Rows, b: Rows, c: Rows, m: int, n: int, k: int, bias: Optional[torch.Tensor] = None,
         rowbias: Optional[torch.Tensor] = None, colsum: Optional[torch.Tensor] = None,
         accumulate: bool = False, config: Optional[str] = None, batch: int = 1) -> None:
    """Launch the gather/scatter GEMM (see the module docstring) into ``c.tensor`` as ``wrap(kernel)``.

    ``rowbias`` (g, N) is added to row m as ``rowbias[m % g]``; ``colsum`` (M,)
    receives ``sum_k A[m, k]`` accumulated in fp32 (a bias gradient for free
    when A is a transposed output gradient). ``config`` names an entry of
    ``CONFIGS``; without one the block sizes follow a bandwidth heuristic.
    With ``batch`` = P GEMMs, GEMM p adds ``bias[p]`` and ``rowbias[p]``
    ((P, N) each; one row bias row per GEMM) and writes no column sums.
    """
    plan = gemm_plan(a=a, b=b, c=c, m=m, n=n, k=k, dtype=a.tensor.dtype, device=device_index(a.tensor),
                     bias=bias is not None, rowbias=row_bias(rowbias, batch), colsum=colsum is not None,
                     accumulate=accumulate, config=config, batch=batch, bias_gemm_stride=bias_stride(bias, batch))
    launch_gemm(wrap, plan, a=a.tensor, b=b.tensor, c=c.tensor, bias=bias, rowbias=rowbias, colsum=colsum,
                a_index=a.index, b_index=b.index, c_index=c.index)
