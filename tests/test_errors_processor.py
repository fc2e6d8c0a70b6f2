"""LMEyeProcessor on the user's path: what it is given is refused by name (the argument and the index),
never tokenized as something else; each case asserts the exception type and the place."""

import pytest
import torch

from lmeye_fast.models import LMEyeProcessor
from lmeye_fast.models.processor import TokenizedRow
from lmeye_fast.models.tiny import word_tokenizer

WORDS = "what colour is it red blue".split()


def processor(**kwargs):
    return LMEyeProcessor(word_tokenizer(WORDS), num_image_tokens=3, num_requests=2, **kwargs)


@pytest.mark.parametrize("prompts, answers, named, kind", [
    (["what colour", None], None, r"prompts\[1\]: expected a string or a sequence of Turn records with string texts, "
     r"got NoneType", TypeError),
    (["what colour", 5], None, r"prompts\[1\]: expected a string or a sequence of Turn records with string texts, "
     r"got int", TypeError),
    (["what colour"], [None], r"answers\[0\]: expected a string, got NoneType", TypeError),
    ("what colour", None, "prompts: expected a sequence of strings, got one string", TypeError),
    ([], None, "prompts: expected at least one prompt", ValueError),
    (["what", "colour"], ["red"], "answers: expected 2 answers", ValueError),
])
def test_prompts_and_answers_are_checked_by_index(prompts, answers, named, kind):
    with pytest.raises(kind, match=f"^{named}"):
        processor()(prompts, answers)


def test_images_must_match_the_batch():
    with pytest.raises(ValueError, match="^images: expected a tensor with batch size 2"):
        processor()(["what", "colour"], images=torch.zeros(3, 3, 8, 8))


def test_rows_with_labels_that_do_not_match_are_named():
    rows = [TokenizedRow([1, 2], None, [3], [3]), TokenizedRow([1], None, [3, 4], [4])]
    with pytest.raises(ValueError, match=r"^rows\[1\]: 2 body tokens but 1 labels"):
        processor().pad(rows)


@pytest.mark.parametrize("kwargs, named", [
    ({"image_token": "<img>", "request_token": "<img>"}, "image_token, request_token, slot_token: expected three"),
    ({"slot_token": ""}, "slot_token: expected a non-empty string"),
    ({"request_token": None}, "request_token: expected a non-empty string"),
    ({"decoder_start_token_id": 0}, "decoder_start_token_id: only an encoder-decoder LLM"),
    ({"encoder_decoder": True, "decoder_start_token_id": -1}, "decoder_start_token_id: expected a token id"),
])
def test_construction_arguments_are_named(kwargs, named):
    with pytest.raises(ValueError, match=f"^{named}"):
        processor(**kwargs)


@pytest.mark.parametrize("name, value", [("num_image_tokens", 0), ("num_requests", 2.0)])
def test_sizes_must_be_positive_ints(name, value):
    sizes = {"num_image_tokens": 3, "num_requests": 2, name: value}
    with pytest.raises(ValueError, match=f"^{name}: expected a positive int"):
        LMEyeProcessor(word_tokenizer(WORDS), **sizes)
