"""The layouts beside LMEye's default, each a general option: the request read at the first ``<img-d>``
slot (no ``<img-q>``) on both schedules, fewer requests than slots, special rows as the LLM's word row
plus a learned vector, and CLIP's text pass with positions on its ends only or with all requests in
one sequence; and the single pass refusing a request outside what it computes.

Tolerance: fp32, relative error (max |a - b| / max |b|) at most 1e-4 between the schedules (logits,
loss, every gradient), as for the default layout.
"""

import pytest
import torch

from lmeye_fast.models import CLIPTextInteraction, LMEyeModel, LMEyeProcessor
from lmeye_fast.models.prompts import PromptTemplate
from lmeye_fast.models.tiny import tiny_clip, tiny_clip_model, tiny_llm, word_tokenizer

from released_reference import clip_ends_sequence, clip_text_rows, text_projection

WORDS = "what colour is the circle square red blue left right answer :".split()
TOL = 1e-4


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def build(arch="llama", request_token=False, slots=5, requests=5, special_rows="replace", **config):
    config.setdefault("transmission", "shared" if requests == slots else "per_slot")
    tokenizer = word_tokenizer(WORDS)
    template = PromptTemplate(response_prefix="answer :", request_token=request_token)
    processor = LMEyeProcessor(tokenizer, num_image_tokens=17, num_requests=slots, template=template)
    llm = tiny_llm(arch, len(tokenizer) - 1)  # the last special token lies beyond its table: appended
    model = LMEyeModel(llm, processor.make_config(interaction_dim=32, num_heads=4, num_requests=requests,
                                                  special_rows=special_rows, **config), vision=tiny_clip())
    with torch.no_grad():
        for p in [*model.static.parameters(), model.special_embed, *model.ipn.parameters()]:
            p.normal_(0.0, 0.3)
    return processor, model.eval()


def batch_of(processor):
    return processor(["what colour is the circle ?", "<img> where is the square", "colour ?"],
                     ["red", "left right", "blue"], images=torch.rand(3, 3, 32, 32))


def test_first_slot_layout():
    processor, _ = build()
    batch = batch_of(processor)
    prefix_len = batch["prefix_len"]
    assert (batch["request_pos"] == prefix_len).all()
    assert (batch["slot_pos"] == prefix_len + torch.arange(5)).all()
    assert (batch["input_ids"][:, prefix_len] == processor.slot_token_id).all()
    assert not (batch["input_ids"] == processor.request_token_id).any()
    assert processor.make_config().request_position == "first_slot"


def _run(model, batch, schedule):
    model.zero_grad()
    out = model(**batch, schedule=schedule, all_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("special_rows", ["replace", "add"])
def test_first_slot_schedules_agree(arch, special_rows):
    """The single pass's probe of the first slot gives the two passes' logits, loss and gradients,
    the special-token vectors' (trained through the probe and the suffix) included."""
    processor, model = build(arch, special_rows=special_rows)
    model.set_stage(2, train_special_tokens=True)
    model.static.requires_grad_(True)
    batch = batch_of(processor)
    single, g1 = _run(model, batch, "single_pass")
    two, g2 = _run(model, batch, "two_pass")
    assert rel_err(single.logits, two.logits) <= TOL
    assert rel_err(single.loss, two.loss) <= TOL
    assert sorted(g1) == sorted(g2) and "special_embed" in g1 and "ipn.request_proj.weight" in g1
    for name in g1:
        assert rel_err(g1[name], g2[name]) <= TOL, name
    # The request row matters: the slot vector reaches the loss through the request too.
    assert g1["special_embed"][2].abs().max() > 0


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 3])
def test_first_slot_generation_agrees(beams):
    processor, model = build()
    batch = processor(["what colour is the circle ?", "colour ?"], images=torch.rand(2, 3, 32, 32))
    settings = dict(max_new_tokens=5, num_beams=beams, do_sample=False)
    assert torch.equal(model.generate(**batch, **settings), model.generate(**batch, schedule="two_pass", **settings))


def test_first_slot_probe_reads_the_unfilled_slot():
    """The request the IPN receives is the same on both schedules: the single pass's probe computes the
    first slot's hidden state from its first-pass row, as the first of two passes does."""
    processor, model = build()
    batch = batch_of(processor)
    hidden = {}
    for schedule in ("single_pass", "two_pass"):
        requests = []
        original = model.ipn.forward

        def spy(hidden_states, image, embeds, slot_pos, request_pos=None, **kw):
            rows = hidden_states[torch.arange(hidden_states.shape[0]), request_pos]
            requests.append(rows.detach().clone())
            return original(hidden_states, image, embeds, slot_pos, request_pos=request_pos, **kw)

        model.ipn.forward = spy
        try:
            with torch.no_grad():
                model(**batch, schedule=schedule)
        finally:
            del model.ipn.forward
        hidden[schedule] = requests[0]
    assert rel_err(hidden["single_pass"], hidden["two_pass"]) <= TOL


