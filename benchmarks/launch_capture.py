"""Run lmeye_fast's Triton path on any machine, GPU or not, with every kernel launch recorded
instead of executed.

Import this before anything imports triton (it clears ``TRITON_INTERPRET``: the real launch
path, with the launch configurations a GPU gets, not the interpreter's), then call
``install()``. Each launch appends ``(kernel, grid, args, kwargs)`` to ``LAUNCHES``; the cuBLAS
products the ops call on a GPU become shape-only stand-ins. Outputs are uninitialised
memory: this is for host-cost timing (``host_overhead.py``) and for compiling exactly the
kernels a forward and backward launch (``compile_kernels.py``), never for values.
"""

import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

LAUNCHES = []


def _record(self, grid):
    return lambda *args, **kwargs: LAUNCHES.append((self, grid, args, kwargs))


def _count(self, grid):
    # Holding the arguments would keep every output alive: timing then measures the allocator.
    return lambda *args, **kwargs: LAUNCHES.append((self, grid, None, None))


def _stub_products():
    """Shape-only stand-ins: on a GPU these are cuBLAS calls, not lmeye_fast's kernels."""
    def empty(rows, cols, dtype):
        return torch.empty((rows, cols), dtype=dtype)

    torch.mm = lambda a, b: empty(a.shape[0], b.shape[1], a.dtype)
    torch.addmm = lambda c, a, b: empty(a.shape[0], b.shape[1], a.dtype)
    torch.nn.functional.linear = lambda x, w, b=None: torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype)


def install(keep_args: bool = True, sm_count: int = 132) -> None:
    """Record launches (their arguments too with ``keep_args``), report the triton backend as
    available, and stand in for the device queries."""
    JITFunction.__getitem__ = _record if keep_args else _count
    from lmeye_fast import backends
    from lmeye_fast.ops import triton_launch

    backends._STATUS["triton"] = (True, "launches recorded, not run")
    triton_launch._sm_count = lambda index: sm_count
    torch.cuda.current_device = lambda: 0
    _stub_products()
