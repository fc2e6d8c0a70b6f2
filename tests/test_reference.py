"""The reference against an independent float64 loop implementation, and gradcheck.

The loop version below is written from docs/design.md §2 directly, one row, head
and request at a time, sharing no code with lmeye_fast.reference.
Tolerance: both run in float64, so they agree to 1e-10 relative.
"""

import math

import pytest
import torch

from lmeye_fast import reference

F64 = torch.float64


def loop_ipn(h, q, x, mask, e, s, wq, bq, wf, bf, wo, bo, slot, heads, sub):
    """``wo`` (D, Di) is the shared transmission, (K, D, Di) the per-slot one (slot j through ``wo[j]``
    from request j // (K/R))."""
    batch, num_slots = s.shape
    di = wo.shape[-1]
    num_req = wq.shape[0] // di
    dh = di // heads
    out = e.clone()
    for b in range(batch):
        r = (wq @ h[b, q[b]] + bq).reshape(num_req, di)
        feats = []
        for n in range(x.shape[1]):
            f_n = (wf @ x[b, n] + bf).reshape(sub, di)
            for k in range(sub):
                feats.append((f_n[k], True if mask is None else bool(mask[b, n])))
        z = r.clone()
        for j in range(num_req):
            for hd in range(heads):
                cols = slice(hd * dh, (hd + 1) * dh)
                scores = [float(r[j, cols] @ f[cols]) / math.sqrt(dh) for f, keep in feats if keep]
                kept = [f for f, keep in feats if keep]
                if not kept:
                    continue
                top = max(scores)
                weights = [math.exp(v - top) for v in scores]
                total = sum(weights)
                for w, f in zip(weights, kept):
                    z[j, cols] += (w / total) * f[cols]
        for j in range(num_slots):
            if wo.dim() == 3:
                out[b, s[b, j]] += wo[j] @ z[j // (num_slots // num_req)] + bo[j] + slot[j]
            else:
                out[b, s[b, j]] += wo @ z[j] + bo + slot[j]
    return out


def random_case(batch, seq, dim, vdim, tokens, di, num_req, heads, sub, masked, dtype=F64, num_slots=None):
    """``num_slots`` given: the per-slot transmission into that many slots."""
    g = dict(dtype=dtype)
    per_slot = () if num_slots is None else (num_slots,)
    num_slots = num_req if num_slots is None else num_slots
    case = dict(
        h=torch.randn(batch, seq, dim, **g),
        q=torch.randint(0, seq, (batch,)),
        x=torch.randn(batch, tokens, vdim, **g),
        mask=(torch.rand(batch, tokens) > 0.4) if masked else None,
        e=torch.randn(batch, seq + num_slots + 2, dim, **g),
        s=torch.stack([torch.randperm(seq + num_slots + 2)[:num_slots] for _ in range(batch)]),
        wq=torch.randn(num_req * di, dim, **g) / math.sqrt(dim),
        bq=torch.randn(num_req * di, **g),
        wf=torch.randn(sub * di, vdim, **g) / math.sqrt(vdim),
        bf=torch.randn(sub * di, **g),
        wo=torch.randn(*per_slot, dim, di, **g) / math.sqrt(di),
        bo=torch.randn(*per_slot, dim, **g),
        slot=torch.randn(num_slots, dim, **g),
    )
    if masked:
        case["mask"][0] = False  # one row with every image token masked: z must equal r
    return case


def run_reference(c, heads, sub, inplace=False):
    return reference.interactive(c["h"], c["q"], c["x"], c["mask"], c["e"], c["s"], c["wq"], c["bq"], c["wf"],
                                 c["bf"], c["wo"], c["bo"], c["slot"], heads, sub, inplace=inplace)


SHAPES = [
    # batch, seq, D, Dv, N, Di, R, H, S, masked
    (1, 5, 8, 6, 1, 4, 1, 1, 1, False),
    (3, 7, 13, 9, 5, 12, 3, 3, 2, True),
    (2, 4, 70, 11, 3, 16, 5, 4, 3, True),
    (2, 9, 33, 5, 4, 6, 2, 2, 1, False),
]


# The per-slot transmission: (shape, K).
PER_SLOT_SHAPES = [(SHAPES[0], 5), (SHAPES[1], 6), (SHAPES[3], 2), ((2, 4, 12, 7, 3, 8, 1, 2, 1, True), 1)]


@pytest.mark.parametrize("shape,num_slots", [(s, None) for s in SHAPES] + PER_SLOT_SHAPES,
                         ids=lambda s: "B{}T{}D{}Dv{}N{}Di{}R{}H{}S{}m{}".format(*s) if isinstance(s, tuple)
                         else f"K{s}" if s else "shared")
def test_reference_matches_loop(shape, num_slots):
    *dims, heads, sub, masked = shape
    batch, seq, dim, vdim, tokens, di, num_req = dims
    c = random_case(batch, seq, dim, vdim, tokens, di, num_req, heads, sub, masked, num_slots=num_slots)
    got = run_reference(c, heads, sub)
    want = loop_ipn(c["h"], c["q"], c["x"], c["mask"], c["e"], c["s"], c["wq"], c["bq"], c["wf"], c["bf"],
                    c["wo"], c["bo"], c["slot"], heads, sub)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    untouched = torch.ones(c["e"].shape[:2], dtype=torch.bool)
    untouched[torch.arange(batch)[:, None], c["s"]] = False
    assert torch.equal(got[untouched], c["e"][untouched])


def test_fully_masked_row_gives_residual_only():
    c = random_case(2, 6, 10, 7, 4, 8, 2, 2, 2, masked=True)
    r = reference.request(c["h"], c["q"], c["wq"], c["bq"], 2)
    feats = reference.decompose(c["x"], c["wf"], c["bf"], 2)
    z = reference.attend(r, feats, c["mask"], 2, 2)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[0], r[0], rtol=0, atol=0)


