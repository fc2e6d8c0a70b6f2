"""Drives many distinct shapes through InteractiveLayer's Triton path with the launches recorded,
not run (benchmarks/launch_capture.py), then prints every cache's size and bound as JSON.
Run by tests/test_reliability.py in a process of its own, as the capture patches triton and torch."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from launch_capture import LAUNCHES, install  # noqa: E402  (first: before triton is imported)

import torch  # noqa: E402


def main(shapes: int) -> None:
    install(keep_args=False)
    from lmeye_fast import InteractiveLayer, ops
    from lmeye_fast.ops import triton_launch

    layers = [InteractiveLayer(32, 16, 16, 2, 1, 2, backend="triton", attention=schedule)
              for schedule in ("split", "folded")]
    # Views of a few buffers: every call has its own (batch, sequence, image tokens) shape.
    hidden, image, embeds = torch.randn(3, 215, 32), torch.randn(3, 53, 16), torch.randn(3, 217, 32)
    for i in range(shapes):
        batch, seq, tokens = 1 + i % 3, 4 + i % 211, 1 + (i // 211) % 53
        slots = torch.tensor([[seq, seq + 1]] * batch)
        out = layers[i % 2](hidden[:batch, :seq], image[:batch, :tokens], embeds[:batch, :seq + 2], slots,
                            request_pos=torch.full((batch,), seq - 1))
        assert out.shape == (batch, seq + 2, 32)
        LAUNCHES.clear()
    report = {
        "plan caches": [len(cache) for cache in triton_launch.PLAN_CACHES],
        "plan limit": triton_launch.PlanCache.LIMIT,
        "checked": [len(layer._checked) for layer in layers],
        "checked limit": InteractiveLayer.CHECKED_LIMIT,
        "resolved": [len(layer._resolved) for layer in layers],
        "dispatch": len(ops._RESOLVED),
        "config caches": [fn.cache_info().currsize for fn in triton_launch.CONFIG_CACHED],
        "config limit": triton_launch.CONFIG_CACHE_LIMIT,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]))
