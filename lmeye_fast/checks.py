"""Argument checks with messages that name the argument and what was expected: the one module of
them, used by the layers, the reference and every backend's op (the Triton ops' dtype, device and
optional-operand rules included), so that each rule has one wording.

Shape, dtype and device checks read metadata only, so they cost no device
work and run on every call. Value checks (positions inside the sequence,
distinct slots) need a host sync, so they run only where indices are built
(the processor, the slot planner) or when a caller passes ``validate=True``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# The storage dtypes the Triton kernels take (they accumulate in float32).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape(dims: Sequence[Optional[int]]) -> str:
    inner = ", ".join("?" if d is None else str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def check_tensor(
    name: str,
    value,
    shape: Sequence[Optional[int]],
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
    dims: str = "",
    like: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Raise a clear error unless ``value`` is a tensor of ``shape`` (None = any size), one of ``dtypes``, on
    ``device``, and of dtype ``like`` where given (the other operands' dtype: the kernels' rule)."""
    label = f"{name} {dims}".rstrip()
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{label}: expected a torch.Tensor of shape {_shape(shape)}, got {type(value).__name__}")
    if value.dim() != len(shape) or any(e is not None and e != a for e, a in zip(shape, value.shape)):
        raise ValueError(f"{label}: expected shape {_shape(shape)}, got {tuple(value.shape)}")
    if value.dtype not in dtypes:
        if dtypes == KERNEL_DTYPES:
            # The kernels accumulate in float32: a float64 input would lose precision silently.
            raise TypeError(f"{label}: the Triton backend supports float16, bfloat16 and float32, got "
                            f"{_dtype_name(value.dtype)} (use backend='reference' or 'cuda')")
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{label}: expected dtype in ({names}), got {_dtype_name(value.dtype)}")
    if like is not None and value.dtype != like:
        raise TypeError(f"{label}: expected dtype {_dtype_name(like)} (the dtype of the other inputs), "
                        f"got {_dtype_name(value.dtype)}")
    if device is not None and value.device != device:
        raise ValueError(f"{label}: expected a tensor on {device} (like the other inputs), got {value.device}")
    return value


def check_operand(name: str, value, shape: Sequence[Optional[int]], dtype: torch.dtype, device: torch.device,
                  dims: str = "") -> torch.Tensor:
    """A Triton op's operand: ``check_tensor`` with the kernels' rule, one of ``KERNEL_DTYPES`` and the
    other operands' ``dtype``. None passes (an absent bias or slot embedding)."""
    if value is None:
        return value
    return check_tensor(name, value, shape, KERNEL_DTYPES, device, dims, like=dtype)


# The Triton backend's attention schedules (docs/design.md §5): "split" attends over F = X W_fᵀ + b_f tile
# by tile in the flash-style kernels of ops/attend.py; "folded" never forms F (ops/attend_folded.py);
# "auto" is split, except that heads too wide for the split kernels fold. Auto stays split until both are
# measured on a GPU.
ATTENTION_SCHEDULES = ("auto", "split", "folded")

# Where the split schedule's kernels get F's tiles: "materialized", F written whole by one dense product
# first and its tiles loaded (the forward then keeps F for the backward); "on_chip", each tile formed
# inside the kernel, F never written.
FEATURE_TILES = ("materialized", "on_chip")


class AttentionSchedule(NamedTuple):
    """An attention schedule with the split schedule's tile options, set per layer
    (``InteractiveLayer(attention=AttentionSchedule(...))``; a bare name is this record with its defaults).

    ``forward_features`` / ``backward_features`` (one of ``FEATURE_TILES``): how the split forward, and a
    split backward whose forward kept no F, get F's tiles; ``heads_per_program``: heads that one program
    of the split kernels takes (capped so their width fits ``ops.attend.MAX_HEAD_GROUP_WIDTH``). None
    takes the default: materialized, one head (or a launch config's deprecated ``SPLIT`` / ``HEADS``)."""

    name: str = "auto"
    forward_features: Optional[str] = None
    backward_features: Optional[str] = None
    heads_per_program: Optional[int] = None


