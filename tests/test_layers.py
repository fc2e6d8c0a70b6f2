"""InteractiveLayer and StaticVisualMapping on the reference backend: math, user modules, bad input."""

import pytest
import torch
from torch import nn

from lmeye_fast import InteractiveLayer, StaticVisualMapping, reference


def make_inputs(layer, batch=3, seq=11, tokens=5, extra=4):
    hidden = torch.randn(batch, seq, layer.llm_dim)
    image = torch.randn(batch, tokens, layer.vision_dim)
    embeds = torch.randn(batch, seq + extra, layer.llm_dim)
    slot_pos = torch.stack([torch.randperm(seq + extra)[: layer.num_slots] for _ in range(batch)])
    request_pos = torch.randint(0, seq, (batch,))
    return hidden, image, embeds, slot_pos, request_pos


def layer_reference(layer, hidden, image, embeds, slot_pos, request_pos, mask=None):
    return reference.interactive(
        hidden, request_pos, image, mask, embeds, slot_pos, layer.request_proj.weight, layer.request_proj.bias,
        layer.decompose_proj.weight, layer.decompose_proj.bias, layer.transmit_proj.weight,
        layer.transmit_proj.bias, layer.slot_embed, layer.num_heads, layer.sub_features)


def randomize(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def test_layer_matches_reference_and_writes_only_slots():
    layer = randomize(InteractiveLayer(37, 19, 24, num_requests=3, sub_features=2, num_heads=4, backend="reference"))
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    mask = torch.rand(3, 5) > 0.3
    out = layer(hidden, image, embeds, slot_pos, request_pos=request_pos, image_mask=mask)
    torch.testing.assert_close(out, layer_reference(layer, hidden, image, embeds, slot_pos, request_pos, mask))
    changed = (out != embeds).any(-1)
    expected = torch.zeros_like(changed)
    expected[torch.arange(3)[:, None], slot_pos] = True
    assert torch.equal(changed, expected)


def test_request_vectors_directly_and_transmitted_tokens():
    layer = randomize(InteractiveLayer(20, 12, 8, num_requests=2, num_heads=2, backend="reference"))
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    rows = hidden[torch.arange(3), request_pos]
    from_vectors = layer(rows, image, embeds, slot_pos)
    from_states = layer(hidden, image, embeds, slot_pos, request_pos=request_pos)
    torch.testing.assert_close(from_vectors, from_states)
    tokens = layer.transmitted(hidden, image, request_pos=request_pos)
    assert tokens.shape == (3, 2, 20)
    manual = embeds.clone()
    manual[torch.arange(3)[:, None], slot_pos] += tokens
    torch.testing.assert_close(from_states, manual)


def test_inplace_does_not_copy_and_gradients_reach_everything():
    layer = randomize(InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference"))
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    hidden.requires_grad_(True)
    image.requires_grad_(True)
    leaf = embeds.clone().requires_grad_(True)
    work = leaf * 1.0  # a non-leaf, as an embedding layer's output would be
    out = layer(hidden, image, work, slot_pos, request_pos=request_pos, inplace=True)
    assert out.data_ptr() == work.data_ptr()
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    torch.testing.assert_close(leaf.grad, weight)
    assert hidden.grad.abs().sum() > 0 and image.grad.abs().sum() > 0
    rows_touched = hidden.grad.abs().sum(-1) > 0
    expected = torch.zeros_like(rows_touched)
    expected[torch.arange(3), request_pos] = True
    assert torch.equal(rows_touched, expected)
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_untrained_layer_barely_perturbs():
    layer = InteractiveLayer(64, 32, 32, num_requests=4, num_heads=4, backend="reference")
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    out = layer(hidden, image, embeds, slot_pos, request_pos=request_pos)
    assert (out - embeds).abs().max() < 1e-2 * embeds.abs().max()
    assert torch.count_nonzero(layer.slot_embed) == 0


class TinyEncoder(nn.Module):
    """Stands in for a frozen text encoder run over [sub-features ; requests]."""

    def __init__(self, width):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=2 * width, batch_first=True,
                                                dropout=0.0)

    def forward(self, sequence, mask):
        return self.layer(sequence, src_key_padding_mask=None if mask is None else ~mask)


def test_user_interaction_module():
    encoder = TinyEncoder(8).eval()
    layer = randomize(InteractiveLayer(16, 10, 8, num_requests=3, sub_features=2, num_heads=2,
                                       interaction=encoder, backend="reference"))
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    mask = torch.rand(3, 5) > 0.3
    out = layer(hidden, image, embeds, slot_pos, request_pos=request_pos, image_mask=mask)
    r = reference.request(hidden, request_pos, layer.request_proj.weight, layer.request_proj.bias, 3)
    feats = reference.decompose(image, layer.decompose_proj.weight, layer.decompose_proj.bias, 2)
    keep = torch.cat([mask.repeat_interleave(2, 1), torch.ones(3, 3, dtype=torch.bool)], 1)
    z = encoder(torch.cat([feats, r], 1), keep)[:, -3:]
    t = reference.transmit(z, layer.transmit_proj.weight, layer.transmit_proj.bias, layer.slot_embed)
    torch.testing.assert_close(out, reference.interleave(embeds, t, slot_pos))
    out.sum().backward()
    assert encoder.layer.linear1.weight.grad is not None


@pytest.mark.parametrize("hidden_dim", [None, 23])
def test_static_mapping(hidden_dim):
    mapping = StaticVisualMapping(12, 20, hidden_dim=hidden_dim, backend="reference")
    image = torch.randn(2, 4, 12)
    embeds = torch.randn(2, 9, 20)
    slot_pos = torch.stack([torch.randperm(9)[:4] for _ in range(2)])
    tokens = mapping(image)
    assert tokens.shape == (2, 4, 20)
    out = mapping(image, embeds, slot_pos)
    expected = embeds.clone()
    expected[torch.arange(2)[:, None], slot_pos] += tokens
    torch.testing.assert_close(out, expected)


def test_env_overrides_backend(monkeypatch):
    monkeypatch.setenv("LMEYE_FAST_BACKEND", "reference")
    assert InteractiveLayer(8, 8, 8, num_requests=1, num_heads=1, backend="auto").backend == "reference"
    monkeypatch.setenv("LMEYE_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LMEYE_FAST_BACKEND"):
        InteractiveLayer(8, 8, 8, num_requests=1, num_heads=1)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("build", [
    lambda backend: InteractiveLayer(8, 8, 8, num_requests=1, num_heads=1, backend=backend),
    lambda backend: StaticVisualMapping(8, 8, backend=backend),
    lambda backend: StaticVisualMapping(8, 8, hidden_dim=4, backend=backend),
], ids=["InteractiveLayer", "StaticVisualMapping", "StaticVisualMapping-mlp"])
def test_missing_backend_is_a_clear_error_at_construction(monkeypatch, build, backend):
    """Refused when the module is built, naming the backend and the reason, not at its first forward."""
    from lmeye_fast import backends

    reason = f"{backend} is not built here"
    monkeypatch.setattr(backends, "status", lambda name: (name == "reference", f"{name} is not built here"))
    with pytest.raises(RuntimeError) as info:
        build(backend)
    assert f"backend {backend!r} is not available here: {reason}" in str(info.value)
    assert "python -m lmeye_fast.info" in str(info.value)
    monkeypatch.setenv("LMEYE_FAST_BACKEND", backend)  # the override is refused the same way
    with pytest.raises(RuntimeError, match=f"backend {backend!r} is not available here: {reason}"):
        build("reference")


BAD_CALLS = [
    ("hidden", dict(hidden=torch.randn(3, 11, 15)), "hidden (B, T, D): expected shape (3, ?, 16)"),
    ("request_pos", dict(request_pos=torch.zeros(3, dtype=torch.float32)), "request_pos (B,): expected dtype"),
    ("request_pos", dict(request_pos=torch.randint(0, 5, (2,))), "request_pos (B,): expected shape (3,)"),
    ("image", dict(image=torch.randn(3, 5, 9)), "image (B, N, Dv): expected shape (?, ?, 10)"),
    ("image", dict(image=torch.randn(3, 5, 10).to(torch.int64)), "image (B, N, Dv): expected dtype"),
    ("image_mask", dict(image_mask=torch.ones(3, 4, dtype=torch.bool)), "image_mask (B, N): expected shape (3, 5)"),
    ("image_mask", dict(image_mask=torch.ones(3, 5)), "image_mask (B, N): expected dtype in (bool)"),
    ("embeds", dict(embeds=torch.randn(3, 15, 17)), "embeds: expected shape (B, T', D) = (3, ?, 16)"),
    ("slot_pos", dict(slot_pos=torch.zeros(3, 3, dtype=torch.int64)), "slot_pos: expected shape (B, K) with K = num_slots"),
    ("slot_pos", dict(slot_pos=torch.zeros(3, 2)), "slot_pos (B, K): expected dtype"),
    ("hidden", dict(hidden=torch.randn(3, 11, 16, device="meta")), "hidden (B, T, D): expected a tensor on cpu"),
]


@pytest.mark.parametrize("name,override,message", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_input_names_the_argument(name, override, message):
    layer = InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference")
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    args = dict(hidden=hidden, image=image, embeds=embeds, slot_pos=slot_pos, request_pos=request_pos)
    args.update(override)
    with pytest.raises((ValueError, TypeError)) as info:
        layer(**args)
    assert message in str(info.value)


def test_out_of_range_positions_are_refused_when_validating():
    layer = InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference")
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    with pytest.raises(ValueError, match=r"slot_pos: positions must lie in \[0, 15\)"):
        layer(hidden, image, embeds, slot_pos + 15, request_pos=request_pos, validate=True)
    with pytest.raises(ValueError, match=r"request_pos: positions must lie in \[0, 11\)"):
        layer(hidden, image, embeds, slot_pos, request_pos=request_pos - 20, validate=True)
    repeated = slot_pos.clone()
    repeated[:, 1] = repeated[:, 0]
    with pytest.raises(ValueError, match="slot_pos: slot positions of one row must be distinct"):
        layer(hidden, image, embeds, repeated, request_pos=request_pos, validate=True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_heads=3), "num_heads: must divide interaction_dim=8"),
    (dict(num_requests=0), "num_requests: expected a positive int"),
    (dict(interaction="mlp"), "interaction: expected 'attention' or an nn.Module"),
    (dict(backend="fast"), "backend: expected one of"),
])
def test_bad_constructor_arguments(kwargs, message):
    args = dict(llm_dim=16, vision_dim=10, interaction_dim=8, num_requests=2, num_heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        InteractiveLayer(**args)


def test_state_dict_round_trip():
    layer = randomize(InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference"))
    copy = InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference")
    copy.load_state_dict(layer.state_dict())
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    torch.testing.assert_close(copy(hidden, image, embeds, slot_pos, request_pos=request_pos),
                               layer(hidden, image, embeds, slot_pos, request_pos=request_pos))


def test_compiled_forward_never_probes_backends(monkeypatch):
    """Backend probes (device queries, imports) run at construction; a compiled forward only reads their result."""
    from lmeye_fast import backends, ops

    def probe_that_breaks_graphs():
        torch._dynamo.graph_break()
        return True, "probed"

    monkeypatch.setattr(backends, "_STATUS", {})
    monkeypatch.setattr(backends, "_PROBES", dict(backends._PROBES, reference=probe_that_breaks_graphs))
    monkeypatch.setattr(ops, "_RESOLVED", {})
    layer = randomize(InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference"))
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(hidden, image, embeds, slot_pos, request_pos=request_pos),
                               layer(hidden, image, embeds, slot_pos, request_pos=request_pos))


def test_torch_compile_inductor_fullgraph_matches_eager():
    """What a user does first: torch.compile the layer (here the CPU path, inductor, no graph break)."""
    layer = randomize(InteractiveLayer(37, 19, 24, num_requests=3, sub_features=2, num_heads=4))
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    mask = torch.rand(3, 5) > 0.3
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(hidden, image, embeds, slot_pos, request_pos=request_pos, image_mask=mask)
    want = layer(hidden, image, embeds, slot_pos, request_pos=request_pos, image_mask=mask)
    torch.testing.assert_close(got, want)
    weight = torch.randn_like(got)
    grads = torch.autograd.grad((got * weight).sum(), list(layer.parameters()))
    expected = torch.autograd.grad((want * weight).sum(), list(layer.parameters()))
    for (name, _), g, e in zip(layer.named_parameters(), grads, expected):
        torch.testing.assert_close(g, e, msg=name)


@pytest.mark.parametrize("num_requests,num_slots", [(1, 5), (2, 6), (3, 3)])
def test_per_slot_transmission_matches_reference(num_requests, num_slots):
    """Each slot through its own rows of one (K·D, Di) linear layer, slot j reading request j // (K/R)."""
    llm, width = 13, 8
    layer = randomize(InteractiveLayer(llm, 10, width, num_requests=num_requests, num_heads=2, num_slots=num_slots,
                                       transmission="per_slot", backend="reference"))
    assert layer.transmit_proj.weight.shape == (num_slots * llm, width)
    assert layer.transmit_proj.bias.shape == (num_slots * llm,) and layer.slot_embed.shape == (num_slots, llm)
    hidden, image, embeds, _, request_pos = make_inputs(layer)
    slot_pos = torch.stack([torch.randperm(embeds.shape[1])[:num_slots] for _ in range(3)])
    out = layer(hidden, image, embeds, slot_pos, request_pos=request_pos)
    w_o = layer.transmit_proj.weight.view(num_slots, llm, width)
    b_o = layer.transmit_proj.bias.view(num_slots, llm)
    torch.testing.assert_close(out, reference.interactive(
        hidden, request_pos, image, None, embeds, slot_pos, layer.request_proj.weight, layer.request_proj.bias,
        layer.decompose_proj.weight, layer.decompose_proj.bias, w_o, b_o, layer.slot_embed, layer.num_heads,
        layer.sub_features))
    # Written out slot by slot from the linear layer itself, as a (K·D, Di) layer is applied.
    r = reference.request(hidden, request_pos, layer.request_proj.weight, layer.request_proj.bias, num_requests)
    z = reference.attend(r, reference.decompose(image, layer.decompose_proj.weight, layer.decompose_proj.bias, 1),
                         None, layer.num_heads, 1)
    tokens = layer.transmitted(hidden, image, request_pos=request_pos)
    assert tokens.shape == (3, num_slots, llm)
    for j in range(num_slots):
        full = layer.transmit_proj(z[:, j // (num_slots // num_requests)])  # (B, K·D)
        torch.testing.assert_close(tokens[:, j], full[:, j * llm:(j + 1) * llm] + layer.slot_embed[j])
    manual = embeds.clone()
    manual[torch.arange(3)[:, None], slot_pos] += tokens
    torch.testing.assert_close(out, manual)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_shared_transmission_keeps_its_parameters():
    layer = InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference")
    assert layer.num_slots == 2 and layer.transmission == "shared"
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items() if "transmit" in k or "slot" in k} == {
        "transmit_proj.weight": (16, 8), "transmit_proj.bias": (16,), "slot_embed": (2, 16)}


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_slots=5), "num_slots: the shared transmission writes one slot per request"),
    (dict(num_slots=5, transmission="per_slot"), "num_slots: must be a multiple of num_requests=2"),
    (dict(num_slots=0, transmission="per_slot"), "num_slots: expected a positive int"),
    (dict(transmission="slot"), "transmission: expected one of ('shared', 'per_slot')"),
])
def test_bad_transmission_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        InteractiveLayer(16, 10, 8, num_requests=2, num_heads=2, backend="reference", **kwargs)


def test_per_slot_slot_positions_are_checked_against_num_slots():
    layer = InteractiveLayer(16, 10, 8, num_requests=1, num_heads=2, num_slots=3, transmission="per_slot",
                             backend="reference")
    hidden, image, embeds, slot_pos, request_pos = make_inputs(layer)
    with pytest.raises(ValueError, match=r"slot_pos: expected shape \(B, K\) with K = num_slots = 3, got \(3, 1\)"):
        layer(hidden, image, embeds, slot_pos[:, :1], request_pos=request_pos)


def test_reference_transmit_refuses_a_slot_count_that_is_not_a_multiple():
    with pytest.raises(ValueError, match=r"w_o \(K, D, Di\): the slot count K = 5 must be a multiple of the "
                                         r"request count R = 2"):
        reference.transmit(torch.randn(3, 2, 4), torch.randn(5, 6, 4), None, None)
