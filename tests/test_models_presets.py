"""The published configuration and the patch-token variant on tiny random CLIP models (built from configs).

What is checked: which vision output each consumer reads, N=1 / S=5 / R=5 and the frozen CLIP text
interaction of the published preset, the interaction against CLIP's own text path, the schedules,
generation, save/load and the errors. Tolerance: fp32, relative error (max |a - b| / max |b|) at most
1e-4 between computations of the same quantity along different paths.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file

from lmeye_fast.models import (CLIPImageEncoder, CLIPTextInteraction, LMEyeConfig, LMEyeModel, LMEyeProcessor,
                               global_token, patch_tokens, published)
from lmeye_fast.models.modeling import ADAPTER_FILE
from lmeye_fast.models.tiny import tiny_clip, tiny_clip_model, tiny_llm, word_tokenizer

WORDS = "what colour is the circle square red blue left right answer :".split()
TOL = 1e-4


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def randomise(model, std=0.3):
    """Adapter weights large enough that the image and the IPN move the logits visibly."""
    own_ipn = [p for name, p in model.ipn.named_parameters() if not name.startswith("interaction.")]
    with torch.no_grad():
        for p in [*model.static.parameters(), model.special_embed, *own_ipn]:
            p.normal_(0.0, std)
    return model


def build(preset=published, clip=None, **kwargs):
    tok = word_tokenizer(WORDS)
    clip = clip if clip is not None else tiny_clip_model(hidden=24, text_hidden=16)
    processor, model = preset(tok, tiny_llm("llama", len(tok) + 3, hidden=32), clip, response_prefix="answer :",
                              **kwargs)
    return processor, randomise(model).eval(), clip


def batch_of(processor, images):
    prompts = ["what colour is the circle ?", "<img> where is the square", "colour ?"][:len(images)]
    return processor(prompts, ["red", "left right", "blue"][:len(images)], images=images)


def projected_embedding(clip, pixels):
    out = clip.get_image_features(pixel_values=pixels)
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


def test_published_preset_configuration():
    processor, model, clip = build()
    config = model.config
    assert (config.num_image_tokens, config.sub_features, config.num_requests) == (1, 5, 5)
    assert (config.static_feature, config.ipn_feature) == ("projected", "projected")
    assert config.interaction == "CLIPTextInteraction" and config.interaction_dim == 16
    assert config.static_vision_dim == config.vision_dim == clip.config.projection_dim
    assert model.vision.vision_model is clip.vision_model and model.vision.visual_projection is clip.visual_projection
    interaction = model.ipn.interaction
    assert isinstance(interaction, CLIPTextInteraction)
    assert interaction.encoder is clip.text_model.encoder and interaction.text_projection is clip.text_projection
    batch = batch_of(processor, torch.rand(3, 3, 32, 32))
    assert batch["image_pos"].shape == (3, 1)
    assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [1, 1, 1]
    assert (batch["input_ids"] == processor.slot_token_id).sum(dim=1).tolist() == [5, 5, 5]


def test_one_vision_pass_serves_both_consumers():
    _, model, clip = build()
    model.config.static_feature, model.config.ipn_feature = "projected", "tokens"
    calls = []
    hook = clip.vision_model.register_forward_hook(lambda *args: calls.append(1))
    pixels = torch.rand(2, 3, 32, 32)
    features = model.encode_images(pixels)
    hook.remove()
    assert len(calls) == 1
    assert rel_err(features["static_features"][:, 0], projected_embedding(clip, pixels)) <= 1e-6
    assert torch.equal(features["image_features"], clip.vision_model(pixel_values=pixels).last_hidden_state)


def test_clip_text_interaction_is_clips_text_encoder():
    """Sub-features and a request that are CLIP token embeddings give exactly CLIP's text features of those tokens."""
    clip = tiny_clip_model(hidden=24, text_hidden=16)
    interaction = CLIPTextInteraction(clip, num_requests=3)
    words = torch.randint(1, clip.config.text_config.bos_token_id, (2, 4 + 3))  # 4 sub-features, 3 requests
    sequence = clip.text_model.embeddings.token_embedding(words).detach()
    out = interaction(sequence, None)
    assert out.shape == (2, 3, 16)
    bos, eos = clip.config.text_config.bos_token_id, clip.config.text_config.eos_token_id
    for j in range(3):
        ids = torch.cat([torch.full((2, 1), bos), words[:, :4], words[:, 4 + j:5 + j], torch.full((2, 1), eos)], 1)
        want = clip.get_text_features(input_ids=ids)
        want = getattr(want, "pooler_output", want)
        assert rel_err(out[:, j], want) <= TOL


def test_clip_text_interaction_mask_hides_image_tokens():
    clip = tiny_clip_model(hidden=24, text_hidden=16)
    interaction = CLIPTextInteraction(clip, num_requests=2)
    sequence = torch.randn(3, 5 + 2, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 1] = False
    mask[2, :5] = False  # every image token of a row masked: the requests still see start and themselves
    changed = sequence.clone()
    changed[:, 1] += torch.randn(3, 16)  # not a constant shift, which CLIP's layer norms would remove
    changed[2, :5] += torch.randn(5, 16)
    out, again = interaction(sequence, mask), interaction(changed, mask)
    assert torch.isfinite(out).all()
    assert rel_err(again, out) <= 1e-6
    assert rel_err(interaction(changed, None), interaction(sequence, None)) > 1e-3


