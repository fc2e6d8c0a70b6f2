"""The library's own host-side cost per InteractiveLayer forward on the Triton path.

On the GPU machines an eager IPN call is host-bound, and that host time has two
parts: Triton's launcher and everything lmeye_fast does around the launches
(argument checks, dispatch, launch plans, allocations). This script measures
the second part on any machine, GPU or not: it records the Triton launches
instead of running them and stands in for the cuBLAS products
(``launch_capture.py``), so what it times is our Python.

    python benchmarks/host_overhead.py            # add --profile for a cProfile listing
    python benchmarks/host_overhead.py --folded   # the folded attention schedule

Reported: µs per no-grad forward (min and median of 5 rounds of 300 calls) and
the number of kernel launches per call.
"""

import argparse
import cProfile
import pstats
import statistics
import time

from launch_capture import LAUNCHES, install  # first: before triton is imported

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print a cProfile listing of 200 calls")
    parser.add_argument("--folded", action="store_true", help="the folded attention schedule (attend_folded.py)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    install(keep_args=False)
    from lmeye_fast import InteractiveLayer

    batch, seq, llm, vision, tokens, width, requests, heads = 32, 64, 256, 128, 17, 96, 5, 12
    layer = InteractiveLayer(llm, vision, width, requests, 1, heads, backend="triton",
                             attention="folded" if args.folded else "split")
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
