"""A tiny random LMEye saved to disk as a user's would be (LLM with tokenizer, CLIP tower with its
image processor, adapter), and random PNG images: what the evaluation tests load by path."""

import torch

WORDS = "what colour is the circle square red blue green yellow ? answer : A. B. C. D.".split()
RESPONSE_PREFIX = "answer :"


def save_tiny_model(root):
    """Save the parts under ``root`` (llm/, vision/, adapter/); returns the model and its processor."""
    from transformers import CLIPImageProcessor

    from lmeye_fast.models import LMEyeModel, LMEyeProcessor
    from lmeye_fast.models.tiny import tiny_clip, tiny_llm, word_tokenizer

    processor = LMEyeProcessor(word_tokenizer(WORDS), num_image_tokens=17, num_requests=3,
                               response_prefix=RESPONSE_PREFIX)
    model = LMEyeModel(tiny_llm("llama", len(processor), hidden=32), processor.make_config(
        interaction_dim=16, num_heads=2), vision=tiny_clip())
    with torch.no_grad():
        for p in list(model.ipn.parameters()) + [model.special_embed]:
            p.normal_(0.0, 0.3)
    model.llm.save_pretrained(root / "llm")
    processor.tokenizer.save_pretrained(root / "llm")
    model.vision.save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "vision")
    model.save_pretrained(root / "adapter")
    return model.eval(), processor


def random_image():
    from PIL import Image

    return Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
