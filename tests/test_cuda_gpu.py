"""The CUDA kernels against lmeye_fast.reference on a GPU (skipped without one).

Tolerances: every result is compared with the reference run in float64. A
float32/float16/bfloat16 result may differ from it by at most twice the error
of the reference run in the same dtype, plus a floor of TOL[dtype] times the
magnitude of the result (rounding near zero). The interleave and the gathers
round exactly as the reference does, so there they must also match the
reference in the same dtype bit for bit.
"""

import random

import pytest
import torch

from lmeye_fast import backends, ops, reference
from lmeye_fast.planner import PlanStatus, plan_slots, plan_slots_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not backends.cuda_status()[0],
                       reason=f"CUDA backend unavailable: {backends.cuda_status()[1]}"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
DEV = "cuda"


@pytest.fixture(scope="module")
def cuda_ops():
    from lmeye_fast.ops import cuda

    return cuda


def assert_close(got, want64, ref_lowp, name):
    """``got`` vs the float64 reference, allowed twice the same-dtype reference's error (module docstring)."""
    got64 = got.detach().double()
    err = (got64 - want64).abs().max().item() if got.numel() else 0.0
    ref_err = (ref_lowp.detach().double() - want64).abs().max().item() if got.numel() else 0.0
    floor = TOL[got.dtype] * max(1.0, want64.abs().max().item() if got.numel() else 0.0)
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x reference error {ref_err:.3g} + {floor:.3g}"


def slot_positions(batch, length, count, index_dtype=torch.int64, strided=False):
    pos = torch.stack([torch.randperm(length, device=DEV)[:count] for _ in range(batch)]).to(index_dtype)
    if strided:  # same values, non-contiguous layout
        pos = pos.t().contiguous().t()
    return pos


def storage_for(batch, length, width, dtype, layout):
    shape = {"contiguous": (batch, length, width), "offset": (batch, length, width + 1),
             "strided_d": (batch, length, width, 2), "transposed": (length, batch, width)}[layout]
    return torch.randn(shape, device=DEV, dtype=dtype)


def view_as_layout(storage, layout):
    """(B, T, D) over ``storage`` in one of several layouts, exercising the vector, peeled and scalar paths."""
    if layout == "contiguous":
        return storage
    if layout == "offset":  # every row starts one element past 16-byte alignment
        return storage[..., 1:]
    if layout == "strided_d":  # unit stride lost along D: scalar path
        return storage[..., 0]
    return storage.transpose(0, 1)  # "transposed": (T, B, D) storage


def make_embeds(batch, length, width, dtype, layout):
    return view_as_layout(storage_for(batch, length, width, dtype, layout), layout)


SHAPES = [(1, 1, 1, 1), (3, 7, 3, 2), (2, 33, 4095, 5), (3, 64, 257, 3), (2, 9, 123, 9), (4, 40, 8200, 5)]
LAYOUTS = ("contiguous", "offset", "strided_d", "transposed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("inplace", [False, True])
def test_interleave_matches_reference(cuda_ops, dtype, shape, layout, inplace):
    batch, length, width, count = shape
    storage = storage_for(batch, length, width, dtype, layout).requires_grad_()
    # An in-place op needs a non-leaf; the view keeps the layout under test either way.
    embeds = view_as_layout(storage * 1 if inplace else storage, layout)
    values = embeds.detach().clone()
    rows = make_embeds(batch, count, width, dtype, random.choice(LAYOUTS)).detach().requires_grad_()
    slot_pos = slot_positions(batch, length, count, random.choice((torch.int32, torch.int64)), strided=True)
    out = cuda_ops.interleave(embeds, rows, slot_pos, inplace)
    if inplace:
        assert out is embeds
    want_lowp = reference.interleave(values, rows.detach(), slot_pos.long())
    assert torch.equal(out.detach(), want_lowp), "interleave must round exactly as the reference"
    want64 = reference.interleave(values.double(), rows.detach().double(), slot_pos.long())
    assert_close(out, want64, want_lowp, "out")

    grad = torch.randn_like(out)
    d_storage, d_rows = torch.autograd.grad(out, (storage, rows), grad)
    expect = torch.zeros_like(storage)
    view_as_layout(expect, layout).copy_(grad)
    assert torch.equal(d_storage, expect)
    batch_index = torch.arange(batch, device=DEV)[:, None]
    assert torch.equal(d_rows, grad[batch_index, slot_pos.long()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 17, 3, 2), (2, 33, 4095, 5), (2, 12, 1000, 4)])