def check_schedule(schedule) -> AttentionSchedule:
    """``schedule`` (a name of ``ATTENTION_SCHEDULES`` or an ``AttentionSchedule``) as a checked record."""
    record = AttentionSchedule(schedule) if isinstance(schedule, str) else schedule
    if not isinstance(record, AttentionSchedule) or record.name not in ATTENTION_SCHEDULES:
        raise ValueError(f"attention: expected one of {ATTENTION_SCHEDULES} or an AttentionSchedule, got {schedule!r}")
    for field in ("forward_features", "backward_features"):
        value = getattr(record, field)
        if value is not None and value not in FEATURE_TILES:
            raise ValueError(f"attention: {field} expected one of {FEATURE_TILES}, got {value!r}")
    heads = record.heads_per_program
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"attention: heads_per_program expected a positive int, got {heads!r}")
    return record


def validating(validate: bool) -> bool:
    """``validate``, or True everywhere while ``LMEYE_FAST_VALIDATE=1`` (a debugging switch: every
    position is then checked where it is used, at the cost of a host sync per call)."""
    return validate or os.environ.get("LMEYE_FAST_VALIDATE") == "1"


def check_positions(name: str, positions: torch.Tensor, length: int, distinct: bool = False) -> None:
    """Value check (host sync): every position in ``[0, length)``; rows distinct if asked."""
    if positions.numel() == 0:
        return
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or high >= length:
        raise ValueError(f"{name}: positions must lie in [0, {length}), got values in [{low}, {high}]")
    if distinct and positions.dim() == 2 and positions.shape[1] > 1:
        ordered = positions.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(f"{name}: slot positions of one row must be distinct")


def _byte_range(t: torch.Tensor) -> Tuple[int, int]:
    """(first byte, one past the last byte) of its storage that ``t`` can touch."""
    start = t.storage_offset() * t.element_size()
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    return start, start + span * t.element_size()


def check_writable(target: torch.Tensor, op_name: str, **read: Optional[torch.Tensor]) -> None:
    """Refuse an in-place write into ``target`` (named ``embeds``) that would race: ``target`` with
    elements that share memory (an expanded tensor), or a tensor in ``read`` that shares memory with
    it (the kernels read those while other programs write ``target``). The same refusals as csrc's.
    Skipped while torch.compile traces: a traced tensor has no memory to compare."""
    if torch.compiler.is_compiling():
        return
    if any(stride == 0 and size > 1 for size, stride in zip(target.shape, target.stride())):
        raise ValueError(f"embeds: has elements that share memory (an expanded tensor, strides "
                         f"{target.stride()}); the in-place {op_name} needs distinct rows: pass "
                         f"embeds.contiguous() or use inplace=False")
    if target.numel() == 0 or target.device.type == "meta":  # meta tensors have no memory to share
        return
    storage = target.untyped_storage().data_ptr()
    for name, t in read.items():
        # Byte ranges are compared only within one storage: this runs on every in-place call, and
        # tensors of other storages (nearly always all of them) cost one pointer read.
        if t is None or t.numel() == 0 or t.untyped_storage().data_ptr() != storage:
            continue
        (lo, hi), (t_lo, t_hi) = _byte_range(target), _byte_range(t)
        if t_lo < hi and lo < t_hi:
            raise ValueError(f"{name}: shares memory with embeds, which the in-place {op_name} writes; "
                             f"pass a copy ({name}.clone())")


def metadata_key(*parts) -> tuple:
    """A cache key over everything a cached launch plan or argument check depends on: each tensor's
    shape, strides, dtype and device, and every other part (None for an absent tensor, a flag, a
    count) as it is. Every such cache keys through here, so that none can leave a property out and
    hand back a stale plan without an error."""
    # A list comprehension, not a generator: this runs several times per forward on the eager hot path.
    return tuple([(p.shape, p.stride(), p.dtype, p.device) if isinstance(p, _Tensor) else p for p in parts])


_Tensor = torch.Tensor


def check_known_fields(record_class, data, what: str) -> None:
    """Refuse keys of ``data`` (a saved record) that are not fields of the dataclass ``record_class``."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object of fields, got {type(data).__name__}")
    known = {field.name for field in dataclasses.fields(record_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown} (written by a newer lmeye_fast?)")
