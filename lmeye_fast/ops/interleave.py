"""The interleave (docs/design.md §2 step 5) in Triton: ``E[b, slot_pos[b, j]] += rows[b, j]``.

One program per (slot, column block). Each slot row of E belongs to exactly
one (b, j) (slots of a row are distinct), so the add needs no atomics. The sum
is formed in fp32 and rounded once to E's dtype. A slot position outside
``[0, T')`` is skipped, never written. The same kernel, run as a gather, gives
the backward ``d rows = dE[b, slot_pos[b, j]]``; ``dE`` passes through.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..checks import INDEX_DTYPES, KERNEL_DTYPES, check_tensor, check_writable
from .triton_launch import bump_version, cdiv, interpret, needs_grad, on_device, op, pow2


@triton.jit
def _slots_kernel(
    e_ptr, rows_ptr, pos_ptr, R, T, D,
    e_sb, e_st, e_sd, w_sb, w_sr, w_sd, p_sb, p_sr,
    GATHER: tl.constexpr, BD: tl.constexpr,
):
    slot = tl.program_id(0)
    b = (slot // R).to(tl.int64)
    j = (slot % R).to(tl.int64)
    pos = tl.load(pos_ptr + b * p_sb + j * p_sr).to(tl.int64)
    inside = (pos >= 0) & (pos < T)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    d_ok = rd < D
    # Offsets in int64 throughout: a view of E with a large stride along D (a (D, B, T) buffer
    # permuted to (B, T, D)) passes 2^31 elements within one row.
    rd64 = rd.to(tl.int64)
    e_ptrs = e_ptr + b * e_sb + pos * e_st + rd64 * e_sd
    w_ptrs = rows_ptr + b * w_sb + j * w_sr + rd64 * w_sd
    if GATHER:
        v = tl.load(e_ptrs, mask=d_ok & inside, other=0.0)
        tl.store(w_ptrs, v.to(rows_ptr.dtype.element_ty), mask=d_ok)
    else:
        v = tl.load(e_ptrs, mask=d_ok & inside, other=0.0).to(tl.float32)
        v += tl.load(w_ptrs, mask=d_ok, other=0.0).to(tl.float32)
        tl.store(e_ptrs, v.to(e_ptr.dtype.element_ty), mask=d_ok & inside)


def _launch(wrap, embeds: torch.Tensor, rows: torch.Tensor, slot_pos: torch.Tensor, gather: bool) -> None:
    batch, num_slots = slot_pos.shape
    width = embeds.shape[2]
    if batch * num_slots == 0 or width == 0:
        return
    block = pow2(width, 16, 256 if interpret() else 1024)
    with on_device(embeds):
        wrap(_slots_kernel)[(batch * num_slots, cdiv(width, block))](
            embeds, rows, slot_pos, num_slots, embeds.shape[1], width,
            embeds.stride(0), embeds.stride(1), embeds.stride(2), rows.stride(0), rows.stride(1), rows.stride(2),
            slot_pos.stride(0), slot_pos.stride(1),
            GATHER=gather, BD=block, num_warps=4,
        )


def _out_fake(embeds, rows, slot_pos):
    return torch.empty_like(embeds)


def _inplace_fake(embeds, rows, slot_pos):
    return None


def _gather_fake(source, slot_pos):
    return source.new_empty((slot_pos.shape[0], slot_pos.shape[1], source.shape[2]))


@op("interleave_triton", _out_fake)
def interleave_out(wrap, embeds: torch.Tensor, rows: torch.Tensor, slot_pos: torch.Tensor) -> torch.Tensor:
    out = embeds.clone()
    _launch(wrap, out, rows, slot_pos, gather=False)
    return out


@op("interleave_triton_", _inplace_fake, mutates_args=("embeds",))
def interleave_inplace(wrap, embeds: torch.Tensor, rows: torch.Tensor, slot_pos: torch.Tensor) -> None:
    _launch(wrap, embeds, rows, slot_pos, gather=False)


@op("gather_slots_triton", _gather_fake)
def gather_slots(wrap, source: torch.Tensor, slot_pos: torch.Tensor) -> torch.Tensor:
    """``source[b, slot_pos[b, j]]`` -> (B, R, D); rows at out-of-range positions read as zero."""
    out = torch.empty((slot_pos.shape[0], slot_pos.shape[1], source.shape[2]), device=source.device,
                      dtype=source.dtype)
    _launch(wrap, source, out, slot_pos, gather=True)
    return out


class InterleaveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeds, rows, slot_pos, inplace):
        ctx.save_for_backward(slot_pos)
        ctx.rows_dtype = rows.dtype
        if inplace:
            interleave_inplace(embeds, rows, slot_pos)
            ctx.mark_dirty(embeds)
            return embeds
        return interleave_out(embeds, rows, slot_pos)

    @staticmethod
    def backward(ctx, grad):
        (slot_pos,) = ctx.saved_tensors
        return grad, gather_slots(grad, slot_pos).to(ctx.rows_dtype), None, None


def check_slots(embeds: torch.Tensor, rows_shape, slot_pos: torch.Tensor,
                device: Optional[torch.device] = None) -> None:
    """Metadata checks shared with ``transmit_interleave``: (B, T', D) embeds (on ``device`` where given)
    for (B, R, D) rows, (B, R) int positions on the embeds' device."""
    batch, num_slots, width = rows_shape
    check_tensor("embeds", embeds, (batch, None, width), KERNEL_DTYPES, device, "(B, T', D)")
    check_tensor("slot_pos", slot_pos, (batch, num_slots), INDEX_DTYPES, embeds.device, "(B, R)")


def interleave(embeds: torch.Tensor, rows: torch.Tensor, slot_pos: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``E[b, slot_pos[b, j]] += rows[b, j]`` (see ``reference.interleave``); ``inplace`` writes into ``embeds``."""
    # The rows may be in another kernel dtype than embeds: the kernel converts them as it adds.
    check_tensor("rows", rows, (None, None, None), dims="(B, R, D)")
    check_slots(embeds, rows.shape, slot_pos)
    check_tensor("rows", rows, tuple(rows.shape), KERNEL_DTYPES, embeds.device)
    if inplace:
        check_writable(embeds, "interleave", rows=rows)
    if needs_grad(embeds, rows):
        return InterleaveFunction.apply(embeds, rows, slot_pos, bool(inplace))
    if inplace:
        interleave_inplace(embeds, rows, slot_pos)
        bump_version(embeds)
        return embeds
    return interleave_out(embeds, rows, slot_pos)