def test_interleave_with_slot_embed(cuda_ops, dtype, shape):
    batch, length, width, count = shape
    embeds = torch.randn(batch, length, width, device=DEV, dtype=dtype, requires_grad=True)
    rows = torch.randn(batch, count, width, device=DEV, dtype=dtype, requires_grad=True)
    slot_embed = torch.randn(count, width, device=DEV, dtype=dtype).requires_grad_()
    slot_pos = slot_positions(batch, length, count)
    out = cuda_ops.interleave(embeds, rows, slot_pos, slot_embed=slot_embed)

    def ref(e, r, s):
        return reference.interleave(e, (r.to(reference.compute_dtype(e.dtype)) + s).to(e.dtype), slot_pos)

    want64 = ref(embeds.double(), rows.double(), slot_embed.double())
    want_lowp = ref(embeds, rows, slot_embed)
    assert_close(out, want64, want_lowp, "out")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (embeds, rows, slot_embed), grad)
    inputs64 = [t.detach().double().requires_grad_() for t in (embeds, rows, slot_embed)]
    want = torch.autograd.grad(ref(*inputs64), inputs64, grad.double())
    inputs_lowp = [t.detach().clone().requires_grad_() for t in (embeds, rows, slot_embed)]
    want_lp = torch.autograd.grad(ref(*inputs_lowp), inputs_lowp, grad)
    for name, g, w, wl in zip(("d_embeds", "d_rows", "d_slot_embed"), got, want, want_lp):
        assert_close(g, w, wl, name)


def test_out_of_range_slots_never_write_outside(cuda_ops):
    batch, length, width = 3, 10, 37
    storage = torch.randn(batch, length + 2, width, device=DEV)
    guard = storage.clone()
    embeds = storage[:, 1:-1]  # guard rows on both sides of every batch entry
    rows = torch.randn(batch, 3, width, device=DEV)
    slot_pos = torch.tensor([[0, length, -1], [length + 5, 2, 9], [-7, 4, 1]], device=DEV)
    cuda_ops.interleave(embeds, rows, slot_pos, inplace=True)
    assert torch.equal(storage[:, 0], guard[:, 0]) and torch.equal(storage[:, -1], guard[:, -1])
    expect = guard[:, 1:-1].clone()
    for b in range(batch):
        for j in range(3):
            s = int(slot_pos[b, j])
            if 0 <= s < length:
                expect[b, s] += rows[b, j]
    assert torch.equal(embeds, expect)
    gathered = cuda_ops.gather_rows(embeds, slot_pos)
    inside = ((slot_pos >= 0) & (slot_pos < length))[..., None]
    assert torch.equal(gathered, torch.where(inside, embeds[torch.arange(batch, device=DEV)[:, None],
                                                             slot_pos.clamp(0, length - 1)], 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 3, 257, 4095, 4096])
@pytest.mark.parametrize("gathered", [True, False])
def test_request_matches_reference(cuda_ops, dtype, width, gathered):
    batch, length, num_requests, di = random.choice((1, 3, 5)), random.choice((1, 9, 123)), 3, 24
    hidden = make_embeds(batch, length, width, dtype, random.choice(LAYOUTS)).detach().requires_grad_()
    request_pos = torch.randint(0, length, (batch,), device=DEV) if gathered else None
    h_in = hidden if gathered else hidden[:, 0]
    w_q = (torch.randn(num_requests * di, width, device=DEV, dtype=dtype) / width ** 0.5).requires_grad_()
    b_q = torch.randn(num_requests * di, device=DEV, dtype=dtype).requires_grad_()
    got = cuda_ops.request(h_in, request_pos, w_q, b_q, num_requests)
    assert got.shape == (batch, num_requests, di) and got.dtype == dtype
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, w_q, b_q)]
    leaves_lp = [t.detach().clone().requires_grad_() for t in (hidden, w_q, b_q)]

    def ref(h, w, b):
        return reference.request(h if gathered else h[:, 0], request_pos, w, b, num_requests)

    want64, want_lp = ref(*leaves64), ref(*leaves_lp)
    assert_close(got, want64, want_lp, "r")
    grad = torch.randn_like(got)
    grads = torch.autograd.grad(got, (hidden, w_q, b_q), grad)
    grads64 = torch.autograd.grad(want64, leaves64, grad.double())
    grads_lp = torch.autograd.grad(want_lp, leaves_lp, grad)
    for name, g, w, wl in zip(("d_hidden", "d_w_q", "d_b_q"), grads, grads64, grads_lp):
        assert_close(g, w, wl, name)


