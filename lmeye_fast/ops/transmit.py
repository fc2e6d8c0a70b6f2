"""Transmission (docs/design.md §2 step 4) with the interleave (step 5) as its epilogue.

The weight's rank says which transmission runs; both take the same arguments.

Shared (``w_o`` (D, Di)): ``t = z W_oᵀ + b_o + e_slot`` is one GEMM over the
B·R rows of z (any strides); bias and slot embedding (``e_slot[row % R]``) are
added in the epilogue.

Per slot (``w_o`` (K, D, Di), K a multiple of R): ``t_(b,j) = W_o[j] z_(b, j // (K/R))
+ b_o[j] + e_slot[j]`` is one launch of K GEMMs side by side (the GEMM's batch
axis), GEMM j reading its own (D, Di) matrix and request ``j // (K/R)`` of every
row, with ``b_o[j] + e_slot[j]`` in its epilogue.

``transmit_interleave`` stores nothing else: the epilogue loads the slot rows
``E[b, slot_pos[b, j]]``, adds in fp32, rounds once to E's dtype and stores
them back, so the sequence is never copied in place mode (out of place, one
copy of E is the result). Slot positions outside ``[0, T')`` are skipped.

Backward: ``dE`` passes through; ``dt`` is gathered from the slot rows; then
``dz = dt W_o`` and ``dW_o = dtᵀ z``, each skipped when its input needs no
gradient, ``d e_slot = Σ_b dt`` and ``db_o``, the fp32 sum of dt over all its
rows (shared) or ``d e_slot`` itself (per slot). Per slot, ``dz`` sums over
the K/R slots of a request as the reduction of R GEMMs over (K/R)·D, and
``dW_o`` is R GEMMs over the batch. The dense GEMMs are ``torch.mm`` /
``torch.bmm`` on every device (cuBLAS on a GPU, fp32 accumulation; fp32
inputs stay exact IEEE fp32 unless the caller enabled TF32), so the
interpreter's tests run the GPU's backward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from ..checks import check_operand, check_writable, metadata_key
from ..reference import slot_groups
from .interleave import check_slots, gather_slots
from .triton_launch import (PlanCache, Rows, as_is, bias_stride, bump_version, compiling, dense_bias, device_index,
                            gemm, gemm_plan, launch_gemm, needs_grad, op, row_bias, rows2d, rows3d)


def _per_slot(w_o: torch.Tensor) -> bool:
    return w_o.dim() == 3


def _out_shape(z: torch.Tensor, w_o: torch.Tensor) -> Tuple[int, int, int]:
    """(B, K, D): K = R shared, the weight's K per slot."""
    if _per_slot(w_o):
        return z.shape[0], w_o.shape[0], w_o.shape[1]
    return z.shape[0], z.shape[1], w_o.shape[0]


class _Projection(NamedTuple):
    """The forward GEMM(s): rows of z, the weight as (Di, D), the sizes and the GEMM count."""

    z: Rows
    w_o: Rows
    m: int
    n: int
    k: int
    batch: int


def _projection(z: torch.Tensor, w_o: torch.Tensor) -> _Projection:
    batch, num_req, width = z.shape
    if not _per_slot(w_o):
        return _Projection(z=rows3d(z), w_o=rows2d(w_o, transpose=True), m=batch * num_req, n=w_o.shape[0],
                           k=width, batch=1)
    # GEMM j: row b of z's request j // (K/R) times w_o[j]ᵀ.
    groups = w_o.shape[0] // num_req
    return _Projection(
        z=Rows(tensor=z, outer_stride=z.stride(0), column_stride=z.stride(2), gemm_stride=z.stride(1),
               gemms_per_block=groups),
        w_o=Rows(tensor=w_o, outer_stride=w_o.stride(2), column_stride=w_o.stride(1), gemm_stride=w_o.stride(0)),
        m=batch, n=w_o.shape[1], k=width, batch=w_o.shape[0])


