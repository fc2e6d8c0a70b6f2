"""Property tests: random shapes (empty ones included), masks with all-masked rows, strided
inputs and positions, 2 000 examples per run in all.

- the whole reference IPN in float32 against its float64 run: 1 500 examples;
- the Triton interleave (interpreter on the CPU) against the reference, positions outside the
  sequence included: 300 examples;
- the Triton request (row gather fused into the GEMM) against the reference: 200 examples.

Tolerance: 1e-4 times the largest magnitude of the float64 result (float32 accumulation
over at most a few hundred terms); the interleave is exact (one fp32 add, one rounding).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmeye_fast import backends, reference  # noqa: E402

TRITON, WHY = backends.status("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = dict(deadline=None, derandomize=False, suppress_health_check=[HealthCheck.too_slow])


def close(got, want64, what):
    scale = max(1.0, want64.abs().max().item()) if want64.numel() else 1.0
    err = (got.double() - want64).abs().max().item() if got.numel() else 0.0
    assert err <= 1e-4 * scale, f"{what}: error {err:.3g} against the float64 run (scale {scale:.3g})"


def maybe_strided(tensor, strided):
    """The same values, laid out with the last two dimensions swapped in memory."""
    return tensor.transpose(-1, -2).contiguous().transpose(-1, -2) if strided else tensor


@st.composite
def ipn_case(draw):
    batch = draw(st.integers(0, 3))
    length, tokens = draw(st.integers(1, 12)), draw(st.integers(0, 6))
    llm, vision = draw(st.integers(1, 40)), draw(st.integers(1, 20))
    heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    subs, requests = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    strided = draw(st.booleans())
    masked = draw(st.sampled_from(["none", "random", "all"]))
    return batch, length, tokens, llm, vision, heads, head_dim, subs, requests, seed, strided, masked


@settings(max_examples=1500, **SETTINGS)
@given(ipn_case())
def test_reference_ipn_float32_matches_float64(case):
    batch, length, tokens, llm, vision, heads, head_dim, subs, requests, seed, strided, masked = case
    gen = torch.Generator().manual_seed(seed)
    width = heads * head_dim

    def draw(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    hidden, image = maybe_strided(draw(batch, length, llm), strided), draw(batch, tokens, vision)
    embeds = draw(batch, length + requests, llm)
    w_q, b_q = draw(requests * width, llm, scale=llm ** -0.5), draw(requests * width)
    w_f, b_f = draw(subs * width, vision, scale=vision ** -0.5), draw(subs * width)
    w_o, b_o = draw(llm, width, scale=width ** -0.5), draw(llm)
    slot_embed = draw(requests, llm)
    mask = None
    if masked != "none":
        mask = torch.rand(batch, tokens, generator=gen) > 0.5 if masked == "random" else \
            torch.zeros(batch, tokens, dtype=torch.bool)
    request_pos = torch.randint(0, length, (batch,), generator=gen)
    slot_pos = torch.stack([torch.randperm(length + requests, generator=gen)[:requests] for _ in range(batch)]) \
        if batch else torch.zeros(0, requests, dtype=torch.long)
    args64 = (hidden, request_pos, image, mask, embeds, slot_pos, w_q, b_q, w_f, b_f, w_o, b_o, slot_embed)
    want = reference.interactive(*args64, heads, subs)
    args32 = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args64)
    got = reference.interactive(*args32, heads, subs)
    assert got.shape == want.shape == embeds.shape
    close(got, want, "reference float32")


needs_triton = pytest.mark.skipif(not TRITON, reason=f"triton backend unavailable: {WHY}")


@st.composite
def interleave_case(draw):
    batch, length, width = draw(st.integers(0, 3)), draw(st.integers(1, 10)), draw(st.integers(1, 70))
    slots = draw(st.integers(1, min(length, 4)))
    out_of_range = draw(st.booleans())
    return batch, length, width, slots, out_of_range, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@needs_triton
@settings(max_examples=300, **SETTINGS)
@given(interleave_case())
def test_triton_interleave_matches_the_reference(case):
    from lmeye_fast.ops.interleave import interleave

    batch, length, width, slots, out_of_range, strided, seed = case
    gen = torch.Generator().manual_seed(seed)
    embeds = maybe_strided(torch.randn(batch, length, width, generator=gen), strided).to(DEVICE)
    rows = torch.randn(batch, slots, width, generator=gen).to(DEVICE)
    pos = torch.stack([torch.randperm(length, generator=gen)[:slots] for _ in range(batch)]) if batch else \
        torch.zeros(0, slots, dtype=torch.long)
    if out_of_range and batch:
        pos[0, 0] = -1 if seed % 2 else length + seed % 5
    pos = pos.to(DEVICE)
    assert torch.equal(interleave(embeds, rows, pos), reference.interleave(embeds, rows, pos))


@st.composite
def request_case(draw):
    return (draw(st.integers(0, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 50)), draw(st.integers(1, 4)),
            draw(st.integers(1, 12)), draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@needs_triton
@settings(max_examples=200, **SETTINGS)
@given(request_case())
def test_triton_request_matches_the_reference(case):
    from lmeye_fast.ops.request import request

    batch, length, llm, requests, width, bias, strided, seed = case
    gen = torch.Generator().manual_seed(seed)
    hidden = maybe_strided(torch.randn(batch, length, llm, generator=gen, dtype=torch.float64), strided)
    w_q = torch.randn(requests * width, llm, generator=gen, dtype=torch.float64) * llm ** -0.5
    b_q = torch.randn(requests * width, generator=gen, dtype=torch.float64) if bias else None
    pos = torch.randint(0, length, (batch,), generator=gen)
    want = reference.request(hidden, pos, w_q, b_q, requests)
    to32 = (lambda t: None if t is None else t.float().to(DEVICE))
    got = request(to32(hidden), pos.to(DEVICE), to32(w_q), to32(b_q), requests)
    close(got.cpu(), want, "triton request")