def test_gather_scatter_gradcheck(cuda_ops):
    batch, length, width, count = 3, 11, 5, 4
    seq = torch.randn(batch, length, width, device=DEV, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(batch, count, width, device=DEV, dtype=torch.float64, requires_grad=True)
    index = slot_positions(batch, length, count)
    assert torch.autograd.gradcheck(lambda s: cuda_ops.gather_rows(s, index), (seq,))
    assert torch.autograd.gradgradcheck(lambda s: cuda_ops.gather_rows(s, index), (seq,))
    assert torch.autograd.gradcheck(lambda r: cuda_ops.scatter_rows(r, index, length), (rows,))
    embeds = torch.randn(batch, length, width, device=DEV, dtype=torch.float64, requires_grad=True)
    slot_embed = torch.randn(count, width, device=DEV, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda e, r, s: cuda_ops.interleave(e, r, index, slot_embed=s), (embeds, rows, slot_embed))
    assert torch.autograd.gradgradcheck(
        lambda e, r, s: cuda_ops.interleave(e, r, index, slot_embed=s), (embeds, rows, slot_embed))


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_gather_backward_sums_repeated_positions(cuda_ops, dtype):
    """A gather may read one row several times; its backward (scatter_rows) must add every read's
    gradient, deterministically (not one of them at random, as a racing read-modify-write would)."""
    batch, length, width, count = 4, 9, 300, 6
    seq = torch.randn(batch, length, width, device=DEV, dtype=dtype, requires_grad=True)
    index = torch.randint(0, 3, (batch, count), device=DEV)  # many repeats in every row
    index[0] = 2
    grad = torch.randn(batch, count, width, device=DEV, dtype=dtype)
    (got,) = torch.autograd.grad(cuda_ops.gather_rows(seq, index), seq, grad)
    seq64 = seq.detach().double().requires_grad_()
    (want64,) = torch.autograd.grad(reference.gather_rows(seq64, index), seq64, grad.double())
    seq_low = seq.detach().clone().requires_grad_()
    (want_low,) = torch.autograd.grad(reference.gather_rows(seq_low, index), seq_low, grad)
    assert_close(got, want64, want_low, "d seq")
    again = torch.autograd.grad(cuda_ops.gather_rows(seq, index), seq, grad)[0]
    assert torch.equal(got, again), "scatter_rows is not deterministic"


@pytest.mark.parametrize("name", ["interleave", "interleave_", "gather_rows", "scatter_rows", "plan_slots"])
def test_opcheck(cuda_ops, name):
    batch, length, width, count = 3, 20, 257, 4
    embeds = torch.randn(batch, length, width, device=DEV, dtype=torch.bfloat16)
    rows = torch.randn(batch, count, width, device=DEV, dtype=torch.bfloat16)
    index = slot_positions(batch, length, count)
    args = {
        "interleave": (embeds.requires_grad_(), rows.requires_grad_(), index,
                       torch.randn(count, width, device=DEV, dtype=torch.bfloat16, requires_grad=True)),
        "interleave_": (embeds, rows, index, None),
        "gather_rows": (embeds.requires_grad_(), index),
        "scatter_rows": (rows.requires_grad_(), index, length),
        "plan_slots": (torch.randint(0, 9, (batch, length), device=DEV), 3, 5, count),
    }[name]
    torch.library.opcheck(getattr(torch.ops.lmeye_fast, name), args)


def test_dispatch_selects_cuda(cuda_ops):
    device = torch.device(DEV)
    assert ops.get("interleave", "cuda", device) is cuda_ops.interleave
    assert ops.get("request", "cuda", device) is cuda_ops.request


REQ, SLOT = 7, 9


def random_token_rows(batch, length, num_slots):
    """Rows mixing every case: well formed, missing/multiple requests, too few/many slots, slots first."""
    ids = torch.randint(10, 60, (batch, length), device=DEV)
    for b in range(batch):
        case = random.randrange(7)
        n_req = {1: 0, 2: 2}.get(case, 1)
        n_slot = {3: max(0, num_slots - 1), 4: num_slots + 2}.get(case, num_slots)
        if n_req + n_slot > length:
            ids[b] = torch.tensor(random.choices((REQ, SLOT, 11), k=length), device=DEV)
            continue
        where = torch.randperm(length, device=DEV)[:n_req + n_slot].sort().values
        if case == 5 and n_slot:  # a slot first, then the request
            ids[b, where[0]], ids[b, where[1:n_req + 1]] = SLOT, REQ
            ids[b, where[n_req + 1:]] = SLOT
        else:
            ids[b, where[:n_req]] = REQ
            ids[b, where[n_req:]] = SLOT
    return ids


@pytest.mark.parametrize("batch, length, num_slots", [(1, 1, 1), (5, 3, 2), (7, 123, 5), (32, 2048, 5),
                                                      (3, 5000, 5), (2, 4000, 1500)])
def test_planner_kernel_matches_twin(batch, length, num_slots):
    ids = random_token_rows(batch, length, num_slots)
    for candidate in (ids, ids.to(torch.int32), ids.t().contiguous().t()):
        got = plan_slots(candidate, REQ, SLOT, num_slots, backend="cuda")
        want = plan_slots_torch(candidate, REQ, SLOT, num_slots)
        for name, g, w in zip(("request_pos", "slot_pos", "status"), got, want):
            assert g.dtype == w.dtype and g.device == w.device, name
            assert torch.equal(g, w), name


def test_planner_kernel_empty_rows():
    got = plan_slots(torch.empty(4, 0, dtype=torch.int64, device=DEV), REQ, SLOT, 3, backend="cuda")
    assert got[0].tolist() == [0] * 4 and got[1].tolist() == [[-1] * 3] * 4
    assert got[2].tolist() == [PlanStatus.MISSING_REQUEST] * 4


def test_planner_has_no_host_sync():
    ids = random_token_rows(32, 2048, 5)
    plan_slots(ids, REQ, SLOT, 5)  # warm-up: loads modules and caches backend status
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan_slots(ids, REQ, SLOT, 5, backend="cuda")
        plan_slots_torch(ids, REQ, SLOT, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_ops_bad_input_messages(cuda_ops):
    embeds = torch.randn(2, 6, 8, device=DEV)
    rows = torch.randn(2, 3, 8, device=DEV)
    index = slot_positions(2, 6, 3)
    with pytest.raises(ValueError, match=r"lmeye_fast::interleave: rows: expected shape \(B, R, D\) = \(2, R, 8\) to match embeds \(2, 6, 8\), got \(2, 3, 4\)"):
        torch.ops.lmeye_fast.interleave(embeds, rows[:, :, :4], index)
    with pytest.raises(TypeError, match=r"lmeye_fast::interleave: rows: expected dtype float32 \(the dtype of embeds\), got float16"):
        torch.ops.lmeye_fast.interleave(embeds, rows.half(), index)
    with pytest.raises(RuntimeError, match="lmeye_fast::interleave: slot_pos: expected a CUDA tensor .*got a tensor on cpu"):
        torch.ops.lmeye_fast.interleave(embeds, rows, index.cpu())
    with pytest.raises(RuntimeError, match="lmeye_fast::interleave_: embeds: has elements that share memory"):
        torch.ops.lmeye_fast.interleave_(embeds[:1].expand(2, -1, -1), rows, index)
    with pytest.raises(RuntimeError, match="lmeye_fast::interleave_: rows: shares memory with embeds"):
        torch.ops.lmeye_fast.interleave_(embeds, embeds[:, :3], index)
