"""Parity of the Triton ops with lmeye_fast.reference, forward and every gradient.

Without a GPU the kernels run through the Triton interpreter (set below,
before triton is imported), so shapes stay small and odd; bfloat16 (broken in
the interpreter) runs only on a CUDA device, skipped here with that reason.

Tolerance, for the output and every gradient: the rule of tests/tolerance.py
(inputs drawn in the low dtype; 2x the error of the reference run in that dtype
against float64, plus a floor). The gradient of the embedding sequence is a
pass-through and must equal the upstream gradient exactly.
"""

import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmeye_fast import backends, ops, reference  # noqa: E402
from tolerance import assert_close  # noqa: E402

ok, why = backends.status("triton")
pytestmark = pytest.mark.skipif(not ok, reason=f"triton backend unavailable: {why}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter cannot dot bfloat16, so bfloat16 runs on a GPU only; every other piece (the backward's
# dense products included: torch.mm on both) takes the same path under the interpreter as on a GPU.
DTYPES = (torch.float32, torch.float16,
          pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.skipif(
              not torch.cuda.is_available(), reason="the Triton interpreter cannot dot bfloat16 (GPU only)")))


def leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale).to(dtype).requires_grad_()


def as64(tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) if t is not None and t.is_floating_point() else t
            for t in tensors]


def grads(out, inputs, grad):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return list(torch.autograd.grad(out, wanted, grad))


def compare(fn_kernel, fn_ref, inputs, dtype, names, exact=()):
    """Run kernel and reference (float64 and ``dtype``), compare outputs and all input gradients; the
    gradients of the inputs named in ``exact`` (pass-throughs) must equal the float64 reference's exactly."""
    low = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point()
           else t for t in inputs]
    out = fn_kernel(*inputs)
    ref_low_out = fn_ref(*low)
    ins64 = as64(inputs)
    ref64_out = fn_ref(*ins64)
    assert_close("output", out, ref64_out, ref_low_out, dtype)
    grad = torch.randn_like(ref64_out).to(dtype)
    g_kernel = grads(out, inputs, grad)
    g_low = grads(ref_low_out, low, grad)
    g64 = grads(ref64_out, ins64, grad.double())
    labels = [n for n, t in zip(names, inputs) if t is not None and isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(labels) == len(g_kernel) == len(g64) == len(g_low)
    assert set(exact) <= set(labels), (exact, labels)
    for label, a, b, c in zip(labels, g_kernel, g64, g_low):
        if label in exact:
            assert a.dtype == dtype and torch.equal(a.double(), b), f"d {label}: not the upstream gradient exactly"
        else:
            assert_close(f"d {label}", a, b, c, dtype)


def noncontig(t):
    """The same values through a transposed, strided view (a leaf whose grad lands on the base)."""
    base = t.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(t.requires_grad)
    assert not base.is_contiguous() or base.dim() < 2 or min(base.shape) == 1
    return base


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_req,width,llm,pos_dtype", [(1, 16, 37, torch.int64), (5, 20, 37, torch.int32),
                                                         (16, 8, 19, torch.int64)])
