"""LMEye for Hugging Face causal and encoder-decoder LMs: processor, schedules, training, save/load.

    model.save_pretrained(out); processor.save_pretrained(out)   # the adapter, its models' record, the processor
    processor, model, image_processor = load_pretrained(out)     # ... rebuilt from the directory alone

    processor = LMEyeProcessor(tokenizer, num_image_tokens=N, num_requests=5, response_prefix=" Answer:")
    model = LMEyeModel(llm, processor.make_config(interaction_dim=256, num_heads=4), vision=vision)
    batch = processor(prompts, answers, images=pixel_values)
    loss = model(**batch).loss                   # single pass: the prefix runs once, on a KV cache
    tokens = model.generate(**processor(prompts, images=pixel_values), max_new_tokens=8)

    processor, model = published(tokenizer, llm, clip_model)   # LMEye as released: one global <img> token
    processor, model = global_token(tokenizer, llm, clip_model, interaction_dim=256)  # ... IPN over patches

    processor = LMEyeProcessor(tokenizer, num_image_tokens=N, encoder_decoder=True)   # T5 / FlanT5, BART
    model = LMEyeSeq2SeqModel(t5, processor.make_config(interaction_dim=256, num_heads=4), vision=vision)
"""

from .clip_interaction import CLIPTextInteraction
from .config import LMEyeConfig
from .modeling import LMEyeBaseModel, LMEyeInputs, LMEyeModel, LMEyeOutput, Prefill
from .processor import IGNORE_INDEX, LMEyeBatch, LMEyeProcessor
from .prompts import PROMPT_TEMPLATES, PromptTemplate, Turn
from .presets import global_token, patch_tokens, published
from .seq2seq import LMEyeSeq2SeqModel
from .sources import ModelSources, load_pretrained
from .training import train
from .vision import CLIPImageEncoder

__all__ = ["LMEyeConfig", "LMEyeBaseModel", "LMEyeModel", "LMEyeSeq2SeqModel", "LMEyeInputs", "Prefill", "LMEyeOutput",
           "LMEyeProcessor", "LMEyeBatch",
           "IGNORE_INDEX", "PromptTemplate", "Turn", "PROMPT_TEMPLATES", "train",
           "load_pretrained", "ModelSources",
           "CLIPTextInteraction", "CLIPImageEncoder", "published", "global_token", "patch_tokens"]
