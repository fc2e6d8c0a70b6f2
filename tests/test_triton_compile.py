"""torch.library.opcheck for every Triton op, and torch.compile(fullgraph=True)
over InteractiveLayer(backend="triton"): fullgraph raises on any graph break.
On the CPU the compiled graph runs with backend="aot_eager" (the interpreter's
kernels are opaque custom ops there); on a GPU the default inductor backend
traces into the triton_op bodies. Compiled results must equal eager ones to
fp32 round-off (atol 1e-5, rtol 1e-4).
"""

import os

import pytest
import torch
from torch.library import opcheck

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmeye_fast import InteractiveLayer, backends  # noqa: E402

ok, why = backends.status("triton")
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def op_cases():
    import lmeye_fast.ops.attend  # noqa: F401  (registers the ops)
    import lmeye_fast.ops.attend_folded  # noqa: F401
    import lmeye_fast.ops.interleave  # noqa: F401
    import lmeye_fast.ops.request  # noqa: F401
    import lmeye_fast.ops.transmit  # noqa: F401

    L = torch.ops.lmeye_fast
    batch, seq, llm, vision, tokens, width, num_req, subs, heads = 2, 5, 20, 12, 3, 16, 3, 2, 2

    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE)

    h, q = rnd(batch, seq, llm), torch.tensor([1, 4], device=DEVICE)
    w, b = rnd(num_req * width, llm), rnd(num_req * width)
    r, x = rnd(batch, num_req, width), rnd(batch, tokens, vision)
    mask = torch.rand(batch, tokens, device=DEVICE) > 0.3
    wf, bf = rnd(subs * width, vision), rnd(subs * width)
    wo, bo, se = rnd(llm, width), rnd(llm), rnd(num_req, llm)
    embeds = rnd(batch, seq + 2, llm)
    sp = torch.stack([torch.randperm(seq + 2, device=DEVICE)[:num_req] for _ in range(batch)])
    # The per-slot transmission: two slots per request, each with its own (D, Di) matrix.
    wk, bk, sek = rnd(2 * num_req, llm, width), rnd(2 * num_req, llm), rnd(2 * num_req, llm)
    spk = torch.stack([torch.randperm(seq + 2, device=DEVICE)[:2 * num_req] for _ in range(batch)])
    z, lse, feats = L.attend_fwd_triton(r, x, mask, wf, bf, heads, subs)
    _, probs, q_f, u_f, sums = L.attend_folded_fwd_triton(r, x, mask, wf, bf, heads, subs)
    return [
        (L.request_fwd_triton, (h, q, w, b)),
        (L.request_fwd_triton, (h[:, 0], None, w, None)),
        (L.request_bwd_triton, (rnd(batch, num_req * width), h, q, w)),
        (L.request_bwd_triton, (rnd(batch, num_req * width), h, q, w, False)),
        (L.attend_fwd_triton, (r, x, mask, wf, bf, heads, subs)),
        (L.attend_fwd_triton, (r, x, None, wf, None, heads, subs)),
        (L.attend_bwd_triton, (rnd(batch, num_req, width), r, x, mask, wf, bf, lse, feats, heads, subs)),
        (L.attend_bwd_triton, (rnd(batch, num_req, width), r, x, mask, wf, bf, lse, feats, heads, subs, False)),
        (L.attend_bwd_triton, (rnd(batch, num_req, width), r, x, mask, wf, bf, lse, None, heads, subs)),
        (L.attend_bwd_triton, (rnd(batch, num_req, width), r, x, mask, wf, bf, lse, x.new_empty((0,)), heads, subs)),
        (L.attend_folded_fwd_triton, (r, x, mask, wf, bf, heads, subs)),
        (L.attend_folded_fwd_triton, (r, x, None, wf, None, heads, subs)),
        (L.attend_folded_bwd_triton, (rnd(batch, num_req, width), r, x, wf, bf, probs, q_f, u_f, sums, heads, subs)),
        (L.attend_folded_bwd_triton, (rnd(batch, num_req, width), r, x, wf, None, probs, q_f, u_f, sums, heads, subs)),
        (L.attend_folded_bwd_triton, (rnd(batch, num_req, width), r, x, wf, bf, probs, q_f, u_f, sums, heads, subs,
                                      False)),
        (L.transmit_fwd_triton, (z, wo, bo, se)),
        (L.transmit_fwd_triton, (z, wo, None, None)),
        (L.transmit_bwd_triton, (rnd(batch, num_req, llm), z, wo)),
        (L.transmit_interleave_triton, (z, wo, bo, se, embeds, sp)),
        (L.transmit_interleave_triton_, (z, wo, bo, se, embeds.clone(), sp)),
        (L.transmit_bwd_triton, (rnd(batch, num_req, llm), z, wo, True, False)),
        (L.transmit_fwd_triton, (z, wk, bk, sek)),
        (L.transmit_fwd_triton, (z[:, :1], wk, None, None)),
        (L.transmit_bwd_triton, (rnd(batch, 2 * num_req, llm), z, wk)),
        (L.transmit_bwd_triton, (rnd(batch, 2 * num_req, llm), z, wk, False, True)),
        (L.transmit_interleave_triton, (z, wk, bk, sek, embeds, spk)),
        (L.transmit_interleave_triton_, (z[:, :1], wk, None, sek, embeds.clone(), spk)),
        (L.interleave_triton, (embeds, rnd(batch, num_req, llm), sp)),
        (L.interleave_triton_, (embeds.clone(), rnd(batch, num_req, llm), sp)),
        (L.gather_slots_triton, (embeds, sp)),
    ]


