"""Tiny, offline building blocks for tests, examples and CPU benchmarks.

A word-level tokenizer built in code with the ``tokenizers`` library, and
randomly initialised causal and encoder-decoder LMs and CLIP vision towers of a few thousand
parameters, so that nothing is downloaded.
"""

from __future__ import annotations

from typing import Iterable

from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, CLIPConfig, CLIPModel,
                          CLIPVisionConfig, CLIPVisionModel, GPT2Config, LlamaConfig, OPTConfig,
                          PreTrainedTokenizerFast, Qwen2Config, T5Config)

__all__ = ["ARCHITECTURES", "SEQ2SEQ_ARCHITECTURES", "word_tokenizer", "tiny_llm", "tiny_seq2seq", "tiny_clip",
           "tiny_clip_model"]

ARCHITECTURES = ("llama", "qwen2", "gpt2", "opt")
SEQ2SEQ_ARCHITECTURES = ("t5", "bart")


def word_tokenizer(words: Iterable[str]):
    """A whitespace word-level tokenizer over ``words`` plus <pad>, <eos>, <bos>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {}
    for word in specials + list(words):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def tiny_llm(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4,
             max_positions: int = 256, attn_implementation: str = "sdpa", **overrides):
    """A randomly initialised causal LM of one of ``ARCHITECTURES``, dropout off."""
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions, **ids)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions, **ids)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    elif arch == "opt":
        config = OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, max_position_embeddings=max_positions,
                           word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0, **ids)
    else:
        raise ValueError(f"arch: expected one of {ARCHITECTURES}, got {arch!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def tiny_seq2seq(arch: str, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4,
                 max_positions: int = 256, **overrides):
    """A randomly initialised encoder-decoder LM of one of ``SEQ2SEQ_ARCHITECTURES`` (``layers`` in the
    encoder and as many in the decoder), dropout off, the ids of ``word_tokenizer``'s special tokens.

    T5 is shaped as FlanT5 (T5 v1.1: gated-GELU feed-forward, an output head of its own), with
    relative positions (``max_positions`` does not apply), decoding from the pad token. BART has
    learned absolute positions and starts decoding with EOS.
    """
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "t5":
        config = T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=hidden // heads, d_ff=2 * hidden,
                          num_layers=layers, num_decoder_layers=layers, num_heads=heads, dropout_rate=0.0,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                          **ids)
    elif arch == "bart":
        config = BartConfig(vocab_size=vocab_size, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * hidden,
                            decoder_ffn_dim=2 * hidden, max_position_embeddings=max_positions, dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=1,
                            forced_eos_token_id=None, **ids)
    else:
        raise ValueError(f"arch: expected one of {SEQ2SEQ_ARCHITECTURES}, got {arch!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForSeq2SeqLM.from_config(config)


def tiny_clip(image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2, heads: int = 4):
    """A randomly initialised CLIP vision tower; ``last_hidden_state`` has (image_size/patch_size)^2 + 1 tokens."""
    config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                              intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              num_channels=3)
    return CLIPVisionModel(config)


def tiny_clip_model(image_size: int = 32, patch_size: int = 8, hidden: int = 32, text_hidden: int = 32,
                    layers: int = 2, heads: int = 4, text_positions: int = 32):
    """A randomly initialised ``CLIPModel`` (vision and text towers, both projections to ``text_hidden``).

    Its text vocabulary is a handful of ids, start and end the last two as in CLIP's own, enough for
    ``CLIPTextInteraction``; ``text_positions`` bounds its sequences (sub-features + 3).
    """
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_channels=3)
    text = dict(vocab_size=8, hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=text_positions, pad_token_id=0, bos_token_id=6,
                eos_token_id=7)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=text_hidden))
