"""LMEye hands the LLM its text as the LLM embeds ``input_ids`` itself, in every family.

Some Hugging Face LLMs scale token embeddings only when they embed ``input_ids`` themselves (the
Pegasus, Marian, BlenderbotSmall and MVP encoders, the MVP decoder, with ``scale_embedding``);
others scale inside the embedding module (BART, mBART, M2M100) or also scale given
``inputs_embeds`` (the Pegasus and Marian decoders). Checked on tiny random models of each: the
module LMEye feeds receives exactly what it receives from ``input_ids`` for plain text, and a
text-only prompt gives the plain LLM's logits. Exact equality (the same float operations), fp32.
"""

import pytest
import torch
import transformers as T
from torch import nn

from lmeye_fast.models import LMEyeModel, LMEyeProcessor, LMEyeSeq2SeqModel
from lmeye_fast.models.modeling import _token_scale
from lmeye_fast.models.tiny import tiny_llm, tiny_seq2seq, word_tokenizer

WORDS = "what colour is the circle square red blue left right answer :".split()
TOKENS = word_tokenizer(WORDS)
VOCAB = len(TOKENS) + 3
BART_LIKE = dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 pad_token_id=0, eos_token_id=1, bos_token_id=2, decoder_start_token_id=0, scale_embedding=True)

SEQ2SEQ = {
    "t5": lambda: tiny_seq2seq("t5", VOCAB),
    "mt5": lambda: T.MT5ForConditionalGeneration(T.MT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(**BART_LIKE)),
    "mbart": lambda: T.MBartForConditionalGeneration(T.MBartConfig(**BART_LIKE)),
    "pegasus": lambda: T.PegasusForConditionalGeneration(T.PegasusConfig(**BART_LIKE)),
    "marian": lambda: T.MarianMTModel(T.MarianConfig(**BART_LIKE)),
    "blenderbot_small": lambda: T.BlenderbotSmallForConditionalGeneration(T.BlenderbotSmallConfig(**BART_LIKE)),
    "mvp": lambda: T.MvpForConditionalGeneration(T.MvpConfig(**BART_LIKE)),
}
CAUSAL = {
    "llama": lambda: tiny_llm("llama", VOCAB),
    "mvp": lambda: T.MvpForCausalLM(T.MvpConfig(**BART_LIKE)),
    "pegasus": lambda: T.PegasusForCausalLM(T.PegasusConfig(**BART_LIKE)),
    "blenderbot_small": lambda: T.BlenderbotSmallForCausalLM(T.BlenderbotSmallConfig(**BART_LIKE)),
    "xglm": lambda: T.XGLMForCausalLM(T.XGLMConfig(vocab_size=VOCAB, d_model=32, num_layers=1, attention_heads=2,
                                                   ffn_dim=64, scale_embedding=True, pad_token_id=0)),
}


def plain_text(batch=2, length=7):
    """Token ids of words only: no special token, whose rows LMEye replaces."""
    words = torch.tensor(TOKENS.convert_tokens_to_ids(WORDS))
    return words[torch.randint(len(words), (batch, length))]


def wrap(model_class, llm, encoder_decoder):
    processor = LMEyeProcessor(TOKENS, num_image_tokens=2, num_requests=2, encoder_decoder=encoder_decoder)
    return model_class(llm.eval(), processor.make_config(interaction_dim=8, num_heads=2, vision_dim=6)).eval()


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_encoder_reads_the_text_as_from_input_ids(family):
    model = wrap(LMEyeSeq2SeqModel, SEQ2SEQ[family](), True)
    ids = plain_text()
    decoder_ids = plain_text(length=3)
    with torch.no_grad():
        native = model.llm(input_ids=ids, decoder_input_ids=decoder_ids)
        ours = model.llm(inputs_embeds=model.embed(ids), decoder_input_ids=decoder_ids)
    assert torch.equal(ours.encoder_last_hidden_state, native.encoder_last_hidden_state)
    assert torch.equal(ours.logits, native.logits)


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_decoder_only_llm_reads_the_text_as_from_input_ids(family):
    model = wrap(LMEyeModel, CAUSAL[family](), False)
    ids = plain_text()
    with torch.no_grad():
        assert torch.equal(model.llm(inputs_embeds=model.embed(ids)).logits, model.llm(input_ids=ids).logits)


def test_scale_found_only_where_the_llm_applies_it_to_input_ids_alone():
    scaled_encoder = wrap(LMEyeSeq2SeqModel, SEQ2SEQ["pegasus"](), True)
    assert scaled_encoder.token_scale == pytest.approx(32 ** 0.5)
    # <img-q> and <img-d> start as an average word at the scale the encoder reads words.
    embedding = scaled_encoder.llm.get_input_embeddings().weight
    assert torch.allclose(scaled_encoder.special_embed[1], embedding.mean(0) * 32 ** 0.5)
    assert wrap(LMEyeSeq2SeqModel, SEQ2SEQ["bart"](), True).token_scale == 1.0       # inside the embedding
    assert wrap(LMEyeModel, CAUSAL["pegasus"](), False).token_scale == 1.0           # applied to inputs_embeds too
    assert wrap(LMEyeModel, CAUSAL["mvp"](), False).token_scale == pytest.approx(32 ** 0.5)


class OddEmbedder(nn.Module):
    """Has an embed_scale, but adds an offset to input_ids' embeddings that no scale reproduces."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.embed_scale = 2.0
        self.layers = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, input_ids=None, inputs_embeds=None):
        hidden = self.embed_tokens(input_ids) * self.embed_scale + 1.0 if inputs_embeds is None else inputs_embeds
        return self.layers[0](hidden)


def test_an_embedding_lmeye_cannot_reproduce_is_refused():
    reader = OddEmbedder().train()
    with pytest.raises(ValueError, match="llm: OddEmbedder embeds input_ids in a way"):
        _token_scale(reader, reader.embed_tokens)
    assert reader.training  # the probe leaves the mode as it found it
    reader.layers = nn.ModuleList()
    with pytest.raises(ValueError, match="no list of layers"):
        _token_scale(reader, reader.embed_tokens)
