"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run through Triton's CPU interpreter;
the variable has to be set before triton is first imported, hence here.
Every test draws fresh random inputs: the seed is random per test and is
printed with any failure so that it can be replayed (LMEYE_FAST_SEED=...).
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed(request):
    seed = int(os.environ.get("LMEYE_FAST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section(call.when, "seed", f"replay with LMEYE_FAST_SEED={value}")


@pytest.fixture(params=["split", "folded"])
def attention_schedule(request):
    """Run the test once per attention schedule of the Triton backend (``InteractiveLayer(attention=...)``):
    F formed by a GEMM (split, the default) and the folded schedule that never forms it
    (ops/attend_folded.py)."""
    return request.param
