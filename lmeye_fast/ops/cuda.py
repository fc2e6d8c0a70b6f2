"""The ``cuda`` backend: the compiled kernels of ``lmeye_fast._C`` behind the reference signatures.

Importing this module loads ``lmeye_fast._C``, which registers the operators
``torch.ops.lmeye_fast.*`` (schemas and CUDA kernels in csrc/ and kernels/),
and attaches what the C++ side leaves to Python: fake implementations (shape
propagation for FakeTensor, meta tensors and torch.compile) and autograd.

=============================================  ============================================
operator                                       computes
=============================================  ============================================
``interleave(embeds, rows, slot_pos, e)``      copy of embeds with ``E[b, s[b,j]] += rows[b,j] + e[j]``
``interleave_(embeds, rows, slot_pos, e)``     the same, in place
``gather_rows(seq, index)``                    ``seq[b, index[b, j]]`` -> (B, R, D)
``scatter_rows(rows, index, length)``          zeros (B, length, D) with ``rows[b, j]`` added at ``index[b, j]``
``plan_slots(input_ids, req, slot, R)``        request / slot positions and a status per row
=============================================  ============================================

Positions of one row must be distinct for the interleave (no atomics); ``scatter_rows``,
the gather's backward, sums rows that share a position (in order, deterministic).
A position outside the sequence is never written: its row is skipped by the
interleave and gathered as zeros. ``e`` (the slot embedding, (R, D)) is optional.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends
from ..checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

# Loads lmeye_fast._C, which registers torch.ops.lmeye_fast, unless its build record says it is
# missing or was built against another torch: then this import fails with that reason and its fix
# instead of an undefined-symbol error from the loader.
_loaded, _why_not = backends.extension_status()
if not _loaded:
    raise ImportError(f"the cuda backend needs lmeye_fast._C: {_why_not}")

__all__ = ["request", "interleave", "gather_rows", "scatter_rows"]

_ops = torch.ops.lmeye_fast


def _check_rows(embeds, rows, slot_pos, slot_embed):
    check_tensor("embeds", embeds, (None, None, None), dims="(B, T', D)")
    batch, width = embeds.shape[0], embeds.shape[2]
    check_tensor("rows", rows, (batch, None, width), (embeds.dtype,), embeds.device, dims="(B, R, D)")
    check_tensor("slot_pos", slot_pos, (batch, rows.shape[1]), INDEX_DTYPES, embeds.device, dims="(B, R)")
    if slot_embed is not None:
        check_tensor("slot_embed", slot_embed, (rows.shape[1], width), (embeds.dtype,), embeds.device, dims="(R, D)")


# Fake implementations: output metadata only, with the checks of the CUDA side.

@torch.library.register_fake("lmeye_fast::interleave")
def _interleave_fake(embeds, rows, slot_pos, slot_embed=None):
    _check_rows(embeds, rows, slot_pos, slot_embed)
    return torch.empty_like(embeds)


@torch.library.register_fake("lmeye_fast::interleave_")
def _interleave_inplace_fake(embeds, rows, slot_pos, slot_embed=None):
    _check_rows(embeds, rows, slot_pos, slot_embed)


@torch.library.register_fake("lmeye_fast::gather_rows")
def _gather_rows_fake(seq, index):
    check_tensor("seq", seq, (None, None, None), dims="(B, T, D)")
    check_tensor("index", index, (seq.shape[0], None), INDEX_DTYPES, seq.device, dims="(B, R)")
    return seq.new_empty((seq.shape[0], index.shape[1], seq.shape[2]))


@torch.library.register_fake("lmeye_fast::scatter_rows")
def _scatter_rows_fake(rows, index, length):
    check_tensor("rows", rows, (None, None, None), dims="(B, R, D)")
    check_tensor("index", index, (rows.shape[0], rows.shape[1]), INDEX_DTYPES, rows.device, dims="(B, R)")
    return rows.new_empty((rows.shape[0], length, rows.shape[2]))


@torch.library.register_fake("lmeye_fast::plan_slots")
def _plan_slots_fake(input_ids, request_token_id, slot_token_id, num_slots):
    check_tensor("input_ids", input_ids, (None, None), INDEX_DTYPES, dims="(B, T)")
    batch = input_ids.shape[0]
    return (input_ids.new_empty((batch,), dtype=torch.int64),
            input_ids.new_empty((batch, num_slots), dtype=torch.int64),
            input_ids.new_empty((batch,), dtype=torch.int32))


# Autograd. The interleave passes dE through and gathers d_rows at the slots;
# gather and scatter are each other's backward, so every gradient is itself
# differentiable.

def _rows_grads(ctx, grad, slot_pos):
    # Older torch releases size needs_input_grad by the arguments actually
    # passed, so an omitted slot_embed leaves it one entry short.
    needs = tuple(ctx.needs_input_grad) + (False,) * (4 - len(ctx.needs_input_grad))
    grad_rows = grad_slot = None
    if needs[1] or needs[3]:
        grad_rows = _ops.gather_rows(grad, slot_pos)
        if needs[3]:
            grad_slot = grad_rows.sum(0)
    grads = ((grad if needs[0] else None), grad_rows, None, grad_slot)
    return grads[:len(ctx.needs_input_grad)]


def _interleave_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _interleave_backward(ctx, grad):
    (slot_pos,) = ctx.saved_tensors
    return _rows_grads(ctx, grad, slot_pos)


torch.library.register_autograd("lmeye_fast::interleave", _interleave_backward, setup_context=_interleave_setup)


def _gather_setup(ctx, inputs, output):
    seq, index = inputs
    ctx.length = seq.shape[1]
    ctx.save_for_backward(index)


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _ops.scatter_rows(grad, index, ctx.length), None


torch.library.register_autograd("lmeye_fast::gather_rows", _gather_backward, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _ops.gather_rows(grad, index), None, None


torch.library.register_autograd("lmeye_fast::scatter_rows", _scatter_backward, setup_context=_scatter_setup)


class _InterleaveInplace(torch.autograd.Function):
    # register_autograd takes functional operators only; the in-place one
    # marks embeds dirty so that autograd rebases its history on this node.
    @staticmethod
    def forward(ctx, embeds, rows, slot_pos, slot_embed):
        _ops.interleave_(embeds, rows, slot_pos, slot_embed)
        ctx.mark_dirty(embeds)
        ctx.save_for_backward(slot_pos)
        return embeds

    @staticmethod
    def backward(ctx, grad):
        (slot_pos,) = ctx.saved_tensors
        return _rows_grads(ctx, grad, slot_pos)


def gather_rows(seq: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``seq[b, index[b, j]]`` -> (B, R, D); rows whose index lies outside [0, T) are zeros."""
    return _ops.gather_rows(seq, index)


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros (B, length, D) with ``rows[b, j]`` added at ``index[b, j]``; rows that share a position are
    summed (so it is ``gather_rows``' exact backward), rows outside [0, length) dropped."""
    return _ops.scatter_rows(rows, index, length)


def interleave(
    embeds: torch.Tensor,
    rows: torch.Tensor,
    slot_pos: torch.Tensor,
    inplace: bool = False,
    *,
    slot_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``reference.interleave`` on the CUDA kernel: ``E[b, s[b, j]] += rows[b, j]`` (+ ``slot_embed[j]``).

    The sum is formed in float32 (float64 for float64) and rounded once to E's
    dtype. ``rows`` of another dtype are first cast to E's dtype.
    """
    check_tensor("embeds", embeds, (None, None, None), FLOAT_DTYPES, dims="(B, T', D)")
    if rows.dtype != embeds.dtype:
        rows = rows.to(embeds.dtype)
    if slot_embed is not None and slot_embed.dtype != embeds.dtype:
        slot_embed = slot_embed.to(embeds.dtype)
    _check_rows(embeds, rows, slot_pos, slot_embed)
    if not inplace:
        return _ops.interleave(embeds, rows, slot_pos, slot_embed)
    tracked = (embeds, rows) if slot_embed is None else (embeds, rows, slot_embed)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _InterleaveInplace.apply(embeds, rows, slot_pos, slot_embed)
    _ops.interleave_(embeds, rows, slot_pos, slot_embed)
    return embeds


def request(
    hidden: torch.Tensor,
    request_pos: Optional[torch.Tensor],
    w_q: torch.Tensor,
    b_q: Optional[torch.Tensor],
    num_requests: int,
) -> torch.Tensor:
    """``reference.request`` with the row gather on the CUDA kernel -> (B, R, Di).

    ``hidden`` is (B, T, D) with ``request_pos`` (B,), or the request vectors
    (B, D) with ``request_pos=None``. The projection runs in the storage dtype
    through cuBLAS, which accumulates in float32.
    """
    if request_pos is None:
        h = check_tensor("hidden", hidden, (None, None), FLOAT_DTYPES, dims="(B, D) request vectors")
    else:
        check_tensor("hidden", hidden, (None, None, None), FLOAT_DTYPES, dims="(B, T, D)")
        check_tensor("request_pos", request_pos, (hidden.shape[0],), INDEX_DTYPES, hidden.device, dims="(B,)")
        h = _ops.gather_rows(hidden, request_pos.unsqueeze(1)).squeeze(1)
    check_tensor("w_q", w_q, (None, h.shape[1]), FLOAT_DTYPES, h.device, dims="(R*Di, D)")
    if w_q.shape[0] % num_requests:
        raise ValueError(f"w_q (R*Di, D): rows must be a multiple of num_requests={num_requests}, got {w_q.shape[0]}")
    weight = w_q.to(h.dtype)
    bias = None if b_q is None else b_q.to(h.dtype)
    return F.linear(h, weight, bias).reshape(h.shape[0], num_requests, -1)
