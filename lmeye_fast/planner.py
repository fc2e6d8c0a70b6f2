"""Slot planning: where the request token and the R slot tokens sit in each row of ``input_ids``.

``plan_slots`` returns ``request_pos`` (B,) and ``slot_pos`` (B, R), the
indices the interactive layer reads and writes, plus ``status`` (B,) saying
whether each row was well formed. It never synchronises with the host unless
``validate=True``: on a CUDA tensor it runs one kernel (``lmeye_fast::plan_slots``),
elsewhere a vectorised PyTorch twin with the same results.

A row is well formed when it holds exactly one request token and exactly
``num_slots`` slot tokens, none of them before the request token. Otherwise
its status is one ``PlanStatus`` code (the smallest that applies), and its
positions stay inside the row so that nothing downstream indexes out of
bounds:

- ``request_pos`` is the first request token, or 0 if there is none;
- ``slot_pos`` is -1 throughout: a position outside every row, which every
  interleave backend skips, so a malformed row is left as it is (never
  written twice at a repeated position, as a row with too few slots would
  otherwise be). ``validate=True`` refuses such input instead.

A well-formed row's ``slot_pos`` holds its R slot tokens in order.
"""

from __future__ import annotations

import enum
import importlib
import sys
from typing import Optional, Tuple

import torch

from . import backends
from .checks import INDEX_DTYPES, check_tensor, validating

__all__ = ["PlanStatus", "plan_slots", "plan_slots_torch", "check_plan"]

# Loads lmeye_fast._C together with the fake implementations of its operators.
_CUDA_OPS = "lmeye_fast.ops.cuda"


class PlanStatus(enum.IntEnum):
    """Per-row outcome of ``plan_slots`` (values shared with kernels/lmeye_kernels.h)."""

    OK = 0
    MISSING_REQUEST = 1
    MULTIPLE_REQUESTS = 2
    TOO_FEW_SLOTS = 3
    TOO_MANY_SLOTS = 4
    SLOT_BEFORE_REQUEST = 5


_PROBLEMS = {
    PlanStatus.MISSING_REQUEST: "has no request token (id {request})",
    PlanStatus.MULTIPLE_REQUESTS: "has {requests} request tokens (id {request}); exactly one is expected",
    PlanStatus.TOO_FEW_SLOTS: "has {slots} slot tokens (id {slot}), fewer than num_slots={num_slots}",
    PlanStatus.TOO_MANY_SLOTS: "has {slots} slot tokens (id {slot}), more than num_slots={num_slots}",
    PlanStatus.SLOT_BEFORE_REQUEST: "has a slot token (id {slot}) before its request token (id {request}); "
                                    "slots must follow the request",
}