def test_published_dataflow_by_hand():
    """The model's single-pass logits against the released dataflow written out step by step."""
    processor, model, clip = build()
    pixels = torch.rand(2, 3, 32, 32)
    batch = batch_of(processor, pixels)
    got = model(**batch, all_logits=True).logits

    image = projected_embedding(clip, pixels)                                 # (B, Dv): one vector per image
    llm = model.llm
    embeds = model.embed(batch["input_ids"]).clone()
    rows = torch.arange(2)
    embeds[rows, batch["image_pos"][:, 0]] += model.static.proj(image)        # the single <img> token
    hidden = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], output_hidden_states=True).hidden_states[-1]
    ipn = model.ipn
    request = ipn.request_proj(hidden[rows, batch["request_pos"]]).view(2, 5, -1)    # R=5 requests
    sub_features = ipn.decompose_proj(image).view(2, 5, -1)                   # N=1 token, S=5 sub-features
    z = ipn.interaction(torch.cat([sub_features, request], dim=1), None)
    tokens = ipn.transmit_proj(z) + ipn.slot_embed
    for j in range(5):
        embeds[rows, batch["slot_pos"][:, j]] += tokens[:, j]
    want = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
               position_ids=batch["position_ids"]).logits
    keep = batch["attention_mask"].bool()
    assert rel_err(got[keep], want[keep]) <= TOL


@pytest.mark.parametrize("features", [("projected", "projected"), ("projected", "tokens"), ("pooled", "tokens")])
def test_schedules_agree_when_consumers_read_different_features(features):
    tok = word_tokenizer(WORDS)
    clip = tiny_clip_model(hidden=24, text_hidden=16)
    static_feature, ipn_feature = features
    count = 1 if static_feature != "tokens" else 17
    processor = LMEyeProcessor(tok, num_image_tokens=count, num_requests=3, response_prefix="answer :")
    config = processor.make_config(interaction_dim=8, num_heads=2, sub_features=2, static_feature=static_feature,
                                   ipn_feature=ipn_feature)
    model = randomise(LMEyeModel(tiny_llm("llama", len(tok), hidden=32), config, vision=clip)).eval()
    assert model.config.static_vision_dim == (16 if static_feature == "projected" else 24)
    assert model.config.vision_dim == (16 if ipn_feature == "projected" else 24)
    model.set_stage(2, train_special_tokens=True)
    batch = batch_of(processor, torch.rand(3, 3, 32, 32))
    outs = {}
    for schedule in ("single_pass", "two_pass"):
        model.zero_grad(set_to_none=True)
        out = model(**batch, schedule=schedule)
        out.loss.backward()
        outs[schedule] = out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.requires_grad}
    (a, grads_a), (b, grads_b) = outs["single_pass"], outs["two_pass"]
    assert rel_err(a, b) <= TOL
    assert all(rel_err(grads_a[n], grads_b[n]) <= TOL for n in grads_b)
    features = model.encode_images(batch["pixel_values"])
    by_features = {k: v for k, v in batch.items() if k != "pixel_values"}
    assert rel_err(model(**by_features, **features).logits, a) <= TOL
    prompt = processor(["what colour is the circle ?", "where"], images=batch["pixel_values"][:2])
    generated = [model.generate(**prompt, schedule=s, max_new_tokens=3, do_sample=False)
                 for s in ("single_pass", "two_pass")]
    assert torch.equal(generated[0], generated[1])


def test_interaction_stays_frozen_through_set_stage_and_is_not_saved(tmp_path):
    processor, model, clip = build()
    interaction = model.ipn.interaction
    for stage in (2, 1, 2):
        model.set_stage(stage, train_special_tokens=True)
        assert not any(p.requires_grad for p in interaction.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".interaction." in n or n.startswith(("llm.", "vision.")) for n in trainable)
    batch = batch_of(processor, torch.rand(2, 3, 32, 32))
    model(**batch).loss.backward()
    assert model.ipn.request_proj.weight.grad.abs().sum() > 0  # the gradient runs through the frozen encoder
    assert all(p.grad is None for p in interaction.parameters())

    model.save_pretrained(tmp_path)
    assert not any("interaction" in k for k in load_file(str(tmp_path / ADAPTER_FILE)))
    restored = LMEyeModel.from_pretrained(tmp_path, llm=copy.deepcopy(model.llm), vision=CLIPImageEncoder(clip),
                                          interaction=CLIPTextInteraction(clip, 5)).eval()
    assert rel_err(restored(**batch).logits, model(**batch).logits) <= 1e-6