def test_inplace_writes_into_the_given_tensor():
    c = random_case(2, 6, 10, 7, 4, 8, 2, 2, 1, masked=False)
    e = c["e"]
    expected = run_reference(c, 2, 1)
    out = run_reference(c, 2, 1, inplace=True)
    assert out.data_ptr() == e.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    """Within low-precision storage the reference computes in fp32: its error is that of rounding the result."""
    c = random_case(2, 6, 96, 40, 9, 32, 3, 4, 2, masked=True)
    want = run_reference(c, 4, 2)
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()}
    got = run_reference(low, 4, 2)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    err = (got.double() - want).norm() / want.norm()
    assert err < 8 * eps, f"relative error {err:.2e} exceeds 8 eps of {dtype}"


@pytest.mark.parametrize("num_slots", [None, 4], ids=["shared", "per_slot"])
def test_gradcheck_every_input_and_parameter(num_slots):
    c = random_case(2, 4, 6, 5, 3, 4, 2, 2, 2, masked=True, num_slots=num_slots)
    c["mask"][1] = torch.tensor([True, False, True])
    names = ["h", "x", "e", "wq", "bq", "wf", "bf", "wo", "bo", "slot"]
    for name in names:
        c[name].requires_grad_(True)

    def fn(*tensors):
        cc = dict(c, **dict(zip(names, tensors)))
        return run_reference(cc, 2, 2)

    assert torch.autograd.gradcheck(fn, [c[n] for n in names], eps=1e-6, atol=1e-7)


def test_gradcheck_static_map_mlp():
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    params = [torch.randn(7, 5, dtype=F64, requires_grad=True), torch.randn(7, dtype=F64, requires_grad=True),
              torch.randn(4, 7, dtype=F64, requires_grad=True), torch.randn(4, dtype=F64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *a: reference.static_map(*a), [x, *params])
    linear = reference.static_map(x, params[0], params[1])
    torch.testing.assert_close(linear, x @ params[0].T + params[1])


@pytest.mark.parametrize("bias", [True, False])
def test_folded_association_is_the_same_math(bias):
    """``attend_decomposed(..., schedule="folded")`` takes the products in the folded kernels' order (the
    requests pulled through W_f, F never formed): in float64 it equals the formed association, a row with
    every token masked included, and its gradients pass gradcheck."""
    batch, num_req, width, tokens, vision, sub, heads = 2, 3, 12, 4, 5, 2, 3
    r = torch.randn(batch, num_req, width, dtype=F64, requires_grad=True)
    x = torch.randn(batch, tokens, vision, dtype=F64, requires_grad=True)
    w = torch.randn(sub * width, vision, dtype=F64, requires_grad=True)
    b = torch.randn(sub * width, dtype=F64, requires_grad=True) if bias else None
    mask = torch.rand(batch, tokens) > 0.4
    mask[0] = False
    mask[1, 0] = True
    formed = reference.attend_decomposed(r, x, mask, w, b, heads, sub)
    folded = reference.attend_decomposed(r, x, mask, w, b, heads, sub, "folded")
    torch.testing.assert_close(folded, formed, rtol=1e-10, atol=1e-10)
    assert torch.equal(folded[0], r[0].detach())
    inputs = [t for t in (r, x, w, b) if t is not None]
    assert torch.autograd.gradcheck(
        lambda *t: reference.attend_decomposed(t[0], t[1], mask, t[2], t[3] if bias else None, heads, sub, "folded"),
        inputs)
    assert torch.equal(reference.attend_decomposed(r, x[:, :0], None, w, b, heads, sub, "folded"), r.detach())
    with pytest.raises(ValueError, match="attention"):
        reference.attend_decomposed(r, x, mask, w, b, heads, sub, "fused")


def test_the_fused_ops_references_moved_from_ops_warn_by_their_old_name():
    from lmeye_fast import ops

    for name in ("attend_decomposed", "transmit_interleave"):
        with pytest.warns(DeprecationWarning, match=f"reference.{name}"):
            assert getattr(ops, name) is getattr(reference, name)
