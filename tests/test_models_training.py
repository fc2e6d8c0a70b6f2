"""Both training stages on a tiny CLIP + Llama: the loss falls and only the stage's parameters move."""

import pytest
import torch

from lmeye_fast.models import LMEyeModel, LMEyeProcessor, train
from lmeye_fast.models.tiny import tiny_clip, tiny_llm, word_tokenizer

WORDS = "what colour is the circle square red blue green left right answer : a".split()


def setup():
    tok = word_tokenizer(WORDS)
    proc = LMEyeProcessor(tok, num_image_tokens=5, num_requests=2, response_prefix="answer :")
    vision = tiny_clip(image_size=16, patch_size=8, hidden=24)
    # A wider initialisation than the default lets the adapter steer the tiny random LLM.
    llm = tiny_llm("llama", len(tok), initializer_range=0.3)
    model = LMEyeModel(llm, proc.make_config(interaction_dim=16, num_heads=2),
                       vision=vision)
    images = torch.rand(6, 3, 16, 16)
    batches = [proc(["what colour is the circle", "<img> what is left", "the square"],
                    ["red", "blue green", "a circle"], images=images[:3]),
               proc(["colour", "what is right", "what colour"], ["green", "red", "square left"], images=images[3:])]
    return model, batches


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_trains_only_its_parameters(stage):
    model, batches = setup()
    model.set_stage(stage, train_special_tokens=True)
    llm, vision, static, ipn = (snapshot(m) for m in (model.llm, model.vision, model.static, model.ipn))
    special = model.special_embed.detach().clone()
    losses = train(model, batches, steps=40, lr=3e-2, warmup_steps=5, progress=False)
    assert losses.shape == (40,) and torch.isfinite(losses).all()
    assert losses[-4:].mean() < 0.8 * losses[:4].mean()
    assert not changed(llm, model.llm) and not changed(vision, model.vision)
    if stage == 1:
        assert changed(static, model.static) and not changed(ipn, model.ipn)
        assert torch.equal(special, model.special_embed)
    else:
        assert not changed(static, model.static) and changed(ipn, model.ipn)
        assert not torch.equal(special, model.special_embed)


def test_train_needs_trainable_parameters_and_labels():
    model, batches = setup()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="set_stage"):
        train(model, batches, steps=1, progress=False)
    model.set_stage(2)
    unlabeled = [{k: v for k, v in batches[0].items() if k != "labels"}]
    with pytest.raises(ValueError, match="labels"):
        train(model, unlabeled, steps=1, progress=False)
