"""Every encoder-decoder family of ``transformers`` that builds from a tiny config, under LMEyeSeq2SeqModel.

The families are those of ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`` (what ``AutoModelForSeq2SeqLM``
loads), each built from its config class's defaults with the sizes shrunk (width, layers, heads,
feed-forward, vocabulary) and the special token ids of ``word_tokenizer``. Each one either trains (a
finite loss, and a gradient on every adapter parameter), generates (a padded batch, greedy and with
beams, equals each row generated on its own) and scores (``score_options`` equals
``answer_log_likelihood``, one full forward per option, rel 1e-4 in fp32), or is refused when the
LMEyeSeq2SeqModel is built, with an error naming why (``REFUSED``).
"""

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from lmeye_fast.models import LMEyeProcessor, LMEyeSeq2SeqModel
from lmeye_fast.models.scoring import answer_log_likelihood, score_options
from lmeye_fast.models.tiny import word_tokenizer
from test_models_schedules import WORDS, sentence

FAMILIES = sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

# The families LMEyeSeq2SeqModel refuses, and what its error says. Speech and audio models whose
# config is not an encoder-decoder one (a decoder-only LLM behind an audio encoder) are among the
# auto class's models; they are refused as decoder-only LLMs.
AUDIO_LMS = ("audioflamingo3", "glmasr", "granite_speech", "granite_speech_plus", "moss_transcribe_diarize",
             "musicflamingo", "nemo_speechlm", "omniasr", "qwen2_audio", "qwen3_asr", "vibevoice_asr",
             "voxtral", "voxtral_realtime")
REFUSED = {family: "is a decoder-only LLM; wrap it in LMEyeModel" for family in AUDIO_LMS}
REFUSED["fsmt"] = r"\(fsmt\) is not supported: its decoder is causal only when"

# Sizes: every attribute of these names, in the config and each config nested in it, is shrunk.
WIDTH = ("d_model", "hidden_size", "n_embd", "embed_dim", "cross_attention_hidden_size")
LAYERS = ("num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers", "num_hidden_layers",
          "num_encoder_layers")
HEADS = ("num_heads", "encoder_attention_heads", "decoder_attention_heads", "num_attention_heads",
         "num_key_value_heads")
FEED_FORWARD = ("d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "intermediate_size")
HIDDEN, HEAD_COUNT = 32, 4
# ``score_options`` against one forward per option, relative. ProphetNet's own decoder gives a column
# logits that depend on how many columns follow it (not on their tokens: causal, but not length-free,
# by about 5e-4 in a tiny random model), and the scores decode all options of a question padded to one length.
SCORE_RTOL = {"prophetnet": 2e-3}
TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)  # word_tokenizer's <pad>, <eos>, <bos>


def shrink(config: PretrainedConfig, vocab_size: int) -> PretrainedConfig:
    """``config`` (and every config nested in it) with tiny sizes and word_tokenizer's token ids, in place."""
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            shrink(value, vocab_size)
    sizes = {**dict.fromkeys(WIDTH, HIDDEN), **dict.fromkeys(LAYERS, 2), **dict.fromkeys(HEADS, HEAD_COUNT),
             **dict.fromkeys(FEED_FORWARD, 2 * HIDDEN), "d_kv": HIDDEN // HEAD_COUNT,
             "head_dim": HIDDEN // HEAD_COUNT, "vocab_size": vocab_size}
    family_ids = {getattr(config, name, None): value for name, value in TOKEN_IDS.items()
                  if isinstance(getattr(config, name, None), int)}
    for name, value in sizes.items():
        if isinstance(getattr(config, name, None), int):
            try:
                setattr(config, name, value)
            except (AttributeError, NotImplementedError):  # a size derived from others (a read-only property)
                pass
    start = getattr(config, "decoder_start_token_id", None)
    for name, value in TOKEN_IDS.items():
        if hasattr(config, name):
            setattr(config, name, value)
    if getattr(config, "is_encoder_decoder", False):
        # The family's start token in word_tokenizer's ids (T5's pad, BART's EOS); the pad token where
        # the family leaves it to the checkpoint.
        config.decoder_start_token_id = family_ids.get(start, TOKEN_IDS["pad_token_id"])
    for name in ("forced_bos_token_id", "forced_eos_token_id"):  # a fixed first or last token would hide the rows
        if hasattr(config, name):
            setattr(config, name, None)
    for name in ("dropout", "dropout_rate", "attention_dropout", "activation_dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return config


def build(family):
    tok = word_tokenizer(WORDS)
    proc = LMEyeProcessor(tok, num_image_tokens=3, num_requests=2, response_prefix="answer :", encoder_decoder=True)
    config = shrink(AutoConfig.for_model(family), len(tok))
    if family in REFUSED:  # refused before any weight is read: built without memory
        with torch.device("meta"):
            return proc, AutoModelForSeq2SeqLM.from_config(config)
    return proc, AutoModelForSeq2SeqLM.from_config(config).eval()


def adapter(proc, llm):
    model = LMEyeSeq2SeqModel(llm, proc.make_config(interaction_dim=8, num_heads=2, sub_features=2, vision_dim=11))
    with torch.no_grad():
        # Large enough that the transmitted tokens move the logits visibly.
        for p in list(model.static.parameters()) + list(model.ipn.parameters()) + [model.special_embed]:
            p.normal_(0.0, 0.3)
    return model.eval()


def prompts(count):
    """Prompts of distinct lengths (a padded batch), the image inside the text or before it."""
    out = []
    for i, n in enumerate(random.sample(range(1, 8), count)):
        words = sentence(n, n).split()
        cut = random.randint(0, n)
        out.append(" ".join(words[:cut] + ["<img>"] + words[cut:]))
    return out


def check_training(proc, model):
    model.set_stage(2, train_special_tokens=True)
    model.static.requires_grad_(True)
    model.train()
    batch = proc(prompts(3), [sentence(1, 4) for _ in range(3)])
    loss = model(**batch, image_features=torch.randn(3, 3, 11)).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.ipn.request_proj.weight.grad.abs().sum() > 0, "the IPN's request reached the loss"
    assert all(p.grad is None for p in model.llm.parameters())
    model.eval()


@torch.no_grad()
def check_generation(proc, model):
    texts, image = prompts(3), torch.randn(3, 3, 11)
    for beams in (1, 2):
        kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=beams)
        together = model.generate(**proc(texts), image_features=image, **kwargs)
        assert together.shape == (3, 3), beams
        for row in range(3):
            alone = model.generate(**proc(texts[row:row + 1]), image_features=image[row:row + 1], **kwargs)
            assert torch.equal(together[row], alone[0]), f"{beams} beams, row {row}"


@torch.no_grad()
def check_scoring(proc, model, rtol):
    texts, image = prompts(2), torch.randn(2, 3, 11)
    options = [[sentence(1, 1), sentence(3, 3)], [sentence(2, 2), sentence(1, 3), sentence(1, 3)]]
    scores = score_options(model, proc, texts, options, image_features=image)
    plain = [answer_log_likelihood(model, {**proc([text], [option]), "image_features": image[row:row + 1]})[0][0]
             for row, (text, choices) in enumerate(zip(texts, options)) for option in choices]
    torch.testing.assert_close(torch.cat(scores.summed), torch.stack(plain), rtol=rtol, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_generates_and_scores_or_is_refused(family):
    proc, llm = build(family)
    if family in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[family]):
            adapter(proc, llm)
        return
    model = adapter(proc, llm)
    check_training(proc, model)
    check_generation(proc, model)
    check_scoring(proc, model, SCORE_RTOL.get(family, 1e-4))
