"""Shared-prefix option scoring equals one full two-pass run per option.

Tiny random fp32 models of several architectures, prompts of different
lengths, questions with different numbers of options of different token
lengths (so the repeated cache rows and the right padding are both exercised).
Encoder-decoder LLMs (tiny T5 and BART): the scores equal a plain loop of one
``model(**batch, labels=option)`` per (question, option), with the encoder run
twice for the whole batch. Tolerance: relative 1e-4 on each option's summed
log-likelihood.
"""

import random

import pytest
import torch

from lmeye_fast.models import LMEyeModel, LMEyeProcessor
from lmeye_fast.models.scoring import answer_log_likelihood, score_options
from lmeye_fast.models.tiny import SEQ2SEQ_ARCHITECTURES, tiny_llm, word_tokenizer
from test_models_schedules import sentence
from test_models_seq2seq import build as build_seq2seq
from test_models_seq2seq import encoder_inputs
from test_models_seq2seq import prompts as seq2seq_prompts

WORDS = "what colour is the circle square red blue green yellow left right where ? answer : dark light".split()
ANSWER_WORDS = "red blue green yellow left right dark light circle square".split()


def build(arch):
    tok = word_tokenizer(WORDS)
    proc = LMEyeProcessor(tok, num_image_tokens=5, num_requests=3, response_prefix="answer :")
    config = proc.make_config(interaction_dim=16, num_heads=2, vision_dim=19)
    model = LMEyeModel(tiny_llm(arch, len(tok), hidden=48), config)
    with torch.no_grad():
        for p in list(model.static.parameters()) + list(model.ipn.parameters()) + [model.special_embed]:
            p.normal_(0.0, 0.3)
    return proc, model.eval()


def random_questions(count, max_words=4):
    prompts = [" ".join(random.choice(WORDS) for _ in range(random.randint(1, 8))) for _ in range(count)]
    options = [[" ".join(random.choices(ANSWER_WORDS, k=random.randint(1, max_words)))
                for _ in range(random.randint(2, 5))] for _ in range(count)]
    return prompts, options


def one_run_per_option(proc, model, prompts, options, image, schedule):
    """Each option on its own: a full forward of (prompt, option) under ``schedule``."""
    summed, lengths = [], []
    for row, (prompt, choices) in enumerate(zip(prompts, options)):
        for option in choices:
            batch = proc([prompt], [option])
            ll, n = answer_log_likelihood(model, {**batch, "image_features": image[row:row + 1]}, schedule=schedule)
            summed.append(ll[0])
            lengths.append(n[0])
    return torch.stack(summed), torch.stack(lengths)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_shared_prefix_equals_a_two_pass_run_per_option(arch):
    proc, model = build(arch)
    prompts, options = random_questions(3)
    image = torch.randn(3, 5, 19)
    scores = score_options(model, proc, prompts, options, image_features=image)
    assert [len(s) for s in scores.summed] == [len(c) for c in options]
    expected, lengths = one_run_per_option(proc, model, prompts, options, image, "two_pass")
    torch.testing.assert_close(torch.cat(scores.summed), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(scores.num_tokens), lengths.float())
    assert (lengths > 0).all() and (expected < 0).all()


def test_single_token_options_and_the_static_schedule():
    proc, model = build("llama")
    prompts, options = random_questions(4, max_words=1)
    image = torch.randn(4, 5, 19)
    scores = score_options(model, proc, prompts, options, image_features=image)
    expected, _ = one_run_per_option(proc, model, prompts, options, image, "single_pass")
    torch.testing.assert_close(torch.cat(scores.summed), expected, rtol=1e-4, atol=1e-5)
    static = score_options(model, proc, prompts, options, image_features=image, schedule="static")
    expected_static, _ = one_run_per_option(proc, model, prompts, options, image, "static")
    torch.testing.assert_close(torch.cat(static.summed), expected_static, rtol=1e-4, atol=1e-5)
    # The IPN's slots change the scores: the static scores are not those of the full model.
    assert not torch.allclose(torch.cat(static.summed), expected, rtol=1e-3)


def test_the_image_changes_the_scores_and_normalisation_divides_by_length():
    proc, model = build("llama")
    prompts, options = random_questions(2)
    first = score_options(model, proc, prompts, options, image_features=torch.randn(2, 5, 19))
    second = score_options(model, proc, prompts, options, image_features=torch.randn(2, 5, 19))
    assert not torch.allclose(torch.cat(first.summed), torch.cat(second.summed))
    for summed, count, norm in zip(first.summed, first.num_tokens, first.normalised):
        torch.testing.assert_close(norm, summed / count)


def test_bad_options_are_refused_by_name():
    proc, model = build("llama")
    image = torch.randn(2, 5, 19)
    with pytest.raises(ValueError, match="options: expected 2 lists"):
        score_options(model, proc, ["red", "blue"], [["red"]], image_features=image)
    with pytest.raises(ValueError, match=r"options\[1\]: expected a non-empty list"):
        score_options(model, proc, ["red", "blue"], [["red"], []], image_features=image)
    with pytest.raises(ValueError, match=r"options\[0\]: '' encodes to no token"):
        score_options(model, proc, ["red", "blue"], [["", "red"], ["blue"]], image_features=image)


