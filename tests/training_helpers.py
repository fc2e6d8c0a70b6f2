"""Tiny models and a tiny on-disk dataset for the data, Trainer, distributed and CLI tests.

Images are solid-colour PNGs written with Pillow; the conversations ask for the
colour, so a few optimizer steps already move the loss.
"""

import json
from pathlib import Path

from PIL import Image
from transformers import CLIPImageProcessor

from lmeye_fast.models import LMEyeModel, LMEyeProcessor, LMEyeSeq2SeqModel
from lmeye_fast.models.tiny import SEQ2SEQ_ARCHITECTURES, tiny_clip, tiny_llm, tiny_seq2seq, word_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (250, 250, 250)}
WORDS = list(COLOURS) + "what colour is it the image shows a and USER: ASSISTANT: describe hello hi yes no".split()
IMAGE_SIZE = 16


def image_processor():
    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                             "width": IMAGE_SIZE})


def tiny_parts(num_requests=2, arch="llama"):
    """(processor, llm, vision): a word tokenizer with the vicuna prompt template, a 2-layer LLM (``arch``: a causal one, or an encoder-decoder
    one with the encoder-decoder processor) and a CLIP tower with 5 tokens per image."""
    tokenizer = word_tokenizer(WORDS)
    if arch in SEQ2SEQ_ARCHITECTURES:
        # The LLM first, for its decoder start token; the model resizes its embeddings for LMEye's special tokens.
        llm = tiny_seq2seq(arch, len(tokenizer))
        processor = LMEyeProcessor(tokenizer, num_image_tokens=5, num_requests=num_requests, encoder_decoder=True,
                                   decoder_start_token_id=llm.config.decoder_start_token_id, template="vicuna")
    else:
        processor = LMEyeProcessor(tokenizer, num_image_tokens=5, num_requests=num_requests, template="vicuna")
        llm = tiny_llm(arch, len(processor), initializer_range=0.3)
    vision = tiny_clip(image_size=IMAGE_SIZE, patch_size=8, hidden=24)
    return processor, llm, vision


def tiny_model(stage=2, arch="llama"):
    processor, llm, vision = tiny_parts(arch=arch)
    model_class = LMEyeSeq2SeqModel if processor.encoder_decoder else LMEyeModel
    model = model_class(llm, processor.make_config(interaction_dim=16, num_heads=2), vision=vision)
    return processor, model.set_stage(stage, train_special_tokens=stage == 2)


def save_tiny_models(directory, arch="llama", vocab_room=0):
    """The tiny LLM of ``arch`` with its tokenizer, and the tiny CLIP tower with its image processor, saved as
    Hugging Face directories ``directory/llm`` and ``directory/vision``; returns both paths. The LLM's vocabulary
    is the tokenizer's, which LMEye's special tokens outgrow (resizing it), plus ``vocab_room`` unused rows."""
    directory = Path(directory)
    tokenizer = word_tokenizer(WORDS)
    llm = tiny_seq2seq(arch, len(tokenizer) + vocab_room) if arch in SEQ2SEQ_ARCHITECTURES else \
        tiny_llm(arch, len(tokenizer) + vocab_room, initializer_range=0.3)
    vision = tiny_clip(image_size=IMAGE_SIZE, patch_size=8, hidden=24)
    llm.save_pretrained(directory / "llm")
    tokenizer.save_pretrained(directory / "llm")
    vision.save_pretrained(directory / "vision")
    image_processor().save_pretrained(directory / "vision")
    return directory / "llm", directory / "vision"


def relative_difference(got, expected):
    """||got - expected|| / ||expected|| of one tensor: the parity measure of the training tests (Adam's
    normalised update turns float noise in a near-zero gradient element into a large relative change of
    that one element, so elements are not compared one by one)."""
    return float((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def write_llava(directory, count=8, text_only=0):
    """``count`` LLaVA-format records (two turns each, PNGs in ``directory/images``) and ``text_only`` more
    without image; returns the JSON file's path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for index in range(count):
        colour = names[index % len(names)]
        Image.new("RGB", (20, 20), COLOURS[colour]).save(directory / "images" / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is it"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "describe the image"}, {"from": "gpt", "value": f"a {colour} image"}]})
    for index in range(text_only):
        records.append({"id": f"text{index}", "conversations": [
            {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]})
    path = directory / "llava.json"
    path.write_text(json.dumps(records))
    return path