def _target_rows(target: torch.Tensor, slot_pos: Optional[torch.Tensor], num_slots: int, per_slot: bool) -> Rows:
    """Where the projection's rows go: a (B, K, D) tensor, or with ``slot_pos`` the slot rows
    ``target[b, slot_pos[b, j]]`` of a (B, T', D) sequence. Shared, row ``b*K + j`` of one GEMM; per
    slot, row b of GEMM j. Only the strides and shape of ``target`` are read."""
    if slot_pos is None:
        if per_slot:
            return Rows(tensor=target, outer_stride=target.stride(0), column_stride=target.stride(2),
                        gemm_stride=target.stride(1))
        return rows3d(target)
    slots = dict(tensor=target, outer_stride=target.stride(0), column_stride=target.stride(2), index=slot_pos,
                 index_outer_stride=slot_pos.stride(0), position_stride=target.stride(1), limit=target.shape[1])
    if per_slot:
        return Rows(**slots, index_gemm_stride=slot_pos.stride(1))
    return Rows(**slots, group=num_slots, index_group_stride=slot_pos.stride(1))


def _project(wrap, z, w_o, b_o, slot_embed, target: Rows, accumulate: bool) -> None:
    p = _projection(z, w_o)
    gemm(wrap, a=p.z, b=p.w_o, c=target, m=p.m, n=p.n, k=p.k, bias=b_o, rowbias=slot_embed, accumulate=accumulate,
         config="transmit_fwd", batch=p.batch)


def _fwd_fake(z, w_o, b_o, slot_embed):
    return z.new_empty(_out_shape(z, w_o))


def _out_fake(z, w_o, b_o, slot_embed, embeds, slot_pos):
    return torch.empty_like(embeds)


def _inplace_fake(z, w_o, b_o, slot_embed, embeds, slot_pos):
    return None


def _bwd_fake(grad, z, w_o, z_grad=True, w_grad=True):
    _, num_slots, llm = _out_shape(z, w_o)
    return (z.new_empty(z.shape if z_grad else (0,)), w_o.new_empty(w_o.shape if w_grad else (0,)),
            w_o.new_empty(w_o.shape[:2] if _per_slot(w_o) else (llm,)), w_o.new_empty((num_slots, llm)))


