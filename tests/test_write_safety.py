"""What the writing ops owe their callers beyond the math: autograd sees every in-place write,
no write races (aliased or expanded targets, repeated positions from the planner), skipped
positions are skipped by every backend alike, and the Triton kernels refuse float64 rather than
round it through float32.

Without a GPU the Triton kernels run through the interpreter (tests/conftest.py); the CUDA
extension's ops need a device and are covered in tests/test_cuda_gpu.py.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmeye_fast import backends, reference  # noqa: E402
from lmeye_fast.planner import PlanStatus, plan_slots  # noqa: E402

triton_ok, triton_why = backends.status("triton")
needs_triton = pytest.mark.skipif(not triton_ok, reason=f"triton backend unavailable: {triton_why}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interleave_triton(embeds, rows, pos, inplace):
    from lmeye_fast.ops.interleave import interleave

    return interleave(embeds, rows, pos, inplace)


def _transmit_interleave_triton(embeds, rows, pos, inplace):
    """The transmission with the interleave as its epilogue, fed an identity W_o so that it adds ``rows``."""
    from lmeye_fast.ops.transmit import transmit_interleave

    eye = torch.eye(rows.shape[2], device=rows.device, dtype=rows.dtype)
    return transmit_interleave(rows, eye, None, None, embeds, pos, inplace)


WRITERS = {
    "reference": reference.interleave,
    "triton-interleave": _interleave_triton,
    "triton-transmit_interleave": _transmit_interleave_triton,
}


def writer(name):
    if name != "reference" and not triton_ok:
        pytest.skip(f"triton backend unavailable: {triton_why}")
    return WRITERS[name]


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_in_place_write_outside_autograd_invalidates_saved_tensors(name):
    """A graph that saved E must refuse its backward once E was written in place, as for built-in ops,
    also when the write itself was not recorded (no input requires grad)."""
    write = writer(name)
    batch, length, width, num_slots = 2, 7, 12, 3
    embeds = torch.randn(batch, length, width, device=DEVICE)
    weight = torch.randn(width, device=DEVICE, requires_grad=True)
    loss = (weight * embeds).sum()  # saves embeds for the gradient of weight
    pos = torch.stack([torch.randperm(length, device=DEVICE)[:num_slots] for _ in range(batch)])
    before = embeds._version
    out = write(embeds, torch.randn(batch, num_slots, width, device=DEVICE), pos, True)
    assert out is embeds and embeds._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_triton
@pytest.mark.parametrize("name", ["triton-interleave", "triton-transmit_interleave"])
def test_triton_refuses_float64_by_name(name):
    write = writer(name)
    embeds = torch.randn(2, 6, 8, device=DEVICE, dtype=torch.float64)
    rows = torch.randn(2, 3, 8, device=DEVICE, dtype=torch.float64)
    pos = torch.tensor([[0, 2, 4], [1, 3, 5]], device=DEVICE)
    with pytest.raises(TypeError, match=r"(embeds|rows|z).*float16, bfloat16 and float32, got float64"):
        write(embeds, rows, pos, False)


@needs_triton
def test_triton_interleave_refuses_float64_rows_into_a_float32_sequence():
    from lmeye_fast.ops.interleave import interleave

    with pytest.raises(TypeError, match="rows: .*got float64"):
        interleave(torch.randn(1, 4, 8, device=DEVICE), torch.randn(1, 2, 8, device=DEVICE, dtype=torch.float64),
                   torch.tensor([[0, 1]], device=DEVICE))


@needs_triton
@pytest.mark.parametrize("name", ["triton-interleave", "triton-transmit_interleave"])
def test_in_place_refuses_rows_that_alias_the_sequence(name):
    write = writer(name)
    embeds = torch.randn(2, 6, 8, device=DEVICE)
    pos = torch.tensor([[3, 4], [4, 5]], device=DEVICE)
    argument = "rows" if name == "triton-interleave" else "z"
    with pytest.raises(ValueError, match=f"{argument}: shares memory with embeds"):
        write(embeds, embeds[:, :2], pos, True)
    guard = embeds.clone()
    out = write(embeds, embeds[:, :2], pos, False)  # out of place the result is a copy: no race
    assert torch.equal(embeds, guard)
    torch.testing.assert_close(out, reference.interleave(guard, guard[:, :2], pos))


@needs_triton
@pytest.mark.parametrize("name", ["triton-interleave", "triton-transmit_interleave"])
def test_in_place_refuses_an_expanded_sequence(name):
    write = writer(name)
    embeds = torch.randn(1, 6, 8, device=DEVICE).expand(3, 6, 8)
    pos = torch.tensor([[0, 1]] * 3, device=DEVICE)
    with pytest.raises(ValueError, match="embeds: has elements that share memory"):
        write(embeds, torch.randn(3, 2, 8, device=DEVICE), pos, True)


@pytest.mark.parametrize("name", list(WRITERS))
def test_positions_outside_the_sequence_are_skipped_alike(name):
    """Every backend skips a position outside [0, T'), writes each valid one once, and gives a skipped row
    a zero gradient; the reference included (a negative index must not wrap around to the end)."""
    write = writer(name)
    batch, length, width = 3, 6, 10
    pos = torch.tensor([[1, -1, 4], [-1, -1, -1], [length, 0, length + 3]], device=DEVICE)
    embeds = torch.randn(batch, length, width, device=DEVICE, requires_grad=True)
    rows = torch.randn(batch, 3, width, device=DEVICE, requires_grad=True)
    out = write(embeds, rows, pos, False)
    want = embeds.detach().clone()
    for b in range(batch):
        for j in range(3):
            p = int(pos[b, j])
            if 0 <= p < length:
                want[b, p] += rows[b, j].detach()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    d_embeds, d_rows = torch.autograd.grad(out, (embeds, rows), grad)
    assert torch.equal(d_embeds, grad)
    inside = ((pos >= 0) & (pos < length))[..., None]
    want_rows = torch.where(inside, grad[torch.arange(batch, device=DEVICE)[:, None], pos.clamp(0, length - 1)], 0.0)
    torch.testing.assert_close(d_rows, want_rows, rtol=1e-6, atol=1e-6)


def test_reference_skipping_passes_gradcheck():
    pos = torch.tensor([[2, -1, 0], [-1, -1, -1], [4, 9, 1]])
    embeds = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, r: reference.interleave(e, r, pos), (embeds, rows))


REQ, SLOT = 3, 4


@pytest.mark.parametrize("name", list(WRITERS))
def test_malformed_planner_rows_are_left_untouched(name):
    """A row with too few slot tokens (and every other malformed row) must not be written at all: before,
    its missing slots all pointed at position 0, one row written several times (a race on a GPU)."""
    write = writer(name)
    num_slots, width = 4, 8
    rows_of_ids = [
        [9, REQ, SLOT, SLOT, SLOT, SLOT, 9, 9],   # well formed
        [9, REQ, SLOT, 9, 9, 9, 9, 9],            # too few slots
        [9, 9, 9, 9, 9, 9, 9, 9],                 # no request, no slots
        [SLOT, REQ, SLOT, SLOT, SLOT, 9, 9, 9],   # a slot before the request
    ]
    ids = torch.tensor(rows_of_ids, device=DEVICE)
    request_pos, slot_pos, status = plan_slots(ids, REQ, SLOT, num_slots)
    assert status.tolist() == [PlanStatus.OK, PlanStatus.TOO_FEW_SLOTS, PlanStatus.MISSING_REQUEST,
                               PlanStatus.SLOT_BEFORE_REQUEST]
    embeds = torch.randn(len(rows_of_ids), ids.shape[1], width, device=DEVICE)
    rows = torch.randn(len(rows_of_ids), num_slots, width, device=DEVICE)
    out = write(embeds, rows, slot_pos, False)
    assert torch.equal(out[1:], embeds[1:])
    want = embeds[0].clone()
    want[2:6] += rows[0]
    torch.testing.assert_close(out[0], want)
