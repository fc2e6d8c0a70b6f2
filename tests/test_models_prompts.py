"""PromptTemplate: where the image, the question, the request token, the slots and the response prefix go."""

import random

import pytest
import torch

from lmeye_fast.models import LMEyeProcessor, PromptTemplate, Turn
from lmeye_fast.models.processor import IGNORE_INDEX
from lmeye_fast.models.prompts import PROMPT_TEMPLATES
from lmeye_fast.models.tiny import word_tokenizer

WORDS = ("image as evidence : question answer is what colour the circle red blue ? USER ASSISTANT "
         "Human Assistant USER: ASSISTANT:").split()


def words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def processor(template, **kwargs):
    tok = word_tokenizer(WORDS)
    return tok, LMEyeProcessor(tok, num_image_tokens=2, num_requests=3, template=template, **kwargs)


def test_a_released_style_layout_without_request_token_or_bos():
    """Text before the image, the image tokens, text between the image and the question, the question,
    the slots without a request token before them, the response prefix after them; no BOS."""
    qa = PromptTemplate(first_turn="image as evidence : {image} question : {question}", response_prefix="answer :",
                        request_token=False, add_bos=False, name="qa")
    tok, proc = processor(qa)
    batch = proc(["what colour is the circle ?"])
    img, slot = proc.image_token_id, proc.slot_token_id
    expected = (words(tok, "image as evidence :") + [img, img] + words(tok, "question : what colour is the circle ?")
                + [slot] * 3 + words(tok, "answer :"))
    assert batch["input_ids"][0].tolist() == expected
    prefix_len = batch["prefix_len"]
    assert prefix_len == len(expected) - 3 - 2
    assert batch["request_pos"].tolist() == [prefix_len]  # the first slot reads the request
    assert batch["slot_pos"][0].tolist() == [prefix_len, prefix_len + 1, prefix_len + 2]
    assert proc.prompt_text(expected).startswith("image as evidence : <img> <img> question")


def test_the_question_marks_the_image_unless_the_template_places_it():
    tok, plain = processor("plain", response_prefix="answer :")
    img = plain.image_token_id
    ids, start = plain.prefix_ids("what is <image>\nthe circle")
    assert ids[start:start + 2] == [img, img] and ids[:start] == [tok.bos_token_id] + words(tok, "what is")
    assert plain.prefix_ids("what is <img> the circle") == (ids, start)
    ids, start = plain.prefix_ids("the circle")
    assert start == 1  # after BOS: the image goes first

    tok, vicuna = processor("vicuna")
    for question in ("<image>\nwhat colour ?", "what colour ?\n<image>", "what colour ?"):
        ids, start = vicuna.prefix_ids(question)
        assert ids[:start] == [tok.bos_token_id] + words(tok, "USER:")
        assert ids[start + 2:] == words(tok, "what colour ?") + [vicuna.request_token_id]
    with pytest.raises(ValueError, match="places the image itself"):
        vicuna.prefix_ids("what <img> colour")
    with pytest.raises(ValueError, match="without image"):
        vicuna.prefix_ids("<image>\nwhat", image=False)


def test_multi_turn_rows_label_every_answer_and_end_prompts_with_the_response_prefix():
    tok, proc = processor("vicuna")
    turns = [Turn("<image>\nwhat colour ?", "red"), Turn("the circle ?", "blue"), Turn("what ?")]
    row = proc.row(turns)
    eos = tok.eos_token_id
    response = words(tok, "ASSISTANT:")
    assert row.body == ([proc.slot_token_id] * 0 + response + words(tok, "red") + [eos]
                        + words(tok, "USER: the circle ?") + response + words(tok, "blue") + [eos]
                        + words(tok, "USER: what ?") + response)
    labelled = [token for token, label in zip(row.body, row.body_labels) if label != IGNORE_INDEX]
    assert labelled == words(tok, "red") + [eos] + words(tok, "blue") + [eos]
    # The prompt of turn k is the training row up to answer k, token for token.
    whole = proc.row(turns[:2] + [Turn("what ?", "red")])
    assert whole.prefix == row.prefix and whole.body[:len(row.body)] == row.body
    with pytest.raises(ValueError, match="only the last turn"):
        proc.row([Turn("what"), Turn("is")])


def test_prompts_of_different_lengths_end_in_the_last_column():
    tok, proc = processor("vicuna")
    short = [Turn("what ?")]
    long = [Turn("what ?", "red"), Turn("the circle ?")]
    batch = proc([short, long])
    assert batch["attention_mask"][:, -1].all()
    prefix_len = batch["prefix_len"]
    tail = words(tok, "ASSISTANT:")
    assert batch["input_ids"][0, -len(tail):].tolist() == tail == batch["input_ids"][1, -len(tail):].tolist()
    # The short row waits in padding between its slots and its body.
    gap = batch["attention_mask"][0, prefix_len + 3:-len(tail)]
    assert not gap.any() and len(gap) > 0


