"""generate(): the single pass prefills the prefix, runs the IPN and continues on the cache.

Greedy tokens must be identical to two-pass generation (tiny fp32 models, batch of
rows of different lengths); sampling is checked for reproducibility and against
greedy decoding with top_k=1.
"""

import random

import pytest
import torch

from lmeye_fast.models import LMEyeModel, LMEyeProcessor
from lmeye_fast.models.tiny import ARCHITECTURES, tiny_clip, tiny_llm, word_tokenizer

WORDS = "what colour is the circle square red blue green left right where ? answer :".split()
NEW_TOKENS = 6


def build(arch, vision=None):
    tok = word_tokenizer(WORDS)
    image_tokens = 17 if vision is not None else 5
    proc = LMEyeProcessor(tok, num_image_tokens=image_tokens, num_requests=3, response_prefix="answer :")
    config = proc.make_config(interaction_dim=16, num_heads=2, vision_dim=None if vision is not None else 19)
    model = LMEyeModel(tiny_llm(arch, len(tok), hidden=48), config, vision=vision)
    with torch.no_grad():
        for p in list(model.static.parameters()) + list(model.ipn.parameters()) + [model.special_embed]:
            p.normal_(0.0, 0.3)
    return proc, model.eval()


def prompts(count=3):
    lengths = random.sample(range(1, 9), count)
    return [" ".join(random.choice(WORDS) for _ in range(n)) for n in lengths]


def features(model, batch):
    return torch.randn(batch, model.config.num_image_tokens, model.config.vision_dim)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_single_pass_equals_two_pass(arch):
    proc, model = build(arch)
    batch = proc(prompts())
    image = features(model, 3)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    single = model.generate(**batch, image_features=image, **kwargs)
    two = model.generate(**batch, image_features=image, schedule="two_pass", **kwargs)
    assert single.shape == (3, NEW_TOKENS)
    assert torch.equal(single, two)
    # The first token is the argmax of the forward's last column, EOS barred by min_new_tokens and LMEye's own
    # tokens by generate (they are never generated).
    last = model(**batch, image_features=image).logits[:, -1]
    last[:, [proc.eos_token_id, proc.image_token_id, proc.request_token_id, proc.slot_token_id]] = float("-inf")
    assert torch.equal(single[:, 0], last.argmax(-1))


def test_sampling_reproducible_and_top_k_one_is_greedy():
    proc, model = build("llama")
    batch = proc(prompts())
    image = features(model, 3)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    torch.manual_seed(7)
    first = model.generate(**batch, image_features=image, do_sample=True, temperature=1.5, **kwargs)
    torch.manual_seed(7)
    second = model.generate(**batch, image_features=image, do_sample=True, temperature=1.5, **kwargs)
    assert torch.equal(first, second)
    assert ((first >= 0) & (first < len(proc))).all()
    greedy = model.generate(**batch, image_features=image, do_sample=False, **kwargs)
    top1 = model.generate(**batch, image_features=image, do_sample=True, top_k=1, **kwargs)
    assert torch.equal(greedy, top1)


def test_generation_from_pixels_with_a_clip_tower_and_static_schedule():
    proc, model = build("gpt2", vision=tiny_clip())
    batch = proc(prompts(2), images=torch.randn(2, 3, 32, 32))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    single = model.generate(**batch, **kwargs)
    assert torch.equal(single, model.generate(**batch, schedule="two_pass", **kwargs))
    static = model.generate(**batch, schedule="static", **kwargs)
    assert static.shape == single.shape
    assert len(proc.decode(single)) == 2


def test_a_streamer_receives_the_generated_tokens_on_every_schedule():
    from transformers import TextIteratorStreamer

    proc, model = build("llama", vision=tiny_clip())
    batch = proc(prompts(1), images=torch.randn(1, 3, 32, 32))
    for schedule in ("single_pass", "two_pass", "static"):
        streamer = TextIteratorStreamer(proc.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
        tokens = model.generate(**batch, schedule=schedule, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                streamer=streamer)
        assert "".join(streamer) == proc.decode(tokens)[0]


def test_attention_weights_are_those_of_the_request_the_llm_makes():
    proc, model = build("qwen2", vision=tiny_clip())
    batch = proc(prompts(2), images=torch.randn(2, 3, 32, 32))
    weights = model.attention_weights(**batch)
    assert weights.shape == (2, 2, 3, 17)  # (B, H, R, M*S)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 3))
    # Independently: the whole prompt through the causal LLM (its prefix columns are the single pass's).
    images = model.encode_images(batch["pixel_values"])
    embeds = model.static(images["static_features"], model.embed(batch["input_ids"]), batch["image_pos"])
    hidden = model.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).last_hidden_state
    expected = model.ipn.attention_weights(hidden, images["image_features"], request_pos=batch["request_pos"])
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)


def test_max_new_tokens_beyond_the_llms_positions_is_refused():
    proc, model = build("gpt2")  # learned positions: 256 of them
    batch = proc(prompts(1))
    room = 256 - batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"max_new_tokens: .*max_new_tokens={room + 1} .*256 positions"):
        model.generate(**batch, image_features=features(model, 1), max_new_tokens=room + 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_search_and_several_sequences_on_the_single_pass(arch):
    proc, model = build(arch)
    batch = proc(prompts())
    image = features(model, 3)
    beams = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
    single = model.generate(**batch, image_features=image, **beams)
    assert torch.equal(single, model.generate(**batch, image_features=image, schedule="two_pass", **beams))
    several = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=3, num_return_sequences=2)
    single = model.generate(**batch, image_features=image, **several)
    assert single.shape == (6, NEW_TOKENS)
    assert torch.equal(single, model.generate(**batch, image_features=image, schedule="two_pass", **several))


def test_lmeyes_tokens_are_suppressed_beside_those_the_llm_or_the_caller_suppresses():
    """LMEye's tokens join the generation config's (or the caller's) suppressed tokens, never replace them."""
    proc, model = build("llama")
    batch = proc(prompts())
    image = features(model, 3)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    free = model.generate(**batch, image_features=image, **kwargs)
    chosen = free[0, 0].item()  # a token greedy decoding picks, so suppressing it shows
    model.llm.generation_config.suppress_tokens = [chosen]
    barred = model.generate(**batch, image_features=image, **kwargs)
    assert not torch.isin(barred, torch.tensor([chosen, *model.config.token_ids()])).any()
    model.llm.generation_config.suppress_tokens = None
    asked = model.generate(**batch, image_features=image, suppress_tokens=[chosen], **kwargs)
    assert torch.equal(asked, barred)
