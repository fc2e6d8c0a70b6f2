"""A tiny random LMEye saved to disk as a user's would be (LLM with tokenizer, CLIP tower with its
image processor, adapter with its processor and the record of both models), and random PNG images:
what the evaluation tests load by path."""

import torch

WORDS = "what colour is the circle square red blue green yellow ? answer : A. B. C. D.".split()
RESPONSE_PREFIX = "answer :"


def save_tiny_model(root, arch="llama", llm_hidden=32, llm_heads=4, llm_init=None):
    """Save the parts under ``root`` (llm/, vision/, adapter/); returns the model and its processor.
    ``arch``: the LLM, a causal one of ``tiny.ARCHITECTURES`` or ``"t5"`` (an ``LMEyeSeq2SeqModel``);
    ``llm_hidden`` and ``llm_heads`` size a causal one (vLLM's CPU attention needs heads 32 wide or wider),
    ``llm_init`` its weights' standard deviation (the config's default when None)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, CLIPImageProcessor, CLIPVisionModel

    from lmeye_fast.models import LMEyeModel, LMEyeProcessor, LMEyeSeq2SeqModel
    from lmeye_fast.models.tiny import tiny_clip, tiny_llm, tiny_seq2seq, word_tokenizer

    encoder_decoder = arch == "t5"
    tokenizer = word_tokenizer(WORDS)
    # Weights large enough that greedy decoding gives words (at the default initialisation a tiny T5
    # decodes pad tokens only, an empty answer); room for LMEye's three tokens, so nothing is resized.
    init = {} if llm_init is None else {"initializer_range": llm_init}
    llm = tiny_seq2seq(arch, len(tokenizer) + 3, hidden=32, initializer_factor=3.0) if encoder_decoder else \
        tiny_llm(arch, len(tokenizer) + 3, hidden=llm_hidden, heads=llm_heads, **init)
    start = llm.config.decoder_start_token_id if encoder_decoder else None
    processor = LMEyeProcessor(tokenizer, num_image_tokens=17, num_requests=3, response_prefix=RESPONSE_PREFIX,
                               encoder_decoder=encoder_decoder, decoder_start_token_id=start)
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")  # with LMEye's tokens, as the adapter's
    tiny_clip().save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "vision")
    # Built around the saved models, loaded back, as a user builds it: the adapter records where they are.
    llm = (AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM).from_pretrained(root / "llm")
    config = processor.make_config(interaction_dim=16, num_heads=2)
    model_class = LMEyeSeq2SeqModel if encoder_decoder else LMEyeModel
    model = model_class(llm, config, vision=CLIPVisionModel.from_pretrained(root / "vision"))
    with torch.no_grad():
        for p in list(model.ipn.parameters()) + [model.special_embed]:
            p.normal_(0.0, 0.3)
    model.save_pretrained(root / "adapter")
    processor.save_pretrained(root / "adapter")
    return model.eval(), processor


def random_image():
    from PIL import Image

    return Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
