"""The slot planner: request and slot positions from the token ids, the PyTorch twin against the CUDA kernel.

``lmeye_fast.planner.plan_slots`` finds, per row of ``input_ids`` (B, T), the request
token and the R slot tokens after it, with a per-row status and no host sync. The twin
(``backend="reference"``) is a chain of vectorised PyTorch ops and is the ``x_eager``
baseline; the CUDA backend is one kernel. Rows are well formed, as a processor builds them.
"""

from __future__ import annotations

import pytest
import torch

import harness

SUITE = "planner"
REQUEST_TOKEN, SLOT_TOKEN = 32000, 32001
PROVIDERS = {"torch-twin": "reference", "cuda": "cuda"}


def make_ids(shape, dev):
    B, T, R = shape.B, shape.T, shape.R
    input_ids = torch.randint(0, REQUEST_TOKEN, (B, T), device=dev)
    request_pos = torch.randint(0, T - R, (B,), device=dev)
    input_ids.scatter_(1, request_pos[:, None], REQUEST_TOKEN)
    input_ids.scatter_(1, request_pos[:, None] + 1 + torch.arange(R, device=dev), SLOT_TOKEN)
    return input_ids


@pytest.mark.parametrize("provider", tuple(PROVIDERS))
def test_planner(benchmark, ceilings, bench_device, bench_shape, provider):
    planner = pytest.importorskip("lmeye_fast.planner", reason="lmeye_fast.planner is not importable")
    dev, shape = bench_device, bench_shape
    if provider == "cuda":
        harness.require("cuda", dev)
    input_ids = make_ids(shape, dev)
    backend = PROVIDERS[provider]

    def fn():
        return planner.plan_slots(input_ids, REQUEST_TOKEN, SLOT_TOKEN, shape.R, backend=backend)

    harness.warm_up(fn, provider, dev)
    got = fn()
    want = planner.plan_slots(input_ids, REQUEST_TOKEN, SLOT_TOKEN, shape.R, backend="reference")
    for name, a, b in zip(("request_pos", "slot_pos", "status"), got, want):
        assert torch.equal(a.long(), b.long()), f"{provider}: {name} differs from the PyTorch twin"

    n_bytes, flops = shape.op_cost("plan_slots")
    harness.run_case(benchmark, ceilings, fn, suite=SUITE, case="plan_slots", provider=provider, shape=shape,
                     n_bytes=n_bytes, flops=flops, baseline="eager" if provider == "torch-twin" else None)
