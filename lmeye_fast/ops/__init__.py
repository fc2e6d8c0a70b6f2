"""Backend dispatch: one table from (op, backend) to the function that runs it.

Every backend's function for an op has the same signature as the reference
function of that name in ``lmeye_fast.reference`` (the fused ops' too), and is
differentiable.

=====================  ==================================================
op                     computes
=====================  ==================================================
request                step 1, row gather + request projection
attend_decomposed      steps 2-3, decomposition fused with the attention
transmit               step 4
interleave             step 5
transmit_interleave    steps 4-5, the interleave as the epilogue
=====================  ==================================================

``backend="auto"`` takes, for tensors on a CUDA device, the first available
backend of ``AUTO_ORDER[op]`` (the order is what benchmarks/RESULTS.md
measured), and the reference elsewhere.

``transmit`` and ``transmit_interleave`` take the shared transmission's (D, Di) weight or the
per-slot (K, D, Di) one (docs/design.md §2 step 4) through the same arguments; the weight's rank
says which.

``attend_decomposed`` takes the Triton backend's attention schedule as its last argument,
``schedule`` (a name of ``ATTENTION_SCHEDULES``, or an ``AttentionSchedule`` with the split
schedule's tile options; see docs/design.md §5); the reference takes the
products in that schedule's association (``reference.attend_decomposed``).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import backends, checks, reference


# "module:function" paths, imported on first use so that a missing triton or
# _C never breaks `import lmeye_fast`.
TABLE = {
    "request": {
        "reference": "lmeye_fast.reference:request",
        "triton": "lmeye_fast.ops.request:request",
        "cuda": "lmeye_fast.ops.cuda:request",
    },
    "attend_decomposed": {
        "reference": "lmeye_fast.reference:attend_decomposed",
        "triton": "lmeye_fast.ops.attend:attend_decomposed",
    },
    "transmit": {
        "reference": "lmeye_fast.reference:transmit",
        "triton": "lmeye_fast.ops.transmit:transmit",
    },
    "interleave": {
        "reference": "lmeye_fast.reference:interleave",
        "triton": "lmeye_fast.ops.interleave:interleave",
        "cuda": "lmeye_fast.ops.cuda:interleave",
    },
    "transmit_interleave": {
        "reference": "lmeye_fast.reference:transmit_interleave",
        "triton": "lmeye_fast.ops.transmit:transmit_interleave",
    },
}

AUTO_ORDER = {
    "request": ("triton", "cuda", "reference"),
    "attend_decomposed": ("triton", "reference"),
    "transmit": ("triton", "reference"),
    "interleave": ("cuda", "triton", "reference"),
    "transmit_interleave": ("triton", "reference"),
}


# Named where every argument check is (lmeye_fast.checks), and here beside the ops that take them.
ATTENTION_SCHEDULES, AttentionSchedule, FEATURE_TILES = (checks.ATTENTION_SCHEDULES, checks.AttentionSchedule,
                                                         checks.FEATURE_TILES)

# The fused ops' reference functions once lived here; lmeye_fast.reference holds them now.
_MOVED_TO_REFERENCE = ("attend_decomposed", "transmit_interleave")


def __getattr__(name: str):
    if name in _MOVED_TO_REFERENCE:
        warnings.warn(f"lmeye_fast.ops.{name} is deprecated: use lmeye_fast.reference.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load(path: str) -> Callable:
    module, name = path.split(":")
    # torch.compile traces a sys.modules lookup but breaks the graph on an import.
    if module in sys.modules:
        return getattr(sys.modules[module], name)
    return getattr(importlib.import_module(module), name)


def preload(backend: str) -> None:
    """Import now every kernel module ``backend`` may dispatch to, so that a
    later torch.compile finds them loaded (an import inside a traced forward
    is a graph break)."""
    for op, table in TABLE.items():
        for name in (AUTO_ORDER[op] if backend == "auto" else (backend,)):
            if name in table and backends.status(name)[0]:
                _load(table[name])


# The storage dtypes the kernels take; "auto" runs anything else (float64) on the reference.
KERNEL_DTYPES = checks.KERNEL_DTYPES


def resolve(op: str, backend: str, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend that runs ``op`` for ``backend`` ('auto' or a name) on ``device`` in ``dtype``."""
    if op not in TABLE:
        raise ValueError(f"op: expected one of {tuple(TABLE)}, got {op!r}")
    if backend == "auto":
        if device is None or device.type != "cuda" or (dtype is not None and dtype not in KERNEL_DTYPES):
            return "reference"
        for name in AUTO_ORDER[op]:
            if name in TABLE[op] and backends.status(name)[0]:
                return name
        return "reference"
    ok, reason = backends.status(backend)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available here: {reason} (see `python -m lmeye_fast.info`)")
    if backend not in TABLE[op]:
        # An op a backend has no kernel for falls to the reference rather than failing.
        return "reference"
    return backend


_RESOLVED: Dict[Tuple[str, str, str, Optional[torch.dtype]], Callable] = {}


def get(op: str, backend: str = "auto", device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None) -> Callable:
    """The function that runs ``op`` for ``backend`` on ``device`` in ``dtype`` (resolved once per
    device type and dtype)."""
    key = (op, backend, "" if device is None else device.type, dtype)
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _RESOLVED[key] = _load(TABLE[op][resolve(op, backend, device, dtype)])
    return fn
