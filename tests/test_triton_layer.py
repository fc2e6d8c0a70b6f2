"""InteractiveLayer(backend="triton") against the reference layer with the same
parameters: output, every parameter gradient, and the gradients of hidden,
image and embeds, at short and long image sequences (N = 257, 1024) and with
strided index/mask inputs.

Tolerance: the rule of tests/tolerance.py (parameters, inputs and the upstream
gradient drawn in the low dtype; 2x the error of the reference layer run in that
dtype, plus a floor); the gradient of embeds is a pass-through and must equal the
upstream gradient exactly.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmeye_fast import InteractiveLayer, backends, reference  # noqa: E402
from tolerance import assert_close  # noqa: E402

ok, why = backends.status("triton")
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
def run(layer, inputs, grad, inplace, noncontig):
    hidden, image, embeds, slot_pos, request_pos, mask = inputs
    dtype = next(layer.parameters()).dtype
    leaves = [t.detach().to(dtype) for t in (hidden, image, embeds)]
    if noncontig:
        leaves = [t.transpose(0, -1).contiguous().transpose(0, -1) for t in leaves]
    leaves = [t.requires_grad_() for t in leaves]
    h, x, e = leaves
    target = e * 1 if inplace else e  # an in-place write needs a non-leaf
    out = layer(h, x, target, slot_pos, request_pos=request_pos, image_mask=mask, inplace=inplace)
    if inplace:
        assert out is target
    named = dict(layer.named_parameters())
    got = torch.autograd.grad(out, list(named.values()) + leaves, grad.to(out.dtype))
    return out, dict(zip(list(named) + ["hidden", "image", "embeds"], got))


def strided_view(values, fill):
    """``values`` (B, K) as a strided view: the even columns of a (B, 2K) tensor whose odd columns hold
    ``fill`` (values a kernel that ignored the strides would read instead)."""
    big = torch.stack([values, fill], dim=-1).flatten(1)
    view = big[:, ::2]
    assert torch.equal(view, values) and view.stride(1) == 2
    return view


CASES = [
    # B, T, D, Dv, N, Di, R, S, H, masked, vectors, strided (index and mask tensors as strided views)
    (2, 9, 40, 24, 5, 32, 3, 2, 2, True, False, False),
    (3, 6, 37, 20, 7, 24, 1, 1, 3, False, True, True),
    (1, 5, 19, 16, 4, 16, 16, 3, 1, True, False, True),
    (2, 7, 23, 13, 3, 12, 2, 1, 2, True, False, True),
    # Long image sequences: many key tiles, the last one partial.
    (2, 5, 21, 11, 257, 12, 2, 1, 2, True, False, True),
    (2, 4, 19, 9, 1024, 8, 2, 1, 1, True, False, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}D{}Dv{}N{}Di{}R{}S{}H{}m{}v{}s{}".format(*c))
def test_layer_parity(dtype, inplace, case, attention_schedule):
    check_parity(dtype, inplace, case, attention_schedule)


# (case, K): the per-slot transmission, one request into five slots (LMEye v1) and two into six.
PER_SLOT_CASES = [(CASES[1], 5), ((2, 7, 23, 13, 3, 12, 2, 1, 2, True, False, True), 6),
                  ((2, 5, 21, 11, 257, 12, 1, 1, 2, True, False, False), 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case,num_slots", PER_SLOT_CASES,
                         ids=lambda c: "B{}T{}D{}Dv{}N{}Di{}R{}S{}H{}m{}v{}s{}".format(*c) if isinstance(c, tuple)
                         else f"K{c}")
def test_per_slot_layer_parity(dtype, inplace, case, num_slots):
    check_parity(dtype, inplace, case, "auto", num_slots=num_slots, transmission="per_slot")


def check_parity(dtype, inplace, case, attention, **transmission):
    batch, seq, llm, vision, tokens, width, num_req, subs, heads, masked, vectors, strided = case
    layer64 = InteractiveLayer(llm, vision, width, num_req, subs, heads, backend="reference",
                               device=DEVICE, dtype=torch.float64, **transmission)
    num_slots = layer64.num_slots
    with torch.no_grad():
        # Non-trivial transmission and slot embedding so every gradient path carries signal; the values
        # are representable in ``dtype``, so all three layers hold the same parameters.
        for p in layer64.parameters():
            p.copy_((torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5).to(dtype))
    low = InteractiveLayer(llm, vision, width, num_req, subs, heads, backend="reference", device=DEVICE, dtype=dtype,
                           **transmission)
    tri = InteractiveLayer(llm, vision, width, num_req, subs, heads, backend="triton", attention=attention,
                           device=DEVICE, dtype=dtype, **transmission)
    low.load_state_dict(layer64.state_dict())
    tri.load_state_dict(layer64.state_dict())
    assert all(torch.equal(a.double(), b) for a, b in zip(tri.parameters(), layer64.parameters()))

    length = seq + num_slots + 2
    hidden = torch.randn(batch, llm, device=DEVICE) if vectors else torch.randn(batch, seq, llm, device=DEVICE)
    hidden = hidden.to(dtype)
    image = torch.randn(batch, tokens, vision, device=DEVICE).to(dtype)
    embeds = torch.randn(batch, length, llm, device=DEVICE).to(dtype)
    request_pos = None if vectors else torch.randint(0, seq, (batch,), device=DEVICE)
    slot_pos = torch.stack([torch.randperm(length, device=DEVICE)[:num_slots] for _ in range(batch)])
    mask = None
    if masked:
        mask = torch.rand(batch, tokens, device=DEVICE) > 0.4
        mask[0] = False  # a row with every image token masked gets z = r
        if batch > 1:
            mask[1, -1] = True  # the last token (in a partial tile at N = 257) is kept
    if strided:
        # A kernel that ignored the strides would read other positions and slots, or the inverse mask.
        if request_pos is not None:
            request_pos = strided_view(request_pos[:, None], (request_pos[:, None] + 1) % seq).squeeze(1)
            assert request_pos.stride(0) == 2
        if mask is not None:
            mask = strided_view(mask, ~mask)
        slot_pos = strided_view(slot_pos, (slot_pos + 1) % length)
    inputs = (hidden, image, embeds, slot_pos, request_pos, mask)
    grad = torch.randn(batch, length, llm, device=DEVICE).to(dtype)

    out, got = run(tri, inputs, grad, inplace, noncontig=True)
    out64, ref64 = run(layer64, inputs, grad, False, noncontig=False)
    out_low, ref_low = run(low, inputs, grad, False, noncontig=False)
    assert_close("output", out, out64, out_low, dtype)
    assert set(got) == set(ref64) == set(ref_low)
    for name, value in got.items():
        if name == "embeds":
            assert value.dtype == dtype and torch.equal(value.double(), ref64[name]), "d embeds: not exactly grad"
        else:
            assert_close(f"d {name}", value, ref64[name], ref_low[name], dtype)
    assert got["hidden"].abs().sum() > 0 and got["request_proj.weight"].abs().sum() > 0
    if mask is None or mask.any():  # with every image token masked, z = r and d image is zero
        assert got["image"].abs().sum() > 0 and got["decompose_proj.weight"].abs().sum() > 0


def test_mixed_dtypes_compute_in_the_parameters_dtype():
    """A half-precision LLM beside float32 adapter weights: activations are cast to the weights' dtype."""
    layer = InteractiveLayer(24, 14, 12, num_requests=3, num_heads=3, backend="triton", device=DEVICE)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    hidden = torch.randn(2, 6, 24, device=DEVICE, dtype=torch.float16)
    image = torch.randn(2, 5, 14, device=DEVICE, dtype=torch.float16)
    embeds = torch.randn(2, 9, 24, device=DEVICE, dtype=torch.float16)
    slots = torch.stack([torch.randperm(9, device=DEVICE)[:3] for _ in range(2)])
    pos = torch.randint(0, 6, (2,), device=DEVICE)
    out = layer(hidden, image, embeds, slots, request_pos=pos)
    assert out.dtype == torch.float16
    p = [t.detach().double() for t in (layer.request_proj.weight, layer.request_proj.bias,
                                       layer.decompose_proj.weight, layer.decompose_proj.bias,
                                       layer.transmit_proj.weight, layer.transmit_proj.bias, layer.slot_embed)]
    want = reference.interactive(hidden.double(), pos, image.double(), None, embeds.double(), slots, *p, 3, 1)
    err = (out.double() - want).abs().max().item()
    assert err <= 2 * torch.finfo(torch.float16).eps * (1 + want.abs().max().item()), err
    out.float().sum().backward()
    assert all(q.grad is not None and q.grad.dtype == torch.float32 for q in layer.parameters())


def test_autocast_runs_the_kernels_in_the_autocast_dtype():
    layer = InteractiveLayer(24, 14, 12, num_requests=3, num_heads=3, backend="triton", device=DEVICE)
    hidden = torch.randn(2, 6, 24, device=DEVICE)
    image = torch.randn(2, 5, 14, device=DEVICE)
    embeds = torch.randn(2, 9, 24, device=DEVICE)
    slots = torch.stack([torch.randperm(9, device=DEVICE)[:3] for _ in range(2)])
    with torch.autocast(DEVICE, dtype=torch.float16):
        tokens = layer.transmitted(hidden, image, request_pos=torch.randint(0, 6, (2,), device=DEVICE))
        out = layer(hidden, image, embeds, slots, request_pos=torch.randint(0, 6, (2,), device=DEVICE))
    assert tokens.dtype == torch.float16 and out.dtype == torch.float32
    out.sum().backward()
    assert layer.request_proj.weight.grad.dtype == torch.float32


def test_auto_sends_float64_to_the_reference():
    from lmeye_fast import ops

    cuda = torch.device("cuda")
    for op in ops.TABLE:
        assert ops.resolve(op, "auto", cuda, torch.float64) == "reference"
