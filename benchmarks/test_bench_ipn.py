"""The whole interactive perception network, forward and forward+backward, per provider.

- ``reference-eager``: ``lmeye_fast.reference.interactive``, the plain-PyTorch chain.
- ``reference-compile``: the same function under ``torch.compile`` (mode="default").
- ``triton`` / ``cuda`` / ``auto``: ``InteractiveLayer(backend=...)``, as a user calls it
  (its argument checks and dispatch included in the wall time).
- ``triton-folded``: the Triton backend with the folded attention schedule, which never forms
  the decomposed features (``lmeye_fast/ops/attend_folded.py``).

Every provider writes the slots in place (``inplace=True``): the IPN adds R rows into a
sequence that the LLM reads next, and a copy of the sequence would dominate. Forward runs
under ``torch.no_grad()`` (inference); forward+backward takes the gradients of every IPN
parameter and of the hidden states (a trainable prefix), the image features and the
embeddings being frozen inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import harness
from harness import PROVIDERS
from shapes import FORWARD, FORWARD_BACKWARD

from lmeye_fast import InteractiveLayer, ops, reference

SUITE = "ipn"
LAYER_OPS = ("request", "attend_decomposed", "transmit_interleave")


def make_layer(shape, backend, dev, attention="auto"):
    layer = InteractiveLayer(shape.D, shape.Dv, shape.Di, shape.R, shape.S, shape.H, backend=backend,
                             attention=attention, device=dev, dtype=shape.dtype)
    with torch.no_grad():
        # A trained layer, not the near-zero initial one: every stage then shapes the output.
        for linear in (layer.request_proj, layer.decompose_proj, layer.transmit_proj):
            linear.weight.normal_(0.0, 1.0 / math.sqrt(linear.in_features))
            linear.bias.normal_(0.0, 0.02)
        layer.slot_embed.normal_(0.0, 0.02)
    return layer


def make_inputs(shape, dev):
    B, T, R = shape.B, shape.T, shape.R
    request_pos = torch.randint(0, T - R, (B,), device=dev)
    return {
        "hidden": torch.randn(B, T, shape.D, device=dev, dtype=shape.dtype),
        "request_pos": request_pos,
        "image": torch.randn(B, shape.N, shape.Dv, device=dev, dtype=shape.dtype),
        "embeds": torch.randn(B, T, shape.D, device=dev, dtype=shape.dtype),
        # The <img-d> slots follow the request token.
        "slot_pos": request_pos[:, None] + 1 + torch.arange(R, device=dev),
    }


def reference_call(layer, x, embeds):
    return reference.interactive(
        x["hidden"], x["request_pos"], x["image"], None, embeds, x["slot_pos"],
        layer.request_proj.weight, layer.request_proj.bias, layer.decompose_proj.weight, layer.decompose_proj.bias,
        layer.transmit_proj.weight, layer.transmit_proj.bias, layer.slot_embed, layer.num_heads,
        layer.sub_features, inplace=True)


def layer_call(layer, x, embeds):
    return layer(x["hidden"], x["image"], embeds, x["slot_pos"], request_pos=x["request_pos"], inplace=True)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", (FORWARD, FORWARD_BACKWARD))
def test_ipn(benchmark, ceilings, bench_device, bench_shape, case, provider):
    dev, shape = bench_device, bench_shape
    if case == FORWARD_BACKWARD and not shape.backward:
        pytest.skip(f"forward+backward runs on the batch sweep only in this shape set, not at {shape.label}")
    harness.require(provider, dev)
    if provider == "reference-compile":
        harness.require_compile(shape, case)
    backend = harness.BACKEND_OF[provider]
    layer = make_layer(shape, backend, dev, harness.attention(provider))
    x = make_inputs(shape, dev)
    base = x["embeds"]

    if provider == "reference-eager":
        call = reference_call
    elif provider == "reference-compile":
        compiled = harness.compile_fn(reference.interactive)

        def call(layer, x, embeds):
            return compiled(
                x["hidden"], x["request_pos"], x["image"], None, embeds, x["slot_pos"],
                layer.request_proj.weight, layer.request_proj.bias, layer.decompose_proj.weight,
                layer.decompose_proj.bias, layer.transmit_proj.weight, layer.transmit_proj.bias, layer.slot_embed,
                layer.num_heads, layer.sub_features, inplace=True)
    else:
        call = layer_call

    if case == FORWARD:
        def fn():
            with torch.no_grad():
                # detach(): a fresh handle on the same storage, so calls never chain through autograd.
                return call(layer, x, base.detach())

        harness.warm_up(fn, provider, dev)
        with torch.no_grad():
            harness.check_close(call(layer, x, base.clone()), reference_call(layer, x, base.clone()),
                                f"{provider} forward")
    else:
        x["hidden"].requires_grad_(True)
        wrt = (x["hidden"],) + tuple(layer.parameters())
        grad_out = torch.randn_like(base)

        def grads(run):
            return torch.autograd.grad(run(layer, x, base.detach()), wrt, grad_out)

        def fn():
            return grads(call)

        harness.warm_up(fn, provider, dev)
        for name, got, want in zip(("hidden",) + tuple(n for n, _ in layer.named_parameters()),
                                   fn(), grads(reference_call)):
            harness.check_close(got, want, f"{provider} gradient of {name}")

    resolved = {op: ops.resolve(op, backend, dev) for op in LAYER_OPS} if backend != "reference" else None
    n_bytes, flops = shape.ipn_cost(case)
    harness.run_case(benchmark, ceilings, fn, suite=SUITE, case=case, provider=provider, shape=shape,
                     n_bytes=n_bytes, flops=flops, resolved=resolved, inplace=True)
