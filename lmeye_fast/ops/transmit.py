"""Transmission (docs/design.md §2 step 4) with the interleave (step 5) as its epilogue.

``t = z W_oᵀ + b_o + e_slot`` is one GEMM over the B·R rows of z (any
strides); bias and slot embedding (``e_slot[row % R]``) are added in the
epilogue. ``transmit_interleave`` stores nothing else: the epilogue loads the
slot rows ``E[b, slot_pos[b, j]]``, adds in fp32, rounds once to E's dtype and
stores them back, so the sequence is never copied in place mode (out of place,
one copy of E is the result). Slot positions outside ``[0, T')`` are skipped.

Backward: ``dE`` passes through; ``dt`` is gathered from the slot rows; then
``dz = dt W_o`` and ``dW_o = dtᵀ z`` with ``db_o`` as its fp32 column sums, and
``d e_slot = Σ_b dt``. On a GPU the two dense GEMMs are ``torch.mm`` (cuBLAS,
fp32 accumulation; fp32 inputs stay exact IEEE fp32 unless the caller enabled
TF32); under the interpreter they run through the Triton GEMM.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..checks import check_writable, metadata_key
from .interleave import check_slots, gather_slots
from .triton_launch import (PlanCache, Rows, as_is, bump_version, check_device, check_dtype, check_like,
                            compiling, dense_bias, device_index, gemm, gemm_plan, interpret,
                            launch_gemm, needs_grad, op, rows2d, rows3d)


def _slot_rows(embeds: torch.Tensor, slot_pos: torch.Tensor) -> Rows:
    return Rows(embeds, slot_pos.shape[1], embeds.stride(0), 0, embeds.stride(2), slot_pos,
                slot_pos.stride(0), slot_pos.stride(1), embeds.stride(1), embeds.shape[1])


def _project(wrap, z, w_o, b_o, slot_embed, target: Rows, accumulate: bool) -> None:
    batch, num_req, width = z.shape
    gemm(wrap, rows3d(z), rows2d(w_o, transpose=True), target, batch * num_req, w_o.shape[0], width,
         bias=b_o, rowbias=slot_embed, accumulate=accumulate, config="transmit_fwd")


def _fwd_fake(z, w_o, b_o, slot_embed):
    return z.new_empty((z.shape[0], z.shape[1], w_o.shape[0]))


def _out_fake(z, w_o, b_o, slot_embed, embeds, slot_pos):
    return torch.empty_like(embeds)


def _inplace_fake(z, w_o, b_o, slot_embed, embeds, slot_pos):
    return None


def _bwd_fake(grad, z, w_o):
    return (z.new_empty(z.shape), w_o.new_empty(w_o.shape), w_o.new_empty((w_o.shape[0],)),
            w_o.new_empty((z.shape[1], w_o.shape[0])))


@op("transmit_fwd_triton", _fwd_fake)
def transmit_fwd(wrap, z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                 slot_embed: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty((z.shape[0], z.shape[1], w_o.shape[0]), device=z.device, dtype=z.dtype)
    _project(wrap, z, w_o, b_o, slot_embed, rows3d(out), accumulate=False)
    return out


@op("transmit_interleave_triton", _out_fake)
def transmit_interleave_out(wrap, z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                            slot_embed: Optional[torch.Tensor], embeds: torch.Tensor,
                            slot_pos: torch.Tensor) -> torch.Tensor:
    out = embeds.clone()
    _project(wrap, z, w_o, b_o, slot_embed, _slot_rows(out, slot_pos), accumulate=True)
    return out


@op("transmit_interleave_triton_", _inplace_fake, mutates_args=("embeds",))
def transmit_interleave_inplace(wrap, z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                                slot_embed: Optional[torch.Tensor], embeds: torch.Tensor,
                                slot_pos: torch.Tensor) -> None:
    _project(wrap, z, w_o, b_o, slot_embed, _slot_rows(embeds, slot_pos), accumulate=True)


@op("transmit_bwd_triton", _bwd_fake)
def transmit_bwd(wrap, grad: torch.Tensor, z: torch.Tensor,
                 w_o: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_req, width = z.shape
    llm = w_o.shape[0]
    if grad.dtype != z.dtype:
        grad = grad.to(z.dtype)
    if not interpret():
        rows = grad.reshape(batch * num_req, llm)
        d_z = torch.mm(rows, w_o).view(z.shape)
        d_w = torch.mm(rows.t(), z.reshape(batch * num_req, width))
        d_b = rows.sum(0, dtype=torch.float32).to(w_o.dtype)
        d_slot = grad.sum(0, dtype=torch.float32).to(w_o.dtype)
        return d_z, d_w, d_b, d_slot
    d_z = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    gemm(wrap, rows3d(grad), rows2d(w_o), rows3d(d_z), batch * num_req, width, llm)
    # dW_o = dtᵀ z needs the B·R rows of dt as one stride.
    if grad.stride(0) != num_req * grad.stride(1):
        grad = grad.contiguous()
    d_w = torch.empty(w_o.shape, device=w_o.device, dtype=w_o.dtype)
    d_b = torch.empty((llm,), device=w_o.device, dtype=w_o.dtype)
    gemm(wrap, Rows(grad, 1, grad.stride(2), 0, grad.stride(1)), rows3d(z), rows2d(d_w), llm, width, batch * num_req,
         colsum=d_b)
    d_slot = grad.sum(0, dtype=torch.float32).to(w_o.dtype)
    return d_z, d_w, d_b, d_slot


class TransmitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w_o, b_o, slot_embed):
        ctx.save_for_backward(z, w_o)
        ctx.has_bias, ctx.has_slot = b_o is not None, slot_embed is not None
        return transmit_fwd(z, w_o, b_o, slot_embed)

    @staticmethod
    def backward(ctx, grad):
        z, w_o = ctx.saved_tensors
        d_z, d_w, d_b, d_slot = transmit_bwd(grad, z, w_o)
        return d_z, d_w, (d_b if ctx.has_bias else None), (d_slot if ctx.has_slot else None)


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
        z, w_o, slot_pos = ctx.saved_tensors
        d_z, d_w, d_b, d_slot = transmit_bwd(gather_slots(grad, slot_pos), z, w_o)
        return (d_z, d_w, (d_b if ctx.has_bias else None), (d_slot if ctx.has_slot else None), grad, None, None,
                None)


def _check(z, w_o, b_o, slot_embed):
    if z.dim() != 3:
        raise ValueError(f"z: expected shape (B, R, Di), got {tuple(z.shape)}")
    device, dtype = z.device, z.dtype
    check_dtype("z", z, dtype)
    if w_o.dim() == 3:
        raise NotImplementedError("w_o (K, D, Di): the per-slot transmission has no Triton kernel yet "
                                  "(use backend='reference')")
    if w_o.dim() != 2 or w_o.shape[1] != z.shape[2]:
        raise ValueError(f"w_o: expected shape (D, Di) with Di={z.shape[2]}, got {tuple(w_o.shape)}")
    check_dtype("w_o", w_o, dtype)
    check_device("w_o", w_o, device)
    check_like("b_o", b_o, (w_o.shape[0],), dtype, device)
    check_like("slot_embed", slot_embed, (z.shape[1], w_o.shape[0]), dtype, device, "(R, D) = ")


_PLANS = PlanCache()


def _plan(key, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace):
    _check(z, w_o, b_o, slot_embed)
    check_slots(embeds, (z.shape[0], z.shape[1], w_o.shape[0]), slot_pos)
    check_device("embeds", embeds, z.device)
    batch, num_req, width = z.shape
    # The out-of-place result is a clone of embeds, which keeps its strides when
    # it is dense and is contiguous otherwise, exactly as ``empty_like`` lays out.
    target = embeds if inplace else torch.empty_like(embeds, device="meta")
    rows = Rows(None, num_req, target.stride(0), 0, target.stride(2), slot_pos, slot_pos.stride(0),
                slot_pos.stride(1), target.stride(1), target.shape[1])
    rb = None if slot_embed is None else (slot_embed.shape[0], slot_embed.stride(0), slot_embed.stride(1))
    launch = gemm_plan(rows3d(z), rows2d(w_o, transpose=True), rows, batch * num_req, w_o.shape[0], width, z.dtype,
                       device_index(z), bias=b_o is not None, rowbias=rb, accumulate=True, config="transmit_fwd")
    return _PLANS.add(key, launch)


def _launch(plan, z, w_o, b_o, slot_embed, embeds, slot_pos, inplace):
    out = embeds if inplace else embeds.clone()
    launch_gemm(as_is, plan, z, w_o, out, out if b_o is None else b_o,
                out if slot_embed is None else slot_embed, out, out, out, slot_pos)
    return out


def transmit(z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
             slot_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """``t = z W_oᵀ + b_o + e_slot`` -> (B, R, D); see ``reference.transmit``."""
    b_o = dense_bias(b_o)
    _check(z, w_o, b_o, slot_embed)
    if needs_grad(z, w_o, b_o, slot_embed):
        return TransmitFunction.apply(z, w_o, b_o, slot_embed)
    return transmit_fwd(z, w_o, b_o, slot_embed)


def transmit_interleave(z: torch.Tensor, w_o: torch.Tensor, b_o: Optional[torch.Tensor],
                        slot_embed: Optional[torch.Tensor], embeds: torch.Tensor, slot_pos: torch.Tensor,
                        inplace: bool = False) -> torch.Tensor:
    """``E[b, slot_pos[b, j]] += z[b, j] W_oᵀ + b_o + e_slot[j]``, the add in fp32 rounded once to E's dtype.

    ``inplace=True`` writes into ``embeds`` and returns it; otherwise a new
    tensor is returned and ``embeds`` is left untouched.
    """
    b_o = dense_bias(b_o)
    if compiling():
        _check(z, w_o, b_o, slot_embed)
        check_slots(embeds, (z.shape[0], z.shape[1], w_o.shape[0]), slot_pos)
        check_device("embeds", embeds, z.device)
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
