"""Ways of adding R rows into the slots of an embedding sequence ``E[b, s[b, j]] += t[b, j]``.

=========================  ==========================================================
hf-masked_scatter          the Hugging Face pattern: a boolean mask from the token ids,
                           ``masked_select`` of the slot rows, ``masked_scatter`` of
                           their sums into a new sequence (host sync: not capturable)
index_put-copy (eager)     ``lmeye_fast.reference.interleave``: ``index_put`` on a copy
index_add_-inplace         ``E.view(B*T, D).index_add_(0, flat slot index, t)``
triton-inplace             lmeye_fast's Triton kernel, in place
cuda-inplace               lmeye_fast's CUDA kernel, in place
=========================  ==========================================================

The floor is the in-place task's (read and write the slot rows, read t), the same for all:
a variant that copies the sequence pays for the copy in its % of floor. ``index_put-copy``
is the baseline of ``x_eager``. The ``static-map`` shape writes one row per image token,
as ``StaticVisualMapping`` does.
"""

from __future__ import annotations

import pytest
import torch

import harness

from lmeye_fast import ops, reference

SUITE = "interleave"
SLOT_TOKEN = 32000
VARIANTS = ("hf-masked_scatter", "index_put-copy", "index_add_-inplace", "triton-inplace", "cuda-inplace")


def make_inputs(shape, dev):
    B, T, D, R = shape.B, shape.T, shape.D, shape.R
    start = torch.randint(0, T - R + 1, (B,), device=dev)
    slot_pos = start[:, None] + torch.arange(R, device=dev)  # ascending: the order masked_select reads them in
    input_ids = torch.randint(0, SLOT_TOKEN, (B, T), device=dev)
    input_ids.scatter_(1, slot_pos, SLOT_TOKEN)
    embeds = torch.randn(B, T, D, device=dev, dtype=shape.dtype)
    rows = torch.randn(B, R, D, device=dev, dtype=shape.dtype)
    return input_ids, embeds, rows, slot_pos


def hf_masked_scatter(input_ids, embeds, rows, slot_pos):
    mask = (input_ids == SLOT_TOKEN).unsqueeze(-1).expand_as(embeds)
    summed = embeds.masked_select(mask).view(-1, embeds.shape[-1]).float() + rows.reshape(-1, rows.shape[-1]).float()
    return embeds.masked_scatter(mask, summed.to(embeds.dtype))


def index_put_copy(input_ids, embeds, rows, slot_pos):
    return reference.interleave(embeds, rows, slot_pos, False)


def index_add_inplace(input_ids, embeds, rows, slot_pos):
    batch, length, width = embeds.shape
    flat = (torch.arange(batch, device=embeds.device)[:, None] * length + slot_pos).reshape(-1)
    embeds.view(batch * length, width).index_add_(0, flat, rows.reshape(-1, width))
    return embeds


def kernel(backend):
    def run(input_ids, embeds, rows, slot_pos):
        return ops.get("interleave", backend, embeds.device)(embeds, rows, slot_pos, True)

    return run


@pytest.mark.parametrize("variant", VARIANTS)
def test_interleave(benchmark, ceilings, bench_device, bench_shape, variant):
    dev, shape = bench_device, bench_shape
    provider = variant.split("-")[0]
    if provider in ("triton", "cuda"):
        harness.require(provider, dev, "interleave")
    run = {"hf-masked_scatter": hf_masked_scatter, "index_put-copy": index_put_copy,
           "index_add_-inplace": index_add_inplace}.get(variant) or kernel(provider)
    input_ids, embeds, rows, slot_pos = make_inputs(shape, dev)

    def fn():
        with torch.no_grad():
            return run(input_ids, embeds, rows, slot_pos)

    harness.warm_up(fn, variant, dev)
    with torch.no_grad():
        want = reference.interleave(embeds, rows, slot_pos, False)
        harness.check_close(run(input_ids, embeds.clone(), rows, slot_pos), want, variant)

    n_bytes, flops = shape.op_cost("interleave")
    harness.run_case(benchmark, ceilings, fn, suite=SUITE, case="interleave", provider=variant, shape=shape,
                     n_bytes=n_bytes, flops=flops, capture=variant != "hf-masked_scatter",
                     baseline="eager" if variant == "index_put-copy" else None,
                     inplace=variant.endswith("-inplace"))
