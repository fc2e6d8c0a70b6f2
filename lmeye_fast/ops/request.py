"""Request acquisition (docs/design.md §2 step 1) in Triton: the gather of the
request rows ``hidden[b, request_pos[b]]`` is the A-operand addressing of the
projection GEMM, so no (B, D) copy and no host sync happen.

Forward: one launch. Backward: two launches, ``d hidden`` scattered straight
into the request rows of a zero (B, T, D) gradient, and ``d W_q`` with
``d b_q`` as the column sums of the same pass (fp32 accumulation).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..checks import INDEX_DTYPES, check_operand, check_tensor, metadata_key
from .triton_launch import (Launch, PlanCache, Rows, as_is, compiling, dense_bias, device_index, gemm, gemm_plan,
                            launch_gemm, needs_grad, op, rows2d)


def _hidden_rows(hidden: torch.Tensor, request_pos: Optional[torch.Tensor]) -> Rows:
    if request_pos is None:
        return rows2d(hidden)
    return Rows(tensor=hidden, outer_stride=hidden.stride(0), column_stride=hidden.stride(2), index=request_pos,
                index_outer_stride=request_pos.stride(0), position_stride=hidden.stride(1), limit=hidden.shape[1])


def _fwd_fake(hidden, request_pos, w_q, b_q):
    return hidden.new_empty((hidden.shape[0], w_q.shape[0]))


def _bwd_fake(grad, hidden, request_pos, w_q, hidden_grad=True):
    return (hidden.new_empty(hidden.shape if hidden_grad else (0,)), w_q.new_empty(w_q.shape),
            w_q.new_empty((w_q.shape[0],)))


@op("request_fwd_triton", _fwd_fake)
def request_fwd(wrap, hidden: torch.Tensor, request_pos: Optional[torch.Tensor], w_q: torch.Tensor,
                b_q: Optional[torch.Tensor]) -> torch.Tensor:
    batch, width = hidden.shape[0], hidden.shape[-1]
    out = torch.empty((batch, w_q.shape[0]), device=hidden.device, dtype=hidden.dtype)
    gemm(wrap, a=_hidden_rows(hidden, request_pos), b=rows2d(w_q, transpose=True), c=rows2d(out),
         m=batch, n=w_q.shape[0], k=width, bias=b_q, config="request_fwd")
    return out


@op("request_bwd_triton", _bwd_fake)
def request_bwd(wrap, grad: torch.Tensor, hidden: torch.Tensor, request_pos: Optional[torch.Tensor],
                w_q: torch.Tensor, hidden_grad: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d hidden (empty without ``hidden_grad``: a frozen prefix spares zeroing a (B, T, D) tensor),
    d W_q and d b_q."""
    batch, width = hidden.shape[0], hidden.shape[-1]
    outs = w_q.shape[0]
    if hidden_grad:
        # Only the request rows receive a gradient; every other row is exactly zero.
        d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=hidden.dtype)
        gemm(wrap, a=rows2d(grad), b=rows2d(w_q), c=_hidden_rows(d_hidden, request_pos), m=batch, n=width, k=outs)
    else:
        d_hidden = hidden.new_empty((0,))
    d_w = torch.empty(w_q.shape, device=w_q.device, dtype=w_q.dtype)
    d_b = torch.empty((outs,), device=w_q.device, dtype=w_q.dtype)
    gemm(wrap, a=rows2d(grad, transpose=True), b=_hidden_rows(hidden, request_pos), c=rows2d(d_w),
         m=outs, n=width, k=batch, colsum=d_b)
    return d_hidden, d_w, d_b


class RequestFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, request_pos, w_q, b_q, plan):
        ctx.save_for_backward(hidden, request_pos, w_q)
        ctx.has_bias = b_q is not None
        if plan is None:
            return request_fwd(hidden, request_pos, w_q, b_q)
        return _launch(plan, hidden, request_pos, w_q, b_q)

    @staticmethod
    def backward(ctx, grad):
        hidden, request_pos, w_q = ctx.saved_tensors
        hidden_grad = ctx.needs_input_grad[0]
        # The eager forward returns (B, R, Di), the registered op (B, R*Di).
        d_hidden, d_w, d_b = request_bwd(grad.reshape(grad.shape[0], w_q.shape[0]), hidden, request_pos, w_q,
                                         hidden_grad)
        return (d_hidden if hidden_grad else None), None, d_w, (d_b if ctx.has_bias else None), None


def _check(hidden, request_pos, w_q, b_q, num_requests):
    dtype = hidden.dtype
    if request_pos is None:
        check_operand("hidden", hidden, (None, None), dtype, hidden.device, "(B, D) request vectors")
    else:
        check_operand("hidden", hidden, (None, None, None), dtype, hidden.device, "(B, T, D)")
        check_tensor("request_pos", request_pos, (hidden.shape[0],), INDEX_DTYPES, hidden.device, "(B,)")
    check_operand("w_q", w_q, (None, hidden.shape[-1]), dtype, hidden.device, "(R*Di, D)")
    if w_q.shape[0] % num_requests:
        raise ValueError(f"w_q (R*Di, D): rows must be a multiple of num_requests={num_requests}, got {w_q.shape[0]}")
    check_operand("b_q", b_q, (w_q.shape[0],), dtype, hidden.device, "(R*Di,)")


class RequestPlan(NamedTuple):
    """The forward's output (B, R, Di) and its GEMM launch."""

    shape: Tuple[int, int, int]
    dtype: torch.dtype
    device: torch.device
    gemm: Launch


_PLANS = PlanCache()


def _plan(key, hidden, request_pos, w_q, b_q, num_requests) -> RequestPlan:
    _check(hidden, request_pos, w_q, b_q, num_requests)
    batch, width, outs = hidden.shape[0], hidden.shape[-1], w_q.shape[0]
    # The (B, R, Di) output is addressed as its contiguous (B, R*Di) rows.
    launch = gemm_plan(a=_hidden_rows(hidden, request_pos), b=rows2d(w_q, transpose=True),
                       c=Rows(tensor=None, outer_stride=outs, column_stride=1), m=batch, n=outs, k=width,
                       dtype=hidden.dtype, device=device_index(hidden), bias=b_q is not None, config="request_fwd")
    return _PLANS.add(key, RequestPlan((batch, num_requests, outs // num_requests), hidden.dtype, hidden.device,
                                       launch))


def _launch(plan: RequestPlan, hidden, request_pos, w_q, b_q):
    out = torch.empty(plan.shape, dtype=plan.dtype, device=plan.device)
    launch_gemm(as_is, plan.gemm, a=hidden, b=w_q, c=out, bias=b_q, a_index=request_pos)
    return out


def request(hidden: torch.Tensor, request_pos: Optional[torch.Tensor], w_q: torch.Tensor,
            b_q: Optional[torch.Tensor], num_requests: int) -> torch.Tensor:
    """``reshape(W_q · hidden[b, request_pos[b]] + b_q, (R, Di))`` -> (B, R, Di); see ``reference.request``."""
    b_q = dense_bias(b_q)
    if compiling():
        _check(hidden, request_pos, w_q, b_q, num_requests)
        out = RequestFunction.apply(hidden, request_pos, w_q, b_q, None)
        return out.view(hidden.shape[0], num_requests, w_q.shape[0] // num_requests)
    key = metadata_key(hidden, request_pos, w_q, b_q, num_requests)
    plan = _PLANS.get(key) or _plan(key, hidden, request_pos, w_q, b_q, num_requests)
    if needs_grad(hidden, w_q, b_q):
        return RequestFunction.apply(hidden, request_pos, w_q, b_q, plan)
    return _launch(plan, hidden, request_pos, w_q, b_q)