def test_templates_refuse_what_they_cannot_lay_out():
    with pytest.raises(ValueError, match=r"\{question\} exactly once"):
        PromptTemplate(first_turn="{image} what")
    with pytest.raises(ValueError, match=r"may hold only \{question\}"):
        PromptTemplate(later_turn="{image}{question}")
    with pytest.raises(ValueError, match="at most once"):
        PromptTemplate(first_turn="{image}{question}{image}")
    with pytest.raises(ValueError, match="spells out one of LMEye's tokens"):
        processor(PromptTemplate(first_turn="<img-d> {question}"))[1].prefix_ids("what")


@pytest.mark.parametrize("name", sorted(PROMPT_TEMPLATES))
def test_save_pretrained_and_from_pretrained_keep_the_template(tmp_path, name):
    tok, proc = processor(name)
    proc.save_pretrained(tmp_path)
    loaded = LMEyeProcessor.from_pretrained(tmp_path)
    assert loaded.template == proc.template and loaded.to_dict() == proc.to_dict()
    question = random.choice(["<image>\nwhat colour ?", "what is the circle ?"])
    assert loaded.row([Turn(question, "red")]) == proc.row([Turn(question, "red")])
    assert LMEyeProcessor.from_pretrained(tmp_path, template=name).template == proc.template
    with pytest.raises(ValueError, match=r"^response_prefix: .* was saved with .*, but 'Answer:' was asked for"):
        LMEyeProcessor.from_pretrained(tmp_path, response_prefix="Answer:")
    with pytest.raises(ValueError, match="^num_image_tokens: .* saved with 2, but 7"):
        LMEyeProcessor.from_pretrained(tmp_path, num_image_tokens=7)


@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
def test_prompts_padded_after_their_slots_answer_as_they_do_alone(schedule):
    """Conversations of different lengths in one batch (the shorter waits in padding between its slots and
    its body) generate the tokens and get the option scores each gets alone."""
    from lmeye_fast.models import LMEyeModel
    from lmeye_fast.models.scoring import score_options
    from lmeye_fast.models.tiny import tiny_llm

    tok, proc = processor("vicuna")
    model = LMEyeModel(tiny_llm("llama", len(tok), hidden=32), proc.make_config(interaction_dim=8, num_heads=2,
                                                                                  vision_dim=6)).eval()
    with torch.no_grad():
        for p in list(model.ipn.parameters()) + [model.special_embed]:
            p.normal_(0.0, 0.3)
    prompts = [[Turn("what ?")], [Turn("<image>\nwhat colour ?", "red blue"), Turn("the circle is what ?")],
               [Turn("what colour ?", "red"), Turn("blue ?", "the"), Turn("red ?")]]
    features = torch.randn(len(prompts), 2, 6)
    options = [["red", "blue circle"], ["the"], ["red ?", "blue", "circle red"]]
    batch = proc(prompts)
    together = model.generate(**batch, image_features=features, schedule=schedule, max_new_tokens=3,
                              do_sample=False)
    scores = score_options(model, proc, prompts, options, image_features=features, schedule=schedule)
    for index, prompt in enumerate(prompts):
        alone = model.generate(**proc([prompt]), image_features=features[index:index + 1], schedule=schedule,
                               max_new_tokens=3, do_sample=False)
        # A row that ends (EOS) before the batch does is padded after its end; alone it just ends.
        length = alone.shape[1]
        assert together[index, :length].tolist() == alone[0].tolist()
        assert (together[index, length:] == proc.tokenizer.pad_token_id).all()
        single = score_options(model, proc, [prompt], options[index:index + 1],
                               image_features=features[index:index + 1], schedule=schedule)
        torch.testing.assert_close(scores.summed[index], single.summed[0], rtol=1e-4, atol=1e-5)


def test_encoder_decoder_rows_put_the_response_prefix_in_the_encoder():
    qa = PromptTemplate(first_turn="image as evidence : {image} question : {question}", response_prefix="answer :",
                        request_token=False, add_bos=False, name="qa")
    tok, proc = processor(qa, encoder_decoder=True, decoder_start_token_id=0)
    batch = proc(["what colour ?", "the circle is what colour ?"], ["red", "blue"])
    slot, eos = proc.slot_token_id, tok.eos_token_id
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row[-6:] == [slot] * 3 + words(tok, "answer :") + [eos]
    assert batch["request_pos"].tolist() == batch["slot_pos"][:, 0].tolist()  # the first slot reads the request
    assert proc.row([Turn("what ?", "red")]).body == words(tok, "red") + [eos]
    with pytest.raises(ValueError, match="one question at a time"):
        proc([[Turn("what ?", "red"), Turn("blue ?")]])