@op("transmit_fwd_triton", _fwd_fake)
def transmit_fwd(wrap, z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                 slot_embed: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(_out_shape(z, w_o), device=z.device, dtype=z.dtype)
    _project(wrap, z, w_o, b_o, slot_embed, _target_rows(out, None, out.shape[1], _per_slot(w_o)), accumulate=False)
    return out


@op("transmit_interleave_triton", _out_fake)
def transmit_interleave_out(wrap, z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                            slot_embed: Optional[torch.Tensor], embeds: torch.Tensor,
                            slot_pos: torch.Tensor) -> torch.Tensor:
    out = embeds.clone()
    rows = _target_rows(out, slot_pos, slot_pos.shape[1], _per_slot(w_o))
    _project(wrap, z, w_o, b_o, slot_embed, rows, accumulate=True)
    return out


@op("transmit_interleave_triton_", _inplace_fake, mutates_args=("embeds",))
def transmit_interleave_inplace(wrap, z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                                slot_embed: Optional[torch.Tensor], embeds: torch.Tensor,
                                slot_pos: torch.Tensor) -> None:
    rows = _target_rows(embeds, slot_pos, slot_pos.shape[1], _per_slot(w_o))
    _project(wrap, z, w_o, b_o, slot_embed, rows, accumulate=True)


def _shared_bwd(grad, z, w_o, z_grad, w_grad):
    batch, num_req, width = z.shape
    llm = w_o.shape[0]
    d_z, d_w = z.new_empty((0,)), w_o.new_empty((0,))
    rows = grad.reshape(batch * num_req, llm)
    if z_grad:
        d_z = torch.mm(rows, w_o).view(z.shape)
    if w_grad:
        d_w = torch.mm(rows.t(), z.reshape(batch * num_req, width))
    return d_z, d_w, rows.sum(0, dtype=torch.float32).to(w_o.dtype)


def _per_slot_bwd(grad, z, w_o, z_grad, w_grad):
    batch, num_req, width = z.shape
    num_slots, llm = w_o.shape[:2]
    groups = num_slots // num_req
    d_z, d_w = z.new_empty((0,)), w_o.new_empty((0,))
    # Request r's K/R slots side by side: dz_r = dt_r W_r over (K/R)·D, dW_r = dt_rᵀ z_r.
    rows = grad.reshape(batch, num_req, groups * llm).transpose(0, 1)  # (R, B, (K/R)·D)
    if z_grad:
        d_z = torch.bmm(rows, w_o.reshape(num_req, groups * llm, width)).transpose(0, 1).contiguous()
    if w_grad:
        d_w = torch.bmm(rows.transpose(1, 2), z.transpose(0, 1)).view(w_o.shape)
    return d_z, d_w, grad.sum(0, dtype=torch.float32).to(w_o.dtype)


@op("transmit_bwd_triton", _bwd_fake)
def transmit_bwd(wrap, grad: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor, z_grad: bool = True,
                 w_grad: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """d z, d w_o (each empty without ``z_grad`` / ``w_grad``), d b_o and d slot_embed."""
    if grad.dtype != z.dtype:
        grad = grad.to(z.dtype)
    backward = _per_slot_bwd if _per_slot(w_o) else _shared_bwd
    d_z, d_w, d_b = backward(grad, z, w_o, z_grad, w_grad)
    d_slot = d_b.clone() if _per_slot(w_o) else grad.sum(0, dtype=torch.float32).to(w_o.dtype)
    return d_z, d_w, d_b, d_slot


def _grads(ctx, grad):
    """The four parameter gradients of both autograd functions, None where none is wanted."""
    z, w_o = ctx.saved_tensors[:2]
    z_grad, w_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_z, d_w, d_b, d_slot = transmit_bwd(grad, z, w_o, z_grad, w_grad)
    return ((d_z if z_grad else None), (d_w if w_grad else None), (d_b if ctx.has_bias else None),
            (d_slot if ctx.has_slot else None))


class TransmitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w_o, b_o, slot_embed):
        ctx.save_for_backward(z, w_o)
        ctx.has_bias, ctx.has_slot = b_o is not None, slot_embed is not None
        return transmit_fwd(z, w_o, b_o, slot_embed)

    @staticmethod
    def backward(ctx, grad):
        return _grads(ctx, grad)


class TransmitInterleaveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace, plan):
        ctx.save_for_backward(z, w_o, slot_pos)
        ctx.has_bias, ctx.has_slot = b_o is not None, slot_embed is not None
        if plan is not None:
            out = _launch(plan, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace)
        elif inplace:
            transmit_interleave_inplace(z, w_o, b_o, slot_embed, embeds, slot_pos)
            out = embeds
        else:
            out = transmit_interleave_out(z, w_o, b_o, slot_embed, embeds, slot_pos)
        if inplace:
            ctx.mark_dirty(embeds)
        return out

    @staticmethod
    def backward(ctx, grad):
        slot_pos = ctx.saved_tensors[2]
        return (*_grads(ctx, gather_slots(grad, slot_pos)), grad, None, None, None)


