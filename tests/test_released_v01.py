"""LMEye v0.1 (FlanT5-XL with BLIP-2's Q-Former) in its documented layout: a tiny checkpoint written as the
release writes it, a tiny T5 shaped as FlanT5, BLIP-2's vision tower and Q-Former from transformers'
classes with a tiny config, and a tiny CLIP; ``from_released`` against the independent implementation
in ``released_reference`` (two encoder passes per unpadded prompt, the joint CLIP text pass by hand,
the decoder on the second encoding).

Tolerance: float32, relative error at most 1e-5 for the decoder's logits; generated tokens identical.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
from transformers.modeling_outputs import BaseModelOutput

from lmeye_fast.models.released import QFormerImageTokens, from_released, read_released
from lmeye_fast.models.tiny import tiny_seq2seq, word_tokenizer

from released_reference import V01_SHAPES, qformer_tokens, release_state, v01_encoder_input, write_release
from test_released import C, TOL, clip_model, rel_err

WORDS = "what colour is the circle red blue left right Human: <img> Assistant: ?".split()
H, Q = 32, 24
QUESTIONS = ["what colour is the circle ?", "is the circle left ?"]
ANSWERS = ["red", "left right"]
RELEASE_PROMPT = "Human: <img>\n{q}\n <img-q> <img-d> <img-d> <img-d> <img-d> <img-d>\nAssistant:"


def qformer_parts():
    vision = Blip2VisionModel(Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, image_size=32, patch_size=8))
    qformer = Blip2QFormerModel(Blip2QFormerConfig(hidden_size=Q, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=2 * Q, encoder_hidden_size=32,
                                                   cross_attention_frequency=1))
    return SimpleNamespace(vision_model=vision.eval(), qformer=qformer.eval(),
                           query_tokens=torch.nn.Parameter(torch.randn(1, 32, Q)))


@pytest.fixture
def v01(tmp_path):
    state = release_state(V01_SHAPES, H=H, C=C, Q=Q)
    path = write_release(tmp_path / "checkpoint_with_epoch1.pth", state, module_prefix=True, epoch=1)
    tokenizer = word_tokenizer(WORDS)
    t5 = tiny_seq2seq("t5", len(tokenizer) + 8, hidden=H).eval()  # FlanT5's table outgrows its tokenizer too
    clip, parts = clip_model(text_positions=40), qformer_parts()
    processor, model = from_released(path, t5, clip, tokenizer, vision=QFormerImageTokens.from_blip2(parts))
    return dict(processor=processor, model=model.eval(), clip=clip, parts=parts, path=path,
                state={k: v.float() for k, v in state.items()})


def reference_encodings(v01, pixels, state=None):
    processor, model = v01["processor"], v01["model"]
    out = []
    for b, question in enumerate(QUESTIONS):
        ids = processor.tokenizer(RELEASE_PROMPT.format(q=question), add_special_tokens=False,
                                  return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, torch.tensor([[processor.eos_token_id]])], dim=1)  # T5's tokenisation ends with EOS
        tokens = qformer_tokens(v01["parts"], pixels[b:b + 1])
        second = v01_encoder_input(state or v01["state"], model.llm, v01["clip"], tokens, ids,
                                   processor.slot_token_id, processor.request_token_id)
        out.append(model.llm.get_encoder()(inputs_embeds=second).last_hidden_state)
    return out


def reference_logits(v01, pixels, state=None):
    processor, t5 = v01["processor"], v01["model"].llm
    rows = []
    for encoding, answer in zip(reference_encodings(v01, pixels, state), ANSWERS):
        labels = processor.encode(answer) + [processor.eos_token_id]
        decoder = torch.tensor([[t5.config.decoder_start_token_id] + labels[:-1]])
        encoded = BaseModelOutput(last_hidden_state=encoding)
        rows.append(t5(encoder_outputs=encoded, decoder_input_ids=decoder).logits[0])
    return rows


def model_logits(model, batch, schedule):
    logits = model(**batch, schedule=schedule).logits
    return [logits[b, batch["labels"][b] != -100] for b in range(logits.shape[0])]


@torch.no_grad()
def test_v01_logits_match_the_released_forward(v01):
    processor, model = v01["processor"], v01["model"]
    pixels = torch.rand(2, 3, 32, 32)
    batch = processor(QUESTIONS, ANSWERS, images=pixels)
    want = reference_logits(v01, pixels)
    for got, ref in zip(model_logits(model, batch, "two_pass"), want):
        assert rel_err(got, ref) <= TOL
    # The comparison can fail: the static-only model, and a perturbed request, are far off.
    static = model_logits(model, batch, "static")
    assert min(rel_err(g, w) for g, w in zip(static, want)) > 1e2 * TOL
    request = copy.deepcopy(v01["state"])
    request["instruction_blip22clip.bias"] += 0.5 * torch.randn(5 * C)
    got = model_logits(model, batch, "two_pass")
    assert min(rel_err(g, w) for g, w in zip(got, reference_logits(v01, pixels, request))) > 1e2 * TOL


@torch.no_grad()
@pytest.mark.parametrize("beams", [1, 3])
def test_v01_generation_matches_the_released_forward(v01, beams):
    processor, model = v01["processor"], v01["model"]
    pixels = torch.rand(2, 3, 32, 32)
    settings = dict(num_beams=beams, max_new_tokens=5, do_sample=False)
    tokens = model.generate(**processor(QUESTIONS, images=pixels), **settings)
    suppressed = [i for i in model.config.token_ids() if i is not None]  # LMEye never generates its placeholders
    for b, encoding in enumerate(reference_encodings(v01, pixels)):
        want = model.llm.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoding), **settings,
                                  suppress_tokens=suppressed, pad_token_id=processor.pad_token_id,
                                  eos_token_id=processor.eos_token_id)[0, 1:]
        assert tokens[b, :len(want)].tolist() == want.tolist()
        assert set(tokens[b, len(want):].tolist()) <= {processor.pad_token_id, processor.eos_token_id}


def test_v01_read_and_refuse(tmp_path, v01):
    checkpoint = read_released(v01["path"])
    assert (checkpoint.layout, checkpoint.epoch) == ("v0.1", 1)
    assert (checkpoint.llm_dim, checkpoint.interaction_dim, checkpoint.vision_dim) == (H, C, Q)
    assert (checkpoint.sub_features, checkpoint.num_requests, checkpoint.num_slots) == (1, 5, 5)
    # The real file holds more than the documented tensors: a key set beyond them is named.
    state = release_state(V01_SHAPES, H=H, C=C, Q=Q)
    state["query_tokens"] = torch.zeros(1, 32, Q, dtype=torch.float16)
    write_release(tmp_path / "more.pth", state, module_prefix=True)
    with pytest.raises(ValueError, match=r"against v0.1's: missing \[\], unexpected \['query_tokens'\]"):
        read_released(tmp_path / "more.pth")
    tokenizer = word_tokenizer(WORDS)
    t5 = tiny_seq2seq("t5", len(tokenizer) + 8, hidden=H)
    with pytest.raises(ValueError, match="vision: v0.1 needs the module giving BLIP-2's Q-Former tokens"):
        from_released(v01["path"], t5, clip_model(text_positions=40), tokenizer)
    with pytest.raises(ValueError, match="template: 'lmeye-v1-qa' has no request token; LMEye v0.1 reads"):
        from_released(v01["path"], t5, clip_model(text_positions=40), tokenizer,
                      vision=QFormerImageTokens.from_blip2(qformer_parts()), template="qa")
    assert len(tokenizer) == len(WORDS) + 4  # refused before any token was added
