"""The library's own host-side cost per InteractiveLayer forward on the Triton path.

On the GPU machines an eager IPN call is host-bound, and that host time has two
parts: Triton's launcher and everything lmeye_fast does around the launches
(argument checks, dispatch, launch plans, allocations). This script measures
the second part on any machine, GPU or not: it stubs out the Triton launches
and the cuBLAS products (shape-only stand-ins), so what it times is our Python.

    python benchmarks/host_overhead.py            # add --profile for a cProfile listing

Reported: µs per no-grad forward (min and median of 5 rounds of 300 calls) and
the number of kernel launches per call.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real launch path, not the interpreter's

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

LAUNCHES = []


def _stub_launch(self, grid):
    return lambda *args, **kwargs: LAUNCHES.append(grid)


def _stub_products():
    """Shape-only stand-ins: on a GPU these are cuBLAS calls whose host cost is the library's, not ours."""
    def empty(rows, cols, dtype):
        return torch.empty((rows, cols), dtype=dtype)

    torch.mm = lambda a, b: empty(a.shape[0], b.shape[1], a.dtype)
    torch.addmm = lambda c, a, b: empty(a.shape[0], b.shape[1], a.dtype)
    torch.nn.functional.linear = lambda x, w, b=None: torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing of 200 calls")
    args = parser.parse_args()

    torch.set_num_threads(1)
    JITFunction.__getitem__ = _stub_launch
    from lmeye_fast import backends
    from lmeye_fast.ops import triton_launch

    backends._STATUS["triton"] = (True, "launches stubbed out")
    triton_launch._sm_count = lambda index: 132
    torch.cuda.current_device = lambda: 0
    _stub_products()
    from lmeye_fast import InteractiveLayer

    batch, seq, llm, vision, tokens, width, requests, heads = 32, 64, 256, 128, 17, 96, 5, 12
    layer = InteractiveLayer(llm, vision, width, requests, 1, heads, backend="triton")
    hidden, image = torch.randn(batch, seq, llm), torch.randn(batch, tokens, vision)
    embeds = torch.randn(batch, seq, llm)
    slots = torch.arange(40, 40 + requests).expand(batch, requests).contiguous()
    request_pos = torch.full((batch,), 39)

    def forward():
        with torch.no_grad():
            layer(hidden, image, embeds, slots, request_pos=request_pos, inplace=True)

    for _ in range(20):
        forward()
    rounds = []
    for _ in range(5):
        before, start = len(LAUNCHES), time.perf_counter()
        for _ in range(300):
            forward()
        rounds.append((time.perf_counter() - start) / 300 * 1e6)
    launches = (len(LAUNCHES) - before) / 300
    print(f"no-grad forward: min {min(rounds):.1f} us, median {statistics.median(rounds):.1f} us per call, "
          f"{launches:.0f} Triton launches per call (stubbed)")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [forward() for _ in range(200)])
        pstats.Stats(profile).sort_stats("cumtime").print_stats(25)


if __name__ == "__main__":
    main()