def test_request(dtype, num_req, width, llm, pos_dtype):
    from lmeye_fast.ops.request import request

    batch, seq = 3, 7
    hidden = leaf(batch, seq, llm, dtype=dtype)
    pos = torch.randint(0, seq, (batch,), device=DEVICE, dtype=pos_dtype)
    w = leaf(num_req * width, llm, dtype=dtype, scale=llm ** -0.5)
    b = leaf(num_req * width, dtype=dtype)
    compare(lambda h, q, w_, b_: request(h, q, w_, b_, num_req),
            lambda h, q, w_, b_: reference.request(h, q, w_, b_, num_req),
            [hidden, pos, w, b], dtype, ["hidden", "request_pos", "w_q", "b_q"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_request_vectors_noncontiguous_no_bias(dtype):
    from lmeye_fast.ops.request import request

    batch, llm, num_req, width = 3, 40, 3, 24
    hidden = noncontig(leaf(batch, llm, dtype=dtype))
    w = noncontig(leaf(num_req * width, llm, dtype=dtype, scale=llm ** -0.5))
    assert not hidden.is_contiguous() and not w.is_contiguous()
    compare(lambda h, w_: request(h, None, w_, None, num_req),
            lambda h, w_: reference.request(h, None, w_, None, num_req),
            [hidden, w], dtype, ["hidden", "w_q"])


def test_request_frozen_hidden_gets_no_gradient_and_the_weights_still_match():
    """A frozen prefix: the hidden states need no gradient, so the backward neither zeroes a (B, T, D)
    gradient nor fills its rows (the op hands back an empty tensor); d W_q and d b_q still match."""
    from lmeye_fast.ops.request import request, request_bwd

    hidden = leaf(3, 6, 20, dtype=torch.float32).detach()
    pos = torch.randint(0, 6, (3,), device=DEVICE)
    w, b = leaf(2 * 8, 20, dtype=torch.float32), leaf(2 * 8, dtype=torch.float32)
    compare(lambda h, q, w_, b_: request(h, q, w_, b_, 2), lambda h, q, w_, b_: reference.request(h, q, w_, b_, 2),
            [hidden, pos, w, b], torch.float32, ["hidden", "request_pos", "w_q", "b_q"])
    grad = torch.randn(3, 16, device=DEVICE)
    full, part = request_bwd(grad, hidden, pos, w), request_bwd(grad, hidden, pos, w, False)
    assert full[0].shape == hidden.shape and part[0].numel() == 0
    assert torch.equal(full[1], part[1]) and torch.equal(full[2], part[2])


def test_request_hidden_grad_only_in_request_rows():
    from lmeye_fast.ops.request import request

    hidden = leaf(2, 6, 16, dtype=torch.float32)
    pos = torch.tensor([4, 0], device=DEVICE)
    w = leaf(32, 16, dtype=torch.float32)
    request(hidden, pos, w, None, 2).sum().backward()
    keep = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    keep[0, 4] = keep[1, 0] = True
    assert (hidden.grad[~keep] == 0).all() and (hidden.grad[keep] != 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_request_out_of_range_positions_read_and_write_nothing(dtype, pos_dtype):
    """The op does not check position values (a host sync; see lmeye_fast.checks): the GEMM treats a request row
    whose position lies outside [0, T) as absent (triton_launch): never read, so it acts as a zero row (the
    request is b_q exactly) and gets no gradient, and it is never written. hidden here is a view into a buffer
    whose rows just outside each sequence are NaN, so any read there would show; a write at an out-of-range
    position of a middle row would land in a neighbouring row of d hidden, which must stay zero."""
    from lmeye_fast import InteractiveLayer
    from lmeye_fast.ops.request import request

    batch, seq, llm, num_req, width, pad = 4, 7, 19, 3, 8, 2
    base = torch.full((batch, seq + 2 * pad, llm), float("nan"), dtype=dtype, device=DEVICE)
    base[:, pad:pad + seq] = torch.randn(batch, seq, llm, dtype=torch.float64, device=DEVICE).to(dtype)
    hidden = base[:, pad:pad + seq].detach().requires_grad_()  # a leaf viewing the guarded buffer
    assert hidden.data_ptr() == base[:, pad:].data_ptr() and not hidden.is_contiguous()
    # Row 0 below the sequence, row 1 past its end (a stray write would hit d hidden[2, 0]), row 2 valid,
    # row 3 below it (a stray write would hit d hidden[2, seq - 2]).
    pos = torch.tensor([-1, seq, 3, -pad], device=DEVICE, dtype=pos_dtype)
    valid = (pos >= 0) & (pos < seq)
    w = leaf(num_req * width, llm, dtype=dtype, scale=llm ** -0.5)
    b = leaf(num_req * width, dtype=dtype)

    def present_rows(h):
        """hidden[b, pos[b]] where the position is valid, a zero row where it is not."""
        rows = h[torch.arange(batch, device=DEVICE), pos.long().clamp(0, seq - 1)]
        return rows * valid[:, None].to(rows.dtype)

    compare(lambda h, w_, b_: request(h, pos, w_, b_, num_req),
            lambda h, w_, b_: reference.request(present_rows(h), None, w_, b_, num_req),
            [hidden, w, b], dtype, ["hidden", "w_q", "b_q"])

    out = request(hidden, pos, w, b, num_req)
    assert torch.isfinite(out).all()
    assert torch.equal(out[~valid], b.detach().view(1, num_req, width).expand(int((~valid).sum()), -1, -1))
    with torch.no_grad():
        assert torch.equal(request(hidden, pos, w, b, num_req), out.detach())
    d_hidden, d_w = torch.autograd.grad(out, [hidden, w], torch.randn_like(out))
    assert torch.isfinite(d_w).all()
    keep = torch.zeros(batch, seq, dtype=torch.bool, device=DEVICE)
    keep[2, 3] = True
    assert (d_hidden[~keep] == 0).all() and (d_hidden[keep] != 0).any()

    # The layer checks the values only when asked to (validate=True), naming the argument.
    layer = InteractiveLayer(llm, 5, 6, 2, num_heads=2, backend="triton", device=DEVICE, dtype=dtype)
    args = (hidden.detach(), torch.randn(batch, 3, 5, device=DEVICE, dtype=dtype),
            torch.randn(batch, 4, llm, device=DEVICE, dtype=dtype), torch.tensor([[0, 1]] * batch, device=DEVICE))
    with pytest.raises(ValueError, match="request_pos"):
        layer(*args, request_pos=pos, validate=True)


ATTEND_CASES = [
    # batch, R, Di, N, Dv, S, H, mask
    (2, 3, 24, 5, 20, 2, 2, True),
    (1, 1, 16, 1, 16, 1, 1, False),
    (2, 16, 32, 37, 12, 1, 4, True),
    (1, 5, 48, 3, 33, 3, 3, False),
    (2, 2, 72, 4, 20, 2, 1, True),  # one head wider than the split kernels take: folded in every variant
]


# Kernel variants: the schedule (the ``schedule`` argument) with the split schedule's tile options, F
# materialized or formed on chip, in the forward and the backward, and 1, 2 or 4 heads per program. A
# forward that materializes F hands it to the backward; one that forms it on chip leaves the backward to
# form F again, materialized or on chip. The folded schedule (ops/attend_folded.py) never forms F.
ATTEND_VARIANTS = {"split-h1": ("materialized", "materialized", 1, "split"),
                   "on-chip-h2": ("on_chip", "on_chip", 2, "split"),
                   "split-h4": ("materialized", "materialized", 4, "split"),
                   "on-chip-fwd-h1": ("on_chip", "materialized", 1, "split"),
                   "folded": (None, None, None, "folded")}


def attend_schedule(variant):
    forward, backward, heads, name = ATTEND_VARIANTS[variant]
    return ops.AttentionSchedule(name, forward_features=forward, backward_features=backward, heads_per_program=heads)


def attend_with(variant):
    """``attend_decomposed`` with the variant's schedule."""
    from lmeye_fast.ops.attend import attend_decomposed

    return functools.partial(attend_decomposed, schedule=attend_schedule(variant))


def op_options(variant, direction):
    """The registered split ops' tile options of the variant, for ``direction`` "forward" or "backward"."""
    forward, backward, heads, _ = ATTEND_VARIANTS[variant]
    features = forward if direction == "forward" else backward
    return dict(materialized=features == "materialized", heads_per_program=heads)


@pytest.fixture(params=list(ATTEND_VARIANTS))
def attend_variant(request):
    return request.param, attend_with(request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTEND_CASES, ids=lambda c: "B{}R{}Di{}N{}Dv{}S{}H{}m{}".format(*c))
def test_attend_decomposed(dtype, case, attend_variant):
    _, attend_decomposed = attend_variant

    batch, num_req, width, tokens, vision, subs, heads, masked = case
    r = leaf(batch, num_req, width, dtype=dtype)
    x = leaf(batch, tokens, vision, dtype=dtype)
    w = leaf(subs * width, vision, dtype=dtype, scale=vision ** -0.5)
    b = leaf(subs * width, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(batch, tokens, device=DEVICE) > 0.4
        mask[0] = False  # a row with every image token masked gets z = r
        if batch > 1:
            mask[1, 0] = True
    compare(lambda *a: attend_decomposed(*a, heads, subs), lambda *a: reference.attend_decomposed(*a, heads, subs),
            [r, x, mask, w, b], dtype, ["requests", "image", "image_mask", "w_f", "b_f"])


def test_attend_all_masked_is_residual_and_noncontiguous(attend_variant):
    _, attend_decomposed = attend_variant

    r = noncontig(leaf(2, 3, 16, dtype=torch.float32))
    x = noncontig(leaf(2, 4, 18, dtype=torch.float32))
    # Weights at a trained layer's scale, as in the other attention tests. With unit weights the
    # scores reach +-20, and on a row that is one-hot to 1e-5 the softmax backward carries an
    # error of order eps * |dA| in every fp32 implementation, the reference included; the rule
    # compares with one sample of the reference's error, which can be far below its usual size,
    # and the folded schedule failed it in one seed of 55 (its PyTorch fp32 emulation gives the
    # same error: the algorithm's rounding, not the kernel).
    w = leaf(32, 18, dtype=torch.float32, scale=18 ** -0.5)
    mask = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    mask[1, 2] = True
    z = attend_decomposed(r, x, mask, w, None, 2, 2)
    assert torch.equal(z[0], r[0].detach())
    compare(lambda *a: attend_decomposed(*a, 2, 2), lambda *a: reference.attend_decomposed(*a, 2, 2),
            [r, x, mask, w, None], torch.float32, ["requests", "image", "image_mask", "w_f", "b_f"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attend_results_do_not_depend_on_the_image_layout(dtype, attend_variant):
    """The same values in a non-contiguous image give the same bits, output and gradients: the
    schedules take F = X W_fᵀ + b_f rounded once whatever the strides (a 3-D ``F.linear`` on a
    non-contiguous half-precision input rounds the product before adding the bias)."""
    _, attend_decomposed = attend_variant
    r = leaf(2, 3, 16, dtype=dtype)
    x = leaf(2, 33, 11, dtype=dtype)
    w, b = leaf(32, 11, dtype=dtype, scale=11 ** -0.5), leaf(32, dtype=dtype)
    x_strided = noncontig(x.detach()).requires_grad_()
    assert not x_strided.is_contiguous() and torch.equal(x_strided, x)
    grad = torch.randn(2, 3, 16, device=DEVICE).to(dtype)
    results = []
    for image in (x, x_strided):
        z = attend_decomposed(r, image, None, w, b, 2, 2)
        results.append([z, *torch.autograd.grad(z, [r, image, w, b], grad)])
    for name, got, want in zip(["output", "d requests", "d image", "d w_f", "d b_f"], *results):
        assert torch.equal(got, want), f"{name}: differs with a non-contiguous image"


def test_attend_frozen_image_gets_no_gradient_and_the_rest_still_match(attend_variant):
    """Image features from a frozen vision encoder need no gradient: the backward skips it (the
    op hands back an empty tensor) and every other gradient still matches the reference."""
    from lmeye_fast.ops import attend, attend_folded
    variant, attend_decomposed = attend_variant

    r, w, b = leaf(2, 3, 16, dtype=torch.float32), leaf(32, 12, dtype=torch.float32), leaf(32, dtype=torch.float32)
    x = leaf(2, 7, 12, dtype=torch.float32).detach()
    mask = torch.rand(2, 7, device=DEVICE) > 0.3
    compare(lambda *a: attend_decomposed(*a, 2, 2), lambda *a: reference.attend_decomposed(*a, 2, 2),
            [r, x, mask, w, b], torch.float32, ["requests", "image", "image_mask", "w_f", "b_f"])
    grad = torch.randn(2, 3, 16, device=DEVICE)
    if variant == "folded":
        _, probs, q, u, sums = attend_folded.attend_folded_fwd(r, x, mask, w, b, 2, 2)
        full = attend_folded.attend_folded_bwd(grad, r, x, w, b, probs, q, u, sums, 2, 2)
        part = attend_folded.attend_folded_bwd(grad, r, x, w, b, probs, q, u, sums, 2, 2, False)
    else:
        _, lse, feats = attend.attend_fwd(r, x, mask, w, b, 2, 2, **op_options(variant, "forward"))
        backward = op_options(variant, "backward")
        full = attend.attend_bwd(grad, r, x, mask, w, b, lse, feats, 2, 2, **backward)
        part = attend.attend_bwd(grad, r, x, mask, w, b, lse, feats, 2, 2, False, **backward)
    assert full[1].shape == x.shape and part[1].numel() == 0
    for i in (0, 2, 3):
        assert torch.equal(full[i], part[i])


def test_attend_no_grad_forward_equals_the_autograd_forward(attend_variant):
    """Without gradients the forward runs from its cached launch plan outside autograd: the same
    kernels, so the same bits."""
    _, attend_decomposed = attend_variant

    r, x = leaf(2, 3, 16, dtype=torch.float32), leaf(2, 7, 12, dtype=torch.float32)
    w, b = leaf(32, 12, dtype=torch.float32), leaf(32, dtype=torch.float32)
    mask = torch.rand(2, 7, device=DEVICE) > 0.3
    with_grad = attend_decomposed(r, x, mask, w, b, 2, 2)
    with torch.no_grad():
        for _ in range(2):  # the second call takes the cached plan
            assert torch.equal(attend_decomposed(r, x, mask, w, b, 2, 2), with_grad.detach())


def test_attend_sharp_softmax_within_the_spread_of_fp32_implementations(attend_variant):
    """Scores of +-20 make rows one-hot to 1e-5, where the fp32 softmax backward carries an error of
    order eps * |dA| in any implementation; one sample of the reference's error can be far below
    that. Here the bound takes the larger error of two correct fp32 implementations (the reference in
    both its associations: F formed, and folded), so a kernel several times worse than both still fails
    (as the split backward did when it took delta from the forward's output: 10-37x)."""
    variant, attend_decomposed = attend_variant

    r = leaf(3, 4, 16, dtype=torch.float32)
    x = leaf(3, 5, 18, dtype=torch.float32)
    w, b = leaf(32, 18, dtype=torch.float32), leaf(32, dtype=torch.float32)
    mask = torch.rand(3, 5, device=DEVICE) > 0.5
    mask[:, 0] = True
    args = [r, x, mask, w, b]
    grad = torch.randn(3, 4, 16, device=DEVICE)

    def run(fn, tensors):
        out = fn(*tensors, 2, 2)
        wanted = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
        return [out] + list(torch.autograd.grad(out, wanted, grad.to(out.dtype)))

    exact = run(reference.attend_decomposed, as64(args))
    got = run(attend_decomposed, args)
    ref32 = run(reference.attend_decomposed, [t.detach().clone().requires_grad_() if t.is_floating_point() else t
                                        for t in args])
    alt32 = run(functools.partial(reference.attend_decomposed, schedule="folded"),
                [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in args])
    for name, g, e, a, c in zip(["z", "d requests", "d image", "d w_f", "d b_f"], got, exact, ref32, alt32):
        spread = max((a.double() - e).abs().max().item(), (c.double() - e).abs().max().item())
        err = (g.double() - e).abs().max().item()
        limit = 2 * spread + 2.0 ** -18 * e.abs().max().item()
        assert err <= limit, f"{name}: max error {err:.3e} > {limit:.3e} (fp32 implementations: {spread:.3e})"


@pytest.mark.parametrize("variant,expected", [("split-h1", 1), ("on-chip-fwd-h1", 1), ("on-chip-h2", 0),
                                              ("folded", 0)])
def test_attend_backward_forms_f_at_most_once(variant, expected, monkeypatch):
    """A split forward hands its F to the backward, which must not run the decomposition GEMM again."""
    from lmeye_fast.ops import attend

    calls = []
    features = attend._features
    monkeypatch.setattr(attend, "_features", lambda *a: calls.append(1) or features(*a))
    r = leaf(2, 3, 16, dtype=torch.float32)
    x = leaf(2, 5, 12, dtype=torch.float32)
    w = leaf(16, 12, dtype=torch.float32)
    attend_with(variant)(r, x, None, w, None, 2, 1).sum().backward()
    assert len(calls) == expected
    assert r.grad is not None and x.grad is not None and w.grad is not None


def test_heads_too_wide_for_the_split_kernels_take_the_folded_schedule(monkeypatch):
    """The split kernels hold a head group's whole width on chip (a 768-wide head asked for 270 KB of
    shared memory on sm_90); wider heads run the folded schedule, which tiles it, and narrower groups
    are capped at the same width."""
    from lmeye_fast.ops import attend

    calls = []
    features = attend._features
    monkeypatch.setattr(attend, "_features", lambda *a: calls.append(1) or features(*a))
    cap = attend.MAX_HEAD_GROUP_WIDTH
    assert attend.folds(cap + 1) and not attend.folds(cap)
    assert attend.attend_blocks(5, cap // 2, 12, "attend_fwd", True, 4)[1] == 2  # 4 heads asked, 2 fit
    assert attend.attend_blocks(5, cap, 12, "attend_fwd", True, 4)[1] == 1
    r = leaf(2, 3, 160, dtype=torch.float32)
    x = leaf(2, 5, 12, dtype=torch.float32)
    w = leaf(160, 12, dtype=torch.float32)
    out = attend_with("split-h4")(r, x, None, w, None, 1, 1)
    out.sum().backward()
    assert not calls, "the split schedule formed F for a head it cannot hold"
    want = reference.attend_decomposed(r.detach(), x.detach(), None, w.detach(), None, 1, 1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_attend_bwd_takes_the_forwards_f_and_refuses_another():
    """The registered ops compose: F from a forward that materialized it (or the empty tensor of one that
    formed it on chip) feeds the
    backward, whose gradients equal those of a backward that forms F again; an F of another shape is refused."""
    from lmeye_fast.ops import attend

    r, x = leaf(2, 3, 16, dtype=torch.float32), leaf(2, 5, 12, dtype=torch.float32)
    w, b = leaf(32, 12, dtype=torch.float32), leaf(32, dtype=torch.float32)
    grad = torch.randn(2, 3, 16, device=DEVICE)
    _, lse, feats = attend.attend_fwd(r, x, None, w, b, 2, 2)
    assert feats.shape == (2, 5, 32)
    kept = attend.attend_bwd(grad, r, x, None, w, b, lse, feats, 2, 2)
    formed = attend.attend_bwd(grad, r, x, None, w, b, lse, None, 2, 2)
    empty = attend.attend_bwd(grad, r, x, None, w, b, lse, x.new_empty((0,)), 2, 2)
    for a, c, e in zip(kept, formed, empty):
        assert torch.equal(a, c) and torch.equal(a, e)
    with pytest.raises(ValueError, match="features"):
        attend.attend_bwd(grad, r, x, None, w, b, lse, feats[:, :4], 2, 2)


def test_tile_options_are_per_call_and_the_old_launch_config_keys_still_work_with_a_warning(monkeypatch):
    """Two schedules with different tile options run side by side (each its own launch plan, no process
    state); a launch config's SPLIT / HEADS, the old process-wide switch, is deprecated but still
    decides what a schedule leaves unset."""
    from lmeye_fast.ops import attend
    from lmeye_fast.ops.triton_launch import CONFIGS, set_config

    calls = []
    features = attend._features
    monkeypatch.setattr(attend, "_features", lambda *a: calls.append(1) or features(*a))
    r, x = leaf(2, 3, 16, dtype=torch.float32), leaf(2, 5, 12, dtype=torch.float32)
    w = leaf(32, 12, dtype=torch.float32)
    want = reference.attend_decomposed(r.detach(), x.detach(), None, w.detach(), None, 2, 2)
    with torch.no_grad():
        for variant, formed in (("on-chip-h2", 0), ("split-h1", 1), ("on-chip-h2", 0)):
            calls.clear()
            torch.testing.assert_close(attend_with(variant)(r, x, None, w, None, 2, 2), want, rtol=1e-4, atol=1e-4)
            assert len(calls) == formed, variant
        saved = dict(CONFIGS["attend_fwd"])
        try:
            with pytest.warns(DeprecationWarning, match="AttentionSchedule"):
                set_config("attend_fwd", {**saved, "SPLIT": 0})
            calls.clear()
            attend.attend_decomposed(r, x, None, w, None, 2, 2, "split")
            assert not calls
            calls.clear()
            attend.attend_decomposed(r, x, None, w, None, 2, 2, attend_schedule("split-h1"))
            assert len(calls) == 1
        finally:
            set_config("attend_fwd", saved)
    for bad in (ops.AttentionSchedule("split", forward_features="fused"), ops.AttentionSchedule("split", None, None, 0),
                "fused"):
        with pytest.raises(ValueError, match="attention"):
            attend.attend_decomposed(r, x, None, w, None, 2, 2, bad)


def test_attend_folded_bwd_refuses_tensors_not_from_its_forward():
    """The folded backward op takes the forward op's saved tensors; one of another shape, dtype or
    layout is refused with an error naming it, before any kernel runs."""
    from lmeye_fast.ops import attend_folded

    r, x = leaf(2, 3, 16, dtype=torch.float32), leaf(2, 5, 12, dtype=torch.float32)
    w, b = leaf(32, 12, dtype=torch.float32), leaf(32, dtype=torch.float32)
    grad = torch.randn(2, 3, 16, device=DEVICE)
    _, probs, q, u, sums = attend_folded.attend_folded_fwd(r, x, None, w, b, 2, 2)
    attend_folded.attend_folded_bwd(grad, r, x, w, b, probs, q, u, sums, 2, 2)
    bad = {"q": q[:, :-1], "u": u.transpose(1, 2).contiguous().transpose(1, 2), "probs": probs.half(),
           "sums": sums[:1]}
    for name, wrong in bad.items():
        saved = {**dict(probs=probs, q=q, u=u, sums=sums), name: wrong}
        with pytest.raises(ValueError, match=name):
            attend_folded.attend_folded_bwd(grad, r, x, w, b, saved["probs"], saved["q"], saved["u"],
                                            saved["sums"], 2, 2)


def slots(batch, num_slots, length):
    return torch.stack([torch.randperm(length, device=DEVICE)[:num_slots] for _ in range(batch)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,slot", [(True, True), (False, False)])
def test_transmit(dtype, bias, slot):
    from lmeye_fast.ops.transmit import transmit

    batch, num_req, width, llm = 3, 5, 24, 45
    z = noncontig(leaf(batch, num_req, width, dtype=dtype))
    w = leaf(llm, width, dtype=dtype, scale=width ** -0.5)
    b = leaf(llm, dtype=dtype) if bias else None
    e = leaf(num_req, llm, dtype=dtype) if slot else None
    compare(transmit, reference.transmit, [z, w, b, e], dtype, ["z", "w_o", "b_o", "slot_embed"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_transmit_interleave(dtype, inplace):
    from lmeye_fast.ops.transmit import transmit_interleave

    batch, num_req, width, llm, length = 3, 4, 20, 37, 11
    z = leaf(batch, num_req, width, dtype=dtype)
    w = leaf(llm, width, dtype=dtype, scale=width ** -0.5)
    b = leaf(llm, dtype=dtype)
    e = leaf(num_req, llm, dtype=dtype)
    embeds = noncontig(leaf(batch, length, llm, dtype=dtype))
    pos = slots(batch, num_req, length)
    before = embeds.detach().clone()

    def kernel(z_, w_, b_, e_, E):
        target = E * 1 if inplace else E  # in place needs a non-leaf; the gradient reaches E through it
        out = transmit_interleave(z_, w_, b_, e_, target, pos, inplace)
        assert (out is target) == inplace
        return out

    def ref(z_, w_, b_, e_, E):
        return reference.transmit_interleave(z_, w_, b_, e_, E, pos, False)

    compare(kernel, ref, [z, w, b, e, embeds], dtype, ["z", "w_o", "b_o", "slot_embed", "embeds"], exact=["embeds"])
    assert torch.equal(embeds.detach(), before)


# The per-slot transmission, (R requests, K slots): one request into five slots (LMEye v1), two into
# six, as many slots as requests, one into one.
PER_SLOT = [(1, 5), (2, 6), (3, 3), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_req,num_slots", PER_SLOT)
@pytest.mark.parametrize("bias,slot", [(True, True), (False, False), (True, False)])
def test_transmit_per_slot(dtype, num_req, num_slots, bias, slot):
    """Slot j through its own (D, Di) matrix from request j // (K/R); z and the (K, D, Di) weight as
    non-contiguous views (the weight's slot rows then are no single stride)."""
    from lmeye_fast.ops.transmit import transmit

    batch, width, llm = 3, 20, 37
    z = noncontig(leaf(batch, num_req, width, dtype=dtype))
    w = noncontig(leaf(num_slots, llm, width, dtype=dtype, scale=width ** -0.5))
    b = leaf(num_slots, llm, dtype=dtype) if bias else None
    e = leaf(num_slots, llm, dtype=dtype) if slot else None
    assert w.stride(0) != llm * w.stride(1)
    compare(transmit, reference.transmit, [z, w, b, e], dtype, ["z", "w_o", "b_o", "slot_embed"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("num_req,num_slots", PER_SLOT)
def test_transmit_interleave_per_slot(dtype, inplace, num_req, num_slots):
    """The per-slot transmission written into the slot rows, its weight an nn.Linear's (K·D, Di) viewed as
    (K, D, Di), with strided int32 slot positions."""
    from lmeye_fast.ops.transmit import transmit_interleave

    batch, width, llm, length = 3, 12, 29, 13
    z = noncontig(leaf(batch, num_req, width, dtype=dtype))
    w = leaf(num_slots * llm, width, dtype=dtype, scale=width ** -0.5)
    b = leaf(num_slots * llm, dtype=dtype)
    e = leaf(num_slots, llm, dtype=dtype)
    embeds = noncontig(leaf(batch, length, llm, dtype=dtype))
    pos = slots(batch, 2 * num_slots, length).to(torch.int32)[:, ::2]
    before = embeds.detach().clone()

    def kernel(z_, w_, b_, e_, E):
        target = E * 1 if inplace else E
        out = transmit_interleave(z_, w_.view(num_slots, llm, width), b_.view(num_slots, llm), e_, target, pos,
                                  inplace)
        assert (out is target) == inplace
        return out

    def ref(z_, w_, b_, e_, E):
        return reference.transmit_interleave(z_, w_.view(num_slots, llm, width), b_.view(num_slots, llm), e_, E, pos)

    compare(kernel, ref, [z, w, b, e, embeds], dtype, ["z", "w_o", "b_o", "slot_embed", "embeds"], exact=["embeds"])
    assert torch.equal(embeds.detach(), before)


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("frozen", ["z", "w_o"])
def test_transmit_frozen_input_gets_no_gradient(per_slot, frozen):
    """An input that needs no gradient is skipped by the backward (the op hands back an empty tensor in
    its place); the other gradients still match."""
    from lmeye_fast.ops.transmit import transmit, transmit_bwd

    batch, num_req, num_slots, width, llm = 2, 2, 4 if per_slot else 2, 12, 19
    z = leaf(batch, num_req, width, dtype=torch.float32)
    w = leaf(*((num_slots,) if per_slot else ()), llm, width, dtype=torch.float32)
    b = leaf(*((num_slots,) if per_slot else ()), llm, dtype=torch.float32)
    e = leaf(num_slots, llm, dtype=torch.float32)
    inputs = {"z": z, "w_o": w}
    inputs[frozen] = inputs[frozen].detach()
    compare(transmit, reference.transmit, [inputs["z"], inputs["w_o"], b, e], torch.float32,
            ["z", "w_o", "b_o", "slot_embed"])
    grad = torch.randn(batch, num_slots, llm, device=DEVICE)
    full = transmit_bwd(grad, z.detach(), w.detach())
    part = transmit_bwd(grad, z.detach(), w.detach(), frozen != "z", frozen != "w_o")
    assert full[0].shape == z.shape and full[1].shape == w.shape
    assert part[0 if frozen == "z" else 1].numel() == 0
    for whole, kept in zip(full, part):
        if kept.numel():  # d b_o may be summed in another order without the weight's GEMM
            torch.testing.assert_close(kept, whole)


def test_per_slot_bad_slot_positions_never_write_outside():
    from lmeye_fast.ops.transmit import transmit_interleave

    batch, length, llm, width = 2, 5, 24, 8
    storage = torch.randn(batch * length * llm + 64, device=DEVICE)
    embeds = storage[32:32 + batch * length * llm].view(batch, length, llm)
    guard = storage.clone()
    pos = torch.tensor([[length, 1, -3], [-1, 4, 2]], device=DEVICE)
    z = torch.randn(batch, 1, width, device=DEVICE)
    transmit_interleave(z, torch.randn(3, llm, width, device=DEVICE), torch.randn(3, llm, device=DEVICE),
                        torch.randn(3, llm, device=DEVICE), embeds, pos, inplace=True)
    changed = (storage != guard).nonzero().flatten() - 32
    rows_hit = set((changed // llm).tolist())
    assert rows_hit == {0 * length + 1, 1 * length + 4, 1 * length + 2}, rows_hit
    assert torch.equal(storage[:32], guard[:32]) and torch.equal(storage[-32:], guard[-32:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_interleave(dtype, inplace):
    from lmeye_fast.ops.interleave import interleave

    batch, num_slots, llm, length = 3, 7, 37, 9
    embeds = leaf(batch, length, llm, dtype=dtype)
    rows = noncontig(leaf(batch, num_slots, llm, dtype=dtype))
    pos = slots(batch, num_slots, length).to(torch.int32)

    def kernel(E, rows_):
        target = E * 1 if inplace else E
        out = interleave(target, rows_, pos, inplace)
        assert (out is target) == inplace
        return out

    compare(kernel, lambda E, rows_: reference.interleave(E, rows_, pos), [embeds, rows], dtype, ["embeds", "rows"],
            exact=["embeds"])


def test_bad_slot_positions_never_write_outside():
    from lmeye_fast.ops.interleave import interleave
    from lmeye_fast.ops.transmit import transmit_interleave

    batch, length, llm = 2, 5, 24
    storage = torch.randn(batch * length * llm + 64, device=DEVICE)
    embeds = storage[32:32 + batch * length * llm].view(batch, length, llm)
    guard = storage.clone()
    pos = torch.tensor([[length, 1], [-1, 4]], device=DEVICE)
    rows = torch.randn(batch, 2, llm, device=DEVICE)
    interleave(embeds, rows, pos, inplace=True)
    z = torch.randn(batch, 2, 8, device=DEVICE)
    transmit_interleave(z, torch.randn(llm, 8, device=DEVICE), None, None, embeds, pos, inplace=True)
    changed = (storage != guard).nonzero().flatten() - 32
    rows_hit = set((changed // llm).tolist())
    assert rows_hit <= {0 * length + 1, 1 * length + 4}, rows_hit
    assert torch.equal(storage[:32], guard[:32]) and torch.equal(storage[-32:], guard[-32:])


def test_bad_inputs_name_the_argument():
    from lmeye_fast.ops.attend import attend_decomposed
    from lmeye_fast.ops.request import request
    from lmeye_fast.ops.transmit import transmit_interleave

    h = torch.randn(2, 4, 16, device=DEVICE)
    with pytest.raises(TypeError, match="w_q"):
        request(h, torch.tensor([0, 1], device=DEVICE), torch.randn(8, 16, device=DEVICE, dtype=torch.float16), None, 2)
    with pytest.raises(ValueError, match="request_pos"):
        request(h, torch.tensor([0, 1, 2], device=DEVICE), torch.randn(8, 16, device=DEVICE), None, 2)
    with pytest.raises(ValueError, match="w_f"):
        attend_decomposed(torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE), None,
                          torch.randn(16, 9, device=DEVICE), None, 2, 1)
    with pytest.raises(ValueError, match="num_heads"):
        attend_decomposed(torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE), None,
                          torch.randn(16, 8, device=DEVICE), None, 3, 1)
    with pytest.raises(ValueError, match="slot_pos"):
        transmit_interleave(torch.randn(2, 3, 8, device=DEVICE), torch.randn(16, 8, device=DEVICE), None, None,
                            torch.randn(2, 6, 16, device=DEVICE), torch.zeros(2, 4, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        request(h.double(), torch.tensor([0, 1], device=DEVICE), torch.randn(8, 16, device=DEVICE,
                dtype=torch.float64), None, 2)


def strided(n, dtype):
    """A bias that is every other element of a longer vector (stride 2), as a leaf."""
    base = torch.randn(2 * n, dtype=torch.float64, device=DEVICE).to(dtype)
    return base[::2].detach().requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_biases(dtype):
    """Biases are read as unit-stride vectors by the kernels: a strided one must still give the right result,
    also after a call with a dense bias of the same shape has cached its launch plan."""
    batch, seq, llm, vision, tokens, width, num_req, heads = 2, 5, 21, 13, 4, 12, 3, 3
    hidden = leaf(batch, seq, llm, dtype=dtype)
    pos = torch.randint(0, seq, (batch,), device=DEVICE)
    w_q = leaf(num_req * width, llm, dtype=dtype, scale=llm ** -0.5)
    for b_q in (leaf(num_req * width, dtype=dtype), strided(num_req * width, dtype)):
        compare(lambda h, w, b: ops.get("request", "triton")(h, pos, w, b, num_req),
                lambda h, w, b: reference.request(h, pos, w, b, num_req), [hidden, w_q, b_q], dtype,
                ["hidden", "w_q", "b_q"])
    r = leaf(batch, num_req, width, dtype=dtype)
    image = leaf(batch, tokens, vision, dtype=dtype)
    w_f = leaf(width, vision, dtype=dtype, scale=vision ** -0.5)
    for b_f in (leaf(width, dtype=dtype), strided(width, dtype)):
        compare(lambda q, x, w, b: ops.get("attend_decomposed", "triton")(q, x, None, w, b, heads, 1),
                lambda q, x, w, b: reference.attend(q, reference.decompose(x, w, b, 1), None, heads, 1),
                [r, image, w_f, b_f], dtype, ["requests", "image", "w_f", "b_f"])
    embeds = leaf(batch, seq + 4, llm, dtype=dtype)
    slots = torch.stack([torch.randperm(seq + 4, device=DEVICE)[:num_req] for _ in range(batch)])
    w_o = leaf(llm, width, dtype=dtype, scale=width ** -0.5)
    for b_o in (leaf(llm, dtype=dtype), strided(llm, dtype)):
        compare(lambda z, w, b, e: ops.get("transmit_interleave", "triton")(z, w, b, None, e, slots),
                lambda z, w, b, e: reference.interleave(e, reference.transmit(z, w, b, None), slots),
                [r, w_o, b_o, embeds], dtype, ["z", "w_o", "b_o", "embeds"], exact=["embeds"])
        compare(lambda z, w, b: ops.get("transmit", "triton")(z, w, b, None),
                lambda z, w, b: reference.transmit(z, w, b, None), [r, w_o, b_o], dtype, ["z", "w_o", "b_o"])
    # Per slot, after the shared calls above cached plans for the same z and embeds: (K, D) biases whose
    # rows lie apart (a slice of a wider tensor) and whose columns are strided (copied first).
    num_slots = 2 * num_req
    slots = torch.stack([torch.randperm(seq + 4, device=DEVICE)[:num_slots] for _ in range(batch)])
    w_k = leaf(num_slots, llm, width, dtype=dtype, scale=width ** -0.5)
    wide = torch.randn(num_slots, 2 * llm, dtype=torch.float64, device=DEVICE).to(dtype)
    for b_k in (wide[:, :llm].detach().requires_grad_(), wide[:, ::2].detach().requires_grad_()):
        e_k = wide[:, 1::2].detach().requires_grad_()
        compare(lambda z, w, b, e, E: ops.get("transmit_interleave", "triton")(z, w, b, e, E, slots),
                lambda z, w, b, e, E: reference.interleave(E, reference.transmit(z, w, b, e), slots),
                [r, w_k, b_k, e_k, embeds], dtype, ["z", "w_o", "b_o", "slot_embed", "embeds"], exact=["embeds"])
        compare(lambda z, w, b, e: ops.get("transmit", "triton")(z, w, b, e),
                lambda z, w, b, e: reference.transmit(z, w, b, e), [r, w_k, b_k, e_k], dtype,
                ["z", "w_o", "b_o", "slot_embed"])
