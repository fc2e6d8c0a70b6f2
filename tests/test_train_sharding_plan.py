"""Which modules ``shard_frozen_llm`` gives FSDP2 groups: the outermost repeated blocks of each tower (a decoder's
layers, an encoder-decoder's encoder and decoder blocks, a vision encoder's layers), never blocks nested in them."""

import pytest
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from lmeye_fast.train.distributed import decoder_layers


def test_the_outermost_blocks_of_each_family():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert decoder_layers(llama) == list(llama.model.layers)
    # T5's blocks each hold a ModuleList of their sublayers, which are not blocks of their own.
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=2,
                                             num_decoder_layers=3, num_heads=2))
    assert decoder_layers(t5) == [*t5.encoder.block, *t5.decoder.block]
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=16))
    assert decoder_layers(clip) == list(clip.encoder.layers)


def test_a_module_without_blocks_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^Linear: has no nn.ModuleList of layers to shard"):
        decoder_layers(nn.Linear(2, 2))