def test_greedy_flags_say_whether_greedy_decoding_gives_the_option():
    proc, model = build("llama")
    prompts, options = random_questions(3)
    image = torch.randn(3, 5, 19)
    # Add each prompt's own greedy continuation as an option where it decodes to plain words.
    tokens = model.generate(**proc(prompts), image_features=image, max_new_tokens=3, min_new_tokens=3,
                            do_sample=False)
    for choices, text, ids in zip(options, proc.decode(tokens), tokens.tolist()):
        if proc.encode(text) == ids:
            choices.append(text)
    scores = score_options(model, proc, prompts, options, image_features=image)
    for row, (prompt, choices) in enumerate(zip(prompts, options)):
        for option, flag in zip(choices, scores.greedy[row].tolist()):
            batch = proc([prompt], [option])
            logits = model(**batch, image_features=image[row:row + 1], schedule="two_pass").logits[0, :-1]
            targets = batch["labels"][0, batch["prefix_len"] + 1:]
            answer = (targets != -100) & (targets != proc.eos_token_id)
            assert flag == bool((logits.argmax(-1) == targets)[answer].all()), option


def plain_seq2seq_scores(proc, model, prompts, options, image, schedule):
    """Each (question, option) on its own: ``model(**batch, labels=option)``, the log-probabilities of
    the option's tokens summed, and whether each of them is the argmax."""
    summed, greedy = [], []
    for row, (prompt, choices) in enumerate(zip(prompts, options)):
        for option in choices:
            batch = proc([prompt], [option])
            count = len(proc.encode(option))
            targets = batch["labels"][0, :count]
            logits = model(**batch, image_features=image[row:row + 1], schedule=schedule).logits[0, :count]
            summed.append(torch.log_softmax(logits, dim=-1)[torch.arange(count), targets].sum())
            greedy.append(bool((logits.argmax(-1) == targets).all()))
    return torch.stack(summed), greedy


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
@torch.no_grad()
def test_encoder_decoder_scores_equal_a_plain_loop_and_encode_once(arch):
    proc, model = build_seq2seq(arch)
    prompts = seq2seq_prompts(3)
    # Options of one to five tokens, and a different number of them per question.
    options = [[sentence(1, 1), sentence(5, 5)] + [sentence(1, 5) for _ in range(k)] for k in (0, 1, 3)]
    image = torch.randn(3, 5, 19)
    assert (proc(prompts)["attention_mask"] == 0).any()  # a padded batch of questions

    for schedule, encoder_calls in (("two_pass", 2), ("static", 1)):
        calls, decoder_calls = encoder_inputs(model, lambda: score_options(
            model, proc, prompts, options, image_features=image, schedule=schedule))
        assert (len(calls), decoder_calls) == (encoder_calls, 1), schedule
        scores = score_options(model, proc, prompts, options, image_features=image, schedule=schedule)
        assert [len(s) for s in scores.summed] == [len(c) for c in options]
        expected, greedy = plain_seq2seq_scores(proc, model, prompts, options, image, schedule)
        torch.testing.assert_close(torch.cat(scores.summed), expected, rtol=1e-4, atol=1e-5)
        assert torch.cat(scores.greedy).tolist() == greedy
        lengths = torch.tensor([len(proc.encode(o)) for choices in options for o in choices])
        torch.testing.assert_close(torch.cat(scores.num_tokens), lengths.float())
        for summed, count, norm in zip(scores.summed, scores.num_tokens, scores.normalised):
            torch.testing.assert_close(norm, summed / count)
        # answer_log_likelihood, the reference of the decoder-only tests, agrees for an encoder-decoder LLM.
        plain = [answer_log_likelihood(model, {**proc([prompt], [option]), "image_features": image[row:row + 1]},
                                       schedule=schedule)[0][0]
                 for row, (prompt, choices) in enumerate(zip(prompts, options)) for option in choices]
        torch.testing.assert_close(torch.stack(plain), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
@torch.no_grad()
def test_encoder_decoder_greedy_flags_say_whether_greedy_decoding_gives_the_option(arch):
    # Weights whose greedy tokens vary (at the default initialisation a tiny T5 decodes pad tokens only).
    proc, model = build_seq2seq(arch, varied=True)
    prompts = seq2seq_prompts(8)
    options = [[sentence(1, 3) for _ in range(2)] for _ in prompts]
    image = torch.randn(8, 5, 19)
    # Each question's own greedy answer, one and two tokens of it, as options where they decode to plain
    # words. A tiny BART often decodes a special token first: 8 questions, so that some of them give a
    # word (they did in each of 150 draws).
    tokens = model.generate(**proc(prompts), image_features=image, max_new_tokens=2, min_new_tokens=2,
                            do_sample=False).tolist()
    for choices, ids in zip(options, tokens):
        for greedy_ids in (ids[:1], ids[:2]):
            text = proc.decode([greedy_ids])[0]
            if proc.encode(text) == greedy_ids:
                choices.append(text)
    scores = score_options(model, proc, prompts, options, image_features=image)
    _, greedy = plain_seq2seq_scores(proc, model, prompts, options, image, "two_pass")
    assert torch.cat(scores.greedy).tolist() == greedy and any(greedy)


def test_a_processor_of_the_other_kind_is_refused():
    proc, model = build("llama")
    seq2seq_proc, seq2seq_model = build_seq2seq("t5")
    image = torch.randn(1, 5, 19)
    with pytest.raises(ValueError, match="processor: built with encoder_decoder=True, but the model wraps a "
                                         "decoder-only LLM"):
        score_options(model, seq2seq_proc, ["red"], [["red"]], image_features=image)
    with pytest.raises(ValueError, match="processor: built with encoder_decoder=False, but the model wraps an "
                                         "encoder-decoder LLM"):
        score_options(seq2seq_model, proc, ["red"], [["red"]], image_features=image)