def test_opcheck_every_op():
    seen = set()
    for packet, args in op_cases():
        seen.add(packet._qualified_op_name if hasattr(packet, "_qualified_op_name") else str(packet))
        result = opcheck(packet.default, args)
        assert all(v == "SUCCESS" for v in result.values()), (packet, result)
    assert len(seen) == 13


# The per-slot layer: one request into five slots, as LMEye v1.
PER_SLOT = dict(num_requests=1, num_slots=5, transmission="per_slot")


def make_layers(dtype=torch.float32, attention="auto", **transmission):
    kinds = transmission or dict(num_requests=3)
    layer = InteractiveLayer(40, 24, 32, sub_features=2, num_heads=2, backend="triton", attention=attention,
                             device=DEVICE, dtype=dtype, **kinds)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return layer


def inputs(dtype=torch.float32, num_slots=3):
    batch, seq, length, tokens = 2, 7, 10, 5
    hidden = torch.randn(batch, seq, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    image = torch.randn(batch, tokens, 24, device=DEVICE, dtype=dtype, requires_grad=True)
    embeds = torch.randn(batch, length, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    slot_pos = torch.stack([torch.randperm(length, device=DEVICE)[:num_slots] for _ in range(batch)])
    request_pos = torch.randint(0, seq, (batch,), device=DEVICE)
    mask = torch.rand(batch, tokens, device=DEVICE) > 0.3
    return hidden, image, embeds, slot_pos, request_pos, mask


def compiled_matches_eager(backend, attention, **transmission):
    torch._dynamo.reset()
    layer = make_layers(attention=attention, **transmission)
    hidden, image, embeds, slot_pos, request_pos, mask = inputs(num_slots=layer.num_slots)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    params = list(layer.parameters())
    for inplace in (False, True):
        results = []
        for fn in (layer, compiled):
            target = embeds * 1
            out = fn(hidden, image, target, slot_pos, request_pos=request_pos, image_mask=mask, inplace=inplace)
            if inplace:
                torch.testing.assert_close(target, out, atol=0, rtol=0)
            grad = torch.ones_like(out) + out.detach() * 0.5
            results.append((out.detach(), torch.autograd.grad(out, params + [hidden, image, embeds], grad)))
        (out_e, grads_e), (out_c, grads_c) = results
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)
    tokens_e = layer.transmitted(hidden, image, request_pos=request_pos)
    tokens_c = torch.compile(layer.transmitted, backend=backend, fullgraph=True)(hidden, image, request_pos=request_pos)
    assert tokens_c.shape == (hidden.shape[0], layer.num_slots, 40)
    torch.testing.assert_close(tokens_c, tokens_e, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; the GPU runs the inductor test below")
def test_compile_fullgraph_aot_eager(attention_schedule):
    compiled_matches_eager("aot_eager", attention_schedule)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor over Triton kernels needs a CUDA device")
def test_compile_fullgraph_inductor(attention_schedule):
    compiled_matches_eager("inductor", attention_schedule)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; the GPU runs the inductor test below")
def test_compile_fullgraph_aot_eager_per_slot():
    compiled_matches_eager("aot_eager", "auto", **PER_SLOT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor over Triton kernels needs a CUDA device")
def test_compile_fullgraph_inductor_per_slot():
    compiled_matches_eager("inductor", "auto", **PER_SLOT)


@pytest.mark.parametrize("inplace", [False, True])
def test_compiled_no_grad_interleave_reaches_the_registered_op(inplace):
    """Without gradients a traced interleave calls the registered op directly (no autograd
    Function), in place too: the same values as eager, and the in-place result is the input."""
    from lmeye_fast.ops.interleave import interleave

    torch._dynamo.reset()
    embeds, rows = torch.randn(2, 7, 16, device=DEVICE), torch.randn(2, 3, 16, device=DEVICE)
    slot_pos = torch.stack([torch.randperm(7, device=DEVICE)[:3] for _ in range(2)])
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(lambda e, r: interleave(e, r, slot_pos, inplace=inplace), fullgraph=True, backend=backend)
    eager_in, compiled_in = embeds.clone(), embeds.clone()
    with torch.no_grad():
        expected, got = interleave(eager_in, rows, slot_pos, inplace=inplace), compiled(compiled_in, rows)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(compiled_in, eager_in, atol=0, rtol=0)
    assert torch.equal(compiled_in, got) == inplace