def _check_args(input_ids, request_token_id, slot_token_id, num_slots):
    check_tensor("input_ids", input_ids, (None, None), INDEX_DTYPES, dims="(B, T)")
    for name, value in (("request_token_id", request_token_id), ("slot_token_id", slot_token_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int token id, got {value!r}")
    if request_token_id == slot_token_id:
        raise ValueError(f"slot_token_id: must differ from request_token_id, both are {slot_token_id}")
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots: expected a positive int, got {num_slots!r}")


def plan_slots_torch(
    input_ids: torch.Tensor, request_token_id: int, slot_token_id: int, num_slots: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The planner in plain PyTorch: same outputs as the CUDA kernel, any device, no host sync."""
    _check_args(input_ids, request_token_id, slot_token_id, num_slots)
    batch, length = input_ids.shape
    device = input_ids.device
    is_request = input_ids == request_token_id
    is_slot = input_ids == slot_token_id
    requests = is_request.sum(1)
    slots = is_slot.sum(1)
    if length == 0:
        first_request = first_slot = torch.zeros(batch, dtype=torch.int64, device=device)
    else:
        # argmax returns the first maximal index: the first token of each kind.
        first_request = torch.where(requests > 0, is_request.to(torch.uint8).argmax(1), 0)
        first_slot = is_slot.to(torch.uint8).argmax(1)

    # Slot k of a row is the slot token with k slot tokens before it; tokens
    # past the first num_slots (and non-slot tokens) land in a spare column.
    rank = is_slot.cumsum(1) - 1
    column = torch.where(is_slot & (rank < num_slots), rank, num_slots)
    positions = torch.arange(length, device=device).expand(batch, length)
    slot_pos = torch.zeros(batch, num_slots + 1, dtype=torch.int64, device=device)
    slot_pos.scatter_reduce_(1, column, positions, "amax")
    slot_pos = slot_pos[:, :num_slots].contiguous()

    # Assigned from the last code to the first, so the smallest that applies wins.
    status = torch.zeros(batch, dtype=torch.int32, device=device)
    status.masked_fill_((slots > 0) & (first_slot < first_request), int(PlanStatus.SLOT_BEFORE_REQUEST))
    status.masked_fill_(slots > num_slots, int(PlanStatus.TOO_MANY_SLOTS))
    status.masked_fill_(slots < num_slots, int(PlanStatus.TOO_FEW_SLOTS))
    status.masked_fill_(requests > 1, int(PlanStatus.MULTIPLE_REQUESTS))
    status.masked_fill_(requests == 0, int(PlanStatus.MISSING_REQUEST))
    slot_pos.masked_fill_((status != PlanStatus.OK)[:, None], -1)
    return first_request, slot_pos, status


def check_plan(
    status: torch.Tensor,
    input_ids: Optional[torch.Tensor] = None,
    request_token_id: Optional[int] = None,
    slot_token_id: Optional[int] = None,
    num_slots: Optional[int] = None,
) -> None:
    """Raise a ValueError naming the first malformed row and its problem (a host sync).

    ``input_ids`` and the token ids, when given, only make the message more precise.
    """
    check_tensor("status", status, (None,), (torch.int32, torch.int64), dims="(B,)")
    bad = status != PlanStatus.OK
    if not bool(bad.any()):
        return
    row = int(bad.to(torch.uint8).argmax())
    code = PlanStatus(int(status[row]))
    details = {"request": request_token_id, "slot": slot_token_id, "num_slots": num_slots,
               "requests": "several", "slots": "the wrong number of"}
    if input_ids is not None:
        ids = input_ids[row]
        if request_token_id is not None:
            details["requests"] = int((ids == request_token_id).sum())
        if slot_token_id is not None:
            details["slots"] = int((ids == slot_token_id).sum())
    others = int(bad.sum()) - 1
    more = f" ({others} more malformed row{'s' if others != 1 else ''})" if others else ""
    raise ValueError(f"input_ids: row {row} {_PROBLEMS[code].format(**details)} [{code.name}]{more}")


def plan_slots(
    input_ids: torch.Tensor,
    request_token_id: int,
    slot_token_id: int,
    num_slots: int,
    validate: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Request positions (B,), slot positions (B, R) and status (B,) for ``input_ids`` (B, T).

    Args:
        input_ids: token ids, int32 or int64.
        request_token_id: id of the request token (``<img-q>``).
        slot_token_id: id of the slot token (``<img-d>``).
        num_slots: R, slot tokens expected per row.
        validate: raise a ValueError naming the first malformed row (a host sync).
        backend: ``"auto"`` (the CUDA kernel for CUDA tensors when the extension
            is built, the PyTorch twin otherwise), ``"cuda"``, or ``"reference"``
            / ``"triton"`` (both the twin: the planner has no Triton kernel).
            ``LMEYE_FAST_BACKEND`` overrides it.
    Returns:
        ``(request_pos int64 (B,), slot_pos int64 (B, R), status int32 (B,))``,
        status values from ``PlanStatus``.
    """
    _check_args(input_ids, request_token_id, slot_token_id, num_slots)
    choice = backends.requested(backend)
    use_cuda = choice == "cuda" or (choice == "auto" and input_ids.is_cuda and backends.status("cuda")[0])
    if use_cuda:
        ok, reason = backends.status("cuda")
        if not ok:
            raise RuntimeError(f"backend 'cuda' is not available here: {reason} (see `python -m lmeye_fast.info`)")
        if not input_ids.is_cuda:
            raise ValueError(f"input_ids: backend 'cuda' needs a CUDA tensor, got one on {input_ids.device}")
        if _CUDA_OPS not in sys.modules:  # an import inside torch.compile would break the graph
            importlib.import_module(_CUDA_OPS)
        plan = torch.ops.lmeye_fast.plan_slots(input_ids, request_token_id, slot_token_id, num_slots)
    else:
        plan = plan_slots_torch(input_ids, request_token_id, slot_token_id, num_slots)
    if validating(validate):
        check_plan(plan[2], input_ids, request_token_id, slot_token_id, num_slots)
    return plan