def test_trainable_interaction_trains_and_is_saved(tmp_path):
    tok = word_tokenizer(WORDS)
    clip = tiny_clip_model(hidden=24, text_hidden=16)
    processor = LMEyeProcessor(tok, num_image_tokens=1, num_requests=5, response_prefix="answer :")
    config = processor.make_config(interaction_dim=16, num_heads=1, sub_features=5, static_feature="projected",
                                   ipn_feature="projected")
    interaction = CLIPTextInteraction(clip, 5, trainable=True)
    model = LMEyeModel(tiny_llm("llama", len(tok), hidden=32), config, vision=CLIPImageEncoder(clip),
                       interaction=interaction)
    model.set_stage(2)
    assert all(p.requires_grad for p in interaction.parameters())
    model.save_pretrained(tmp_path)
    assert any(k.startswith("ipn.interaction.") for k in load_file(str(tmp_path / ADAPTER_FILE)))


def test_patch_token_preset():
    processor, model, clip = build(patch_tokens, clip=tiny_clip(hidden=24), num_requests=3, interaction_dim=8,
                                   num_heads=2)
    assert model.config.num_image_tokens == 17 and processor.num_image_tokens == 17
    assert (model.config.static_feature, model.config.ipn_feature) == ("tokens", "tokens")
    assert model.ipn.interaction is None
    batch = batch_of(processor, torch.rand(2, 3, 32, 32))
    assert batch["image_pos"].shape == (2, 17)
    assert rel_err(model(**batch).logits, model(**batch, schedule="two_pass").logits) <= TOL


def test_global_token_preset():
    """One global <img> token from CLIP's projected embedding; the IPN attends over all 17 tokens, and it
    is the IPN that carries what the global token leaves out: changing one patch token moves the answer
    only through it."""
    processor, model, clip = build(global_token, num_requests=3, interaction_dim=8, num_heads=2)
    config = model.config
    assert (config.num_image_tokens, processor.num_image_tokens, config.num_requests) == (1, 1, 3)
    assert (config.static_feature, config.ipn_feature) == ("projected", "tokens")
    assert config.static_vision_dim == clip.config.projection_dim and config.vision_dim == 24
    assert model.ipn.interaction is None
    batch = batch_of(processor, torch.rand(2, 3, 32, 32))
    assert batch["image_pos"].shape == (2, 1) and batch["slot_pos"].shape == (2, 3)
    features = {k: v.clone() for k, v in model.encode_images(batch["pixel_values"]).items()}
    assert features["image_features"].shape == (2, 17, 24) and features["static_features"].shape == (2, 1, 16)
    text = {k: v for k, v in batch.items() if k != "pixel_values"}
    logits = model(**text, **features).logits
    assert rel_err(logits, model(**batch, schedule="two_pass").logits) <= TOL
    changed = {**features, "image_features": features["image_features"].clone()}
    changed["image_features"][:, 5] += torch.randn(2, 24)
    assert rel_err(model(**text, **changed).logits, logits) > 1e-3
    assert torch.equal(model(**text, **changed, schedule="static").logits,
                       model(**text, **features, schedule="static").logits)
    with pytest.raises(ValueError, match="clip: expected a CLIPModel or CLIPVisionModelWithProjection"):
        global_token(word_tokenizer(WORDS), tiny_llm("llama", 20), tiny_clip())


def test_bad_feature_configuration_is_refused_by_name():
    tok = word_tokenizer(WORDS)
    clip = tiny_clip_model(hidden=24, text_hidden=16)
    processor = LMEyeProcessor(tok, num_image_tokens=17, num_requests=2)
    with pytest.raises(ValueError, match="static_feature"):
        processor.make_config(static_feature="cls")
    config = processor.make_config(interaction_dim=8, num_heads=2, static_feature="projected")
    with pytest.raises(ValueError, match="num_image_tokens"):
        LMEyeModel(tiny_llm("llama", len(tok)), config, vision=clip)
    one = LMEyeProcessor(tok, num_image_tokens=1, num_requests=2)
    with pytest.raises(ValueError, match="projected"):  # a vision tower without CLIP's projection
        LMEyeModel(tiny_llm("llama", len(tok)), one.make_config(interaction_dim=8, num_heads=2,
                                                                static_feature="projected"), vision=tiny_clip())
    model = LMEyeModel(tiny_llm("llama", len(tok)), one.make_config(
        interaction_dim=8, num_heads=2, static_feature="projected", ipn_feature="tokens"), vision=clip)
    batch = one(["what colour"], ["red"])
    with pytest.raises(ValueError, match="static_features"):
        model(**batch, image_features=torch.randn(1, 17, 24))
    with pytest.raises(ValueError, match="static_features"):
        model(**batch, image_features=torch.randn(1, 17, 24), static_features=torch.randn(1, 1, 24))
    with pytest.raises(ValueError, match="clip"):
        CLIPTextInteraction(tiny_clip(), 5)


def test_configs_written_with_one_vision_feature_still_load():
    legacy = LMEyeConfig(num_image_tokens=1, vision_dim=12).to_dict()
    for key in ("static_feature", "ipn_feature", "static_vision_dim"):
        legacy.pop(key)
    legacy["vision_feature"] = "pooled"
    config = LMEyeConfig.from_dict(legacy)
    assert (config.static_feature, config.ipn_feature, config.static_vision_dim) == ("pooled", "pooled", 12)
