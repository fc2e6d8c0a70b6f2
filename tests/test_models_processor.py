"""LMEyeProcessor: special tokens, the left/right-padded layout, labels, positions, bad input."""

import random

import pytest
import torch

from lmeye_fast.models import IGNORE_INDEX, LMEyeModel, LMEyeProcessor
from lmeye_fast.models.tiny import tiny_llm, word_tokenizer

WORDS = "what colour is the circle square red blue green left right where ? answer :".split()


def sentence(low, high):
    return " ".join(random.choice(WORDS) for _ in range(random.randint(low, high)))


def make(num_image_tokens=5, num_requests=3, response_prefix="answer :"):
    tok = word_tokenizer(WORDS)
    return tok, LMEyeProcessor(tok, num_image_tokens=num_image_tokens, num_requests=num_requests,
                               response_prefix=response_prefix)


def test_special_tokens_added_once_and_embeddings_resized():
    tok, proc = make()
    before = len(tok)
    assert len(set(proc.make_config().token_ids())) == 3
    again = LMEyeProcessor(tok, num_image_tokens=5)
    assert len(tok) == before and again.make_config().token_ids() == proc.make_config().token_ids()
    llm = tiny_llm("llama", vocab_size=before - 3)
    model = LMEyeModel(llm, proc.make_config(interaction_dim=8, num_heads=2, vision_dim=6))
    assert model.llm.get_input_embeddings().num_embeddings >= len(tok)
    assert model.llm.get_output_embeddings().weight.shape[0] >= len(tok)


@pytest.mark.parametrize("num_image_tokens,num_requests", [(1, 1), (5, 3), (17, 2)])
def test_training_layout(num_image_tokens, num_requests):
    tok, proc = make(num_image_tokens, num_requests)
    batch_size = 5
    prompts = [sentence(0, 7) for _ in range(batch_size)]
    prompts[1] = "where is <img> the " + sentence(1, 4)
    answers = [sentence(1, 5) for _ in range(batch_size)]
    batch = proc(prompts, answers, images=torch.randn(batch_size, 3, 4, 4))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix_len = batch["prefix_len"]
    img, req, slot = proc.image_token_id, proc.request_token_id, proc.slot_token_id
    rows = torch.arange(batch_size)

    assert torch.equal(batch["request_pos"], torch.full((batch_size,), prefix_len - 1))
    assert (ids[:, prefix_len - 1] == req).all()
    assert torch.equal(batch["slot_pos"], prefix_len + torch.arange(num_requests).expand(batch_size, -1))
    assert (ids[rows[:, None], batch["slot_pos"]] == slot).all()
    assert (ids[rows[:, None], batch["image_pos"]] == img).all()
    assert ((ids == img).sum(1) == num_image_tokens).all()
    assert (batch["image_pos"] < prefix_len - 1).all()
    assert batch["pixel_values"].shape[0] == batch_size

    # Prefix left-padded, suffix right-padded: the real tokens are one contiguous run.
    prefix_mask, suffix_mask = mask[:, :prefix_len], mask[:, prefix_len:]
    assert torch.equal(prefix_mask, prefix_mask.sort(dim=1).values)
    assert torch.equal(suffix_mask, suffix_mask.sort(dim=1, descending=True).values)
    assert (ids[mask == 0] == proc.pad_token_id).all()
    assert prefix_mask.all(dim=1).any() and mask[:, -1].any(), "no column of padding only"

    real_pos = batch["position_ids"][mask.bool()]
    counts = mask.sum(1).tolist()
    assert torch.equal(real_pos, torch.cat([torch.arange(n) for n in counts]))

    # Labels: exactly the answer tokens and EOS.
    for row, answer in enumerate(answers):
        target = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert target == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (labels[:, : prefix_len + num_requests] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()


def test_generation_prompts_end_in_the_same_column():
    tok, proc = make()
    prompts = [sentence(0, 6) for _ in range(4)]
    batch = proc(prompts)
    assert "labels" not in batch
    assert (batch["attention_mask"][:, batch["prefix_len"]:] == 1).all()
    tail = batch["input_ids"][:, batch["prefix_len"] + 3:]
    assert torch.equal(tail, torch.tensor(tok("answer :", add_special_tokens=False)["input_ids"]).expand(4, -1))
    assert proc.decode(batch["input_ids"][:, -2:]) == ["answer :"] * 4


def test_bos_and_moving_to_a_device():
    tok, proc = make()
    assert proc.add_bos
    batch = proc(["what is"])
    assert batch["input_ids"][0, 0] == tok.bos_token_id
    moved = batch.to("cpu")
    assert moved["prefix_len"] == batch["prefix_len"] and torch.equal(moved["input_ids"], batch["input_ids"])
    assert LMEyeProcessor(tok, num_image_tokens=2, add_bos=False)(["what is"])["input_ids"][0, 0] != tok.bos_token_id


def test_bad_input():
    tok, proc = make()
    with pytest.raises(ValueError, match="at most one '<image>' or '<img>'"):
        proc(["<img> what <img>"])
    with pytest.raises(ValueError, match="answers"):
        proc(["what", "is"], ["red"])
    with pytest.raises(TypeError, match="prompts"):
        proc("what")
    with pytest.raises(ValueError, match="prompts"):
        proc([])
    with pytest.raises(ValueError, match="images"):
        proc(["what", "is"], images=torch.randn(3, 3, 4, 4))
    with pytest.raises(ValueError, match="num_requests"):
        LMEyeProcessor(tok, num_image_tokens=2, num_requests=0)
    with pytest.raises(ValueError, match="make_config"):
        config = proc.make_config()
        config.slot_token_id = None
        LMEyeModel(tiny_llm("gpt2", len(tok)), config)
