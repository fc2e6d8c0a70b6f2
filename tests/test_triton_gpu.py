"""GPU-only parity: bfloat16 (broken in the Triton interpreter) and the LMEye-7B shape.

Output and every gradient (parameters, hidden, image) under the rule of
tests/tolerance.py (2x the reference's own error in the low dtype, plus a floor of
about one rounding of the largest value); the gradient of embeds is a pass-through and
must equal the upstream gradient exactly.
"""

import pytest
import torch

from lmeye_fast import InteractiveLayer, backends
from tolerance import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 and the 7B shape run on GPU only)"),
]


def run(layer, inputs, grad, inplace):
    hidden, image, embeds, slot_pos, request_pos, mask = inputs
    dtype = next(layer.parameters()).dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, image, embeds)]
    h, x, e = leaves
    target = e * 1 if inplace else e
    out = layer(h, x, target, slot_pos, request_pos=request_pos, image_mask=mask, inplace=inplace)
    named = dict(layer.named_parameters())
    got = torch.autograd.grad(out, list(named.values()) + leaves, grad.to(out.dtype))
    return out, dict(zip(list(named) + ["hidden", "image", "embeds"], got))


def check_layer(dtype, batch, seq, llm, vision, tokens, width, num_req, subs, heads, inplace, masked=True,
                attention="auto", **transmission):
    assert backends.status("triton")[0]
    dev = "cuda"
    layer64 = InteractiveLayer(llm, vision, width, num_req, subs, heads, backend="reference", device=dev,
                               dtype=torch.float64, **transmission)
    num_slots = layer64.num_slots
    with torch.no_grad():
        # Values representable in ``dtype``, so all three layers hold the same parameters.
        for p in layer64.parameters():
            p.copy_((torch.randn_like(p) / p.shape[-1] ** 0.5).to(dtype))
    low = InteractiveLayer(llm, vision, width, num_req, subs, heads, backend="reference", device=dev, dtype=dtype,
                           **transmission)
    tri = InteractiveLayer(llm, vision, width, num_req, subs, heads, backend="triton", attention=attention, device=dev,
                           dtype=dtype, **transmission)
    low.load_state_dict(layer64.state_dict())
    tri.load_state_dict(layer64.state_dict())
    length = seq + num_slots
    hidden = torch.randn(batch, seq, llm, device=dev).to(dtype)
    request_pos = torch.randint(0, seq, (batch,), device=dev)
    image = torch.randn(batch, tokens, vision, device=dev).to(dtype)
    embeds = torch.randn(batch, length, llm, device=dev).to(dtype)
    slot_pos = torch.stack([torch.randperm(length, device=dev)[:num_slots] for _ in range(batch)])
    mask = None
    if masked:
        mask = torch.rand(batch, tokens, device=dev) > 0.2
        mask[0] = False
    inputs = (hidden, image, embeds, slot_pos, request_pos, mask)
    grad = torch.randn(batch, length, llm, device=dev).to(dtype)
    out, got = run(tri, inputs, grad, inplace)
    out64, ref64 = run(layer64, inputs, grad, False)
    out_low, ref_low = run(low, inputs, grad, False)
    assert out.dtype == dtype
    assert_close("output", out, out64, out_low, dtype)
    assert set(got) == set(ref64)
    for name, value in got.items():
        if name == "embeds":
            assert value.dtype == dtype and torch.equal(value.double(), ref64[name]), \
                "d embeds: not exactly the upstream gradient"
            continue
        assert_close(f"d {name}", value, ref64[name], ref_low[name], dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(3, 9, 200, 72, 37, 48, 5, 2, 3), (2, 5, 64, 64, 1, 64, 16, 1, 1),
                                   (1, 4, 96, 40, 1024, 32, 1, 1, 2)], ids=str)
def test_bf16_layer(shape, inplace, attention_schedule):
    check_layer(torch.bfloat16, *shape, inplace=inplace, attention=attention_schedule)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_7b_shape(dtype, attention_schedule):
    # LMEye-7B: B=32, T=512, D=4096, Dv=1024, N=257, Di=768, R=5, S=1, H=12
    check_layer(dtype, 32, 512, 4096, 1024, 257, 768, 5, 1, 12, inplace=True, attention=attention_schedule)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape,num_slots", [((3, 9, 200, 72, 37, 48, 1, 2, 3), 5), ((2, 5, 96, 40, 9, 32, 2, 1, 2), 6),
                                             # LMEye v1 at 7B: one request into five slots, D=4096, Di=768
                                             ((4, 64, 4096, 1024, 257, 768, 1, 1, 12), 5)], ids=str)
def test_bf16_per_slot_layer(shape, num_slots, inplace):
    check_layer(torch.bfloat16, *shape, inplace=inplace, num_slots=num_slots, transmission="per_slot")


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices: the layer runs on cuda:1 while cuda:0 is current")
@pytest.mark.parametrize("schedule", ["split", "folded"])
def test_layer_on_a_device_that_is_not_current(schedule):
    """Triton launches on the current device unless told otherwise: every launch must follow its
    tensors to cuda:1 (and its stream), forward and backward, while cuda:0 stays current."""
    batch, seq, llm, vision, tokens, width, num_req, heads = 2, 7, 96, 40, 9, 32, 3, 2
    layers = {dev: InteractiveLayer(llm, vision, width, num_req, 1, heads, backend="triton", attention=schedule,
                                    device=dev) for dev in ("cuda:0", "cuda:1")}
    layers["cuda:1"].load_state_dict(layers["cuda:0"].state_dict())
    inputs = [torch.randn(batch, seq, llm), torch.randn(batch, tokens, vision),
              torch.randn(batch, seq + num_req, llm)]
    slot_pos = torch.arange(seq, seq + num_req).expand(batch, num_req)
    request_pos = torch.tensor([seq - 1, seq - 2])
    results = {}
    torch.cuda.set_device(0)
    for dev, layer in layers.items():
        h, x, e = (t.to(dev).requires_grad_() for t in inputs)
        out = layer(h, x, e * 1, slot_pos.to(dev), request_pos=request_pos.to(dev), inplace=True)
        grads = torch.autograd.grad(out, [h, x, *layer.parameters()], torch.ones_like(out))
        results[dev] = [out, *grads]
        assert torch.cuda.current_device() == 0
    for got, want in zip(results["cuda:1"], results["cuda:0"]):
        torch.testing.assert_close(got.to("cuda:0"), want)