@pytest.mark.parametrize("request_token", [False, True])
def test_single_pass_refuses_a_request_outside_its_reach(request_token):
    processor, model = build(request_token=request_token)
    batch = batch_of(processor)
    prefix_len = batch["prefix_len"]
    reach = prefix_len + (not request_token)
    outside = dict(batch, request_pos=torch.full_like(batch["request_pos"], reach))
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"request_pos: the single pass reads the request at columns "
                                             rf"\[0, {reach}\).*got positions in \[{reach}, {reach}\]"):
            model(**outside)
        with pytest.raises(ValueError, match="request_pos: the single pass reads the request"):
            prompt = processor(["colour ?"], images=torch.rand(1, 3, 32, 32))
            prompt["request_pos"] = prompt["request_pos"] + 3
            model.generate(**prompt, max_new_tokens=2)
        model(**outside, schedule="two_pass")  # two full passes can read it anywhere


@pytest.mark.parametrize("request_token", [False, True])
def test_fewer_requests_than_slots(request_token):
    """One request, five slots (v1's), each slot its own transmission: both schedules agree and the
    five transmitted tokens differ."""
    processor, model = build(request_token=request_token, requests=1, slots=5)
    config = model.config
    assert (config.num_requests, config.num_slots, config.slots, config.transmission) == (1, 5, 5, "per_slot")
    assert model.ipn.transmit_proj.weight.shape == (5 * 32, 32)
    batch = batch_of(processor)
    single, g1 = _run(model, batch, "single_pass")
    two, g2 = _run(model, batch, "two_pass")
    assert rel_err(single.logits, two.logits) <= TOL and rel_err(single.loss, two.loss) <= TOL
    for name in g1:
        assert rel_err(g1[name], g2[name]) <= TOL, name
    with torch.no_grad():
        image = model.encode_images(batch["pixel_values"])["image_features"]
        tokens = model.ipn.transmitted(torch.randn(3, 32), image)
    assert tokens.shape == (3, 5, 32) and rel_err(tokens[:, 0], tokens[:, 1]) > 1e-2
    with pytest.raises(ValueError, match="num_slots: expected a positive multiple of num_requests=2"):
        processor.make_config(num_requests=2, transmission="per_slot")
    with pytest.raises(ValueError, match="num_slots: the shared transmission fills one slot per request"):
        processor.make_config(num_requests=1)
    with pytest.raises(ValueError, match="transmission: expected one of"):
        processor.make_config(transmission="per_request")


def test_special_rows_add():
    processor, model = build(special_rows="add")
    words = model.llm.get_input_embeddings().weight
    ids = torch.tensor([[processor.image_token_id, processor.slot_token_id, 5]])
    rows = model.embed(ids)[0]
    torch.testing.assert_close(rows[0], words[ids[0, 0]] + model.special_embed[0])
    torch.testing.assert_close(rows[1], words[ids[0, 1]] + model.special_embed[2])
    torch.testing.assert_close(rows[2], words[5])
    # The row appended to the LLM's table for the last token starts at zero: the vector alone makes it.
    assert processor.slot_token_id == words.shape[0] - 1 and bool((words[-1] == 0).all())
    mixed = processor.make_config(special_rows=["replace", "add", "add"])
    assert mixed.row_modes == ["replace", "add", "add"]
    with pytest.raises(ValueError, match="special_rows: expected one of"):
        processor.make_config(special_rows="sum")


# ------------------------------------------------------------------ CLIP's text pass

def _interaction_input(clip, features, requests):
    width = clip.text_projection.out_features
    return torch.randn(2, features + requests, width)


@torch.no_grad()
def test_clip_interaction_positions_on_the_ends():
    """One request, positions on start and end only: CLIP's layers by hand over
    [start + position 0; sub-features; request; end + last position], the pooled end row projected."""
    clip = tiny_clip_model(text_hidden=16).eval()
    module = CLIPTextInteraction(clip, 1, positions="ends")
    sequence = _interaction_input(clip, 5, 1)
    want = text_projection(clip, clip_text_rows(clip, clip_ends_sequence(clip, sequence))[:, -1:])
    assert rel_err(module(sequence), want) <= 1e-5
    assert rel_err(CLIPTextInteraction(clip, 1)(sequence), want) > 1e-3  # all positions: another pass


@torch.no_grad()
def test_clip_interaction_joint_requests():
    """All requests in one sequence, the last R rows read (as LMEye v0.1 reads them)."""
    clip = tiny_clip_model(text_hidden=16, text_positions=40).eval()
    module = CLIPTextInteraction(clip, 5, requests="joint", positions="ends")
    sequence = _interaction_input(clip, 32, 5)
    want = text_projection(clip, clip_text_rows(clip, clip_ends_sequence(clip, sequence))[:, -5:])
    assert rel_err(module(sequence), want) <= 1e-5
    assert module.options == {"requests": "joint", "positions": "ends"}
    with pytest.raises(ValueError, match="text sequence of 39 rows, more than the CLIP text tower's 32 positions"):
        CLIPTextInteraction(tiny_clip_model(text_hidden=16), 5, requests="joint")(sequence)
    with pytest.raises(ValueError, match="positions: expected one of"):
        CLIPTextInteraction(clip, 5, positions="middle")


def test_clip_interaction_legacy_end_of_text_id():
    """A CLIP config written before transformers corrected its ids (eos 2, as openai's on the hub) means
    the last two ids of the vocabulary, as CLIP's own text model reads it."""
    clip = tiny_clip_model(text_hidden=16)
    clip.text_model.config.bos_token_id, clip.text_model.config.eos_token_id = 0, 2
    module = CLIPTextInteraction(clip, 1)
    assert module.boundary_ids.tolist() == [6, 7]
