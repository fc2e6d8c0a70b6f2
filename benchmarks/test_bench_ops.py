"""Each dispatched op alone, per provider, forward (under ``torch.no_grad()``).

=====================  ===========================================================
request                step 1: gather the request row, project it to R requests
attend_decomposed      steps 2-3: decomposition fused with the attention
transmit_interleave    steps 4-5: transmission, added into the slots in place
interleave             step 5: rows added into the slots in place
=====================  ===========================================================

Providers: ``reference-eager`` / ``reference-compile`` (the reference function of the op,
eager or under ``torch.compile``), ``triton``, ``triton-folded`` (``attend_decomposed`` in
the folded schedule, which never forms the decomposed features), ``cuda`` (skipped where the
dispatch table has no kernel of that backend for the op) and ``auto``. The two interleaving ops write in
place (``inplace=True``, case names ``...-inplace``): the write into the sequence is the
product, and a copy of the sequence would dominate (benchmarks/test_bench_interleave.py
times the copying variants).
"""

from __future__ import annotations

import math

import pytest
import torch

import harness
from harness import PROVIDERS
from shapes import OPS

from lmeye_fast import ops

SUITE = "ops"
IN_PLACE = ("transmit_interleave", "interleave")


def make_args(op, shape, dev):
    """The op's arguments, in the order of its reference signature (random, like a trained layer's)."""
    B, T, D, Dv, N, Di, R = shape.B, shape.T, shape.D, shape.Dv, shape.N, shape.Di, shape.R

    def rand(*size, std=1.0):
        return torch.randn(*size, device=dev, dtype=shape.dtype) * std

    request_pos = torch.randint(0, T - R, (B,), device=dev)
    slot_pos = request_pos[:, None] + 1 + torch.arange(R, device=dev)
    if op == "request":
        return [rand(B, T, D), request_pos, rand(R * Di, D, std=1 / math.sqrt(D)), rand(R * Di, std=0.02), R]
    if op == "attend_decomposed":
        return [rand(B, R, Di), rand(B, N, Dv), None, rand(shape.S * Di, Dv, std=1 / math.sqrt(Dv)),
                rand(shape.S * Di, std=0.02), shape.H, shape.S]
    if op == "transmit_interleave":
        return [rand(B, R, Di), rand(D, Di, std=1 / math.sqrt(Di)), rand(D, std=0.02), rand(R, D, std=0.02),
                rand(B, T, D), slot_pos, True]
    if op == "interleave":
        return [rand(B, T, D), rand(B, R, D), slot_pos, True]
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def embeds_index(op):
    return {"transmit_interleave": 4, "interleave": 0}.get(op)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, ceilings, bench_device, bench_shape, op, provider):
    dev, shape = bench_device, bench_shape
    backend = harness.BACKEND_OF[provider]
    harness.require(provider, dev, op if backend in ("triton", "cuda") else None)
    if provider == "reference-compile":
        harness.require_compile(shape, op)
    args = make_args(op, shape, dev)
    if op == "attend_decomposed":
        args.append(harness.attention(provider))
    ref_fn = ops.get(op, "reference", dev)
    fn_op = ops.get(op, backend, dev)
    if provider == "reference-compile":
        fn_op = harness.compile_fn(fn_op)
    slot = embeds_index(op)

    def with_embeds(embeds):
        return args if slot is None else args[:slot] + [embeds] + args[slot + 1:]

    def fn():
        with torch.no_grad():
            # detach(): a fresh handle on the same storage. The in-place add repeats on it:
            # the values drift, the timing does not.
            return fn_op(*with_embeds(None if slot is None else args[slot].detach()))

    harness.warm_up(fn, provider, dev)
    with torch.no_grad():
        fresh = None if slot is None else args[slot].clone()
        got = fn_op(*with_embeds(fresh))
        want = ref_fn(*with_embeds(None if fresh is None else args[slot].clone()))
    harness.check_close(got, want, f"{provider} {op}")

    n_bytes, flops = shape.op_cost(op)
    harness.run_case(benchmark, ceilings, fn, suite=SUITE, case=op + ("-inplace" if op in IN_PLACE else ""),
                     provider=provider, shape=shape, n_bytes=n_bytes, flops=flops,
                     resolved=ops.resolve(op, backend, dev), inplace=op in IN_PLACE)