def _check(z, w_o, b_o, slot_embed):
    check_operand("z", z, (None, None, None), z.dtype, z.device, "(B, R, Di)")
    width = z.shape[2]
    if isinstance(w_o, torch.Tensor) and w_o.dim() == 3:
        check_operand("w_o", w_o, (None, None, width), z.dtype, z.device, "(K, D, Di) per slot")
    else:
        check_operand("w_o", w_o, (None, width), z.dtype, z.device, "(D, Di) shared, or (K, D, Di) per slot")
    _, num_slots, llm = _out_shape(z, w_o)
    if _per_slot(w_o):
        slot_groups(z.shape[1], num_slots)
        check_operand("b_o", b_o, (num_slots, llm), z.dtype, z.device, "(K, D)")
        check_operand("slot_embed", slot_embed, (num_slots, llm), z.dtype, z.device, "(K, D)")
    else:
        check_operand("b_o", b_o, (llm,), z.dtype, z.device, "(D,)")
        check_operand("slot_embed", slot_embed, (num_slots, llm), z.dtype, z.device, "(R, D)")


def _check_interleave(z, w_o, b_o, slot_embed, embeds, slot_pos):
    _check(z, w_o, b_o, slot_embed)
    check_slots(embeds, _out_shape(z, w_o), slot_pos, z.device)


_PLANS = PlanCache()


def _plan(key, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace):
    _check_interleave(z, w_o, b_o, slot_embed, embeds, slot_pos)
    # The out-of-place result is a clone of embeds, which keeps its strides when
    # it is dense and is contiguous otherwise, exactly as ``empty_like`` lays out.
    target = embeds if inplace else torch.empty_like(embeds, device="meta")
    p = _projection(z, w_o)
    rows = _target_rows(target, slot_pos, slot_pos.shape[1], _per_slot(w_o))
    launch = gemm_plan(a=p.z, b=p.w_o, c=rows, m=p.m, n=p.n, k=p.k, dtype=z.dtype, device=device_index(z),
                       bias=b_o is not None, rowbias=row_bias(slot_embed, p.batch), accumulate=True,
                       config="transmit_fwd", batch=p.batch, bias_gemm_stride=bias_stride(b_o, p.batch))
    return _PLANS.add(key, launch)


def _launch(plan, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace):
    out = embeds if inplace else embeds.clone()
    launch_gemm(as_is, plan, a=z, b=w_o, c=out, bias=b_o, rowbias=slot_embed, c_index=slot_pos)
    return out


def transmit(z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
             slot_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """The transmitted tokens (B, K, D), shared (``w_o`` (D, Di), K = R) or per slot (``w_o``
    (K, D, Di)); see ``reference.transmit``."""
    b_o = dense_bias(b_o)
    _check(z, w_o, b_o, slot_embed)
    if needs_grad(z, w_o, b_o, slot_embed):
        return TransmitFunction.apply(z, w_o, b_o, slot_embed)
    return transmit_fwd(z, w_o, b_o, slot_embed)


def transmit_interleave(z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                        slot_embed: Optional[torch.Tensor], embeds: torch.Tensor, slot_pos: torch.Tensor,
                        inplace: bool = False) -> torch.Tensor:
    """``E[b, slot_pos[b, j]] += t[b, j]`` with ``t = transmit(z, w_o, b_o, slot_embed)``, the add in fp32
    rounded once to E's dtype.

    ``inplace=True`` writes into ``embeds`` and returns it; otherwise a new
    tensor is returned and ``embeds`` is left untouched.
    """
    b_o = dense_bias(b_o)
    if compiling():
        _check_interleave(z, w_o, b_o, slot_embed, embeds, slot_pos)
        return TransmitInterleaveFunction.apply(z, w_o, b_o, slot_embed, embeds, slot_pos, bool(inplace), None)
    inplace = bool(inplace)
    key = metadata_key(z, w_o, b_o, slot_embed, embeds, slot_pos, inplace)
    plan = _PLANS.get(key) or _plan(key, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace)
    if inplace:
        check_writable(embeds, "transmit_interleave", z=z, w_o=w_o, b_o=b_o, slot_embed=slot_embed)
    if needs_grad(z, w_o, b_o, slot_embed, embeds):
        return TransmitInterleaveFunction.apply(z, w_o, b_o, slot_embed, embeds, slot_pos, inplace, plan)
    out = _launch(plan, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace)
    if inplace:
        bump_version(embeds)
    return out
