"""Ready-made LMEye set-ups around a CLIP model: the published configuration and two variants.

    clip = CLIPModel.from_pretrained("openai/clip-vit-large-patch14")
    processor, model = published(tokenizer, llm, clip, response_prefix=" Answer:")
    processor, model = global_token(tokenizer, llm, clip, interaction_dim=768, num_heads=12)
    processor, model = patch_tokens(tokenizer, llm, clip, interaction_dim=768, num_heads=12)

Each returns the processor (with ``template``, a ``PromptTemplate`` or its name, and
``response_prefix`` in place of the template's when given) and the model built to fit each other: the number of
``<img>`` slots follows from the feature the static mapping reads, and an
encoder-decoder LLM (T5, BART) gets the encoder-decoder processor (with the
LLM's decoder start token, so ``LMEyeCollator`` batches it) and
``LMEyeSeq2SeqModel``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

from torch import nn

from .clip_interaction import CLIPTextInteraction
from .modeling import LMEyeBaseModel
from .processor import LMEyeProcessor
from .prompts import PromptTemplate
from .seq2seq import model_classes
from .vision import CLIPImageEncoder, feature_shape, load_vision

__all__ = ["published", "global_token", "patch_tokens", "PRESETS", "preset_vision"]

TemplateLike = Union[str, PromptTemplate, dict]

PUBLISHED_SUB_FEATURES = 5
PUBLISHED_REQUESTS = 5


def _build(tokenizer, llm: nn.Module, vision: nn.Module, response_prefix: Optional[str], template, num_requests: int,
           interaction=None, **config_kwargs) -> Tuple[LMEyeProcessor, LMEyeBaseModel]:
    count = feature_shape(vision, config_kwargs["static_feature"])[0]
    if count is None:
        raise ValueError(f"clip: cannot tell how many {config_kwargs['static_feature']!r} tokens it gives per image "
                         "(expected a Hugging Face CLIP model)")
    encoder_decoder = bool(getattr(llm.config, "is_encoder_decoder", False))
    processor = LMEyeProcessor(tokenizer, num_image_tokens=count, num_requests=num_requests,
                               response_prefix=response_prefix, template=template, encoder_decoder=encoder_decoder,
                               decoder_start_token_id=getattr(llm.config, "decoder_start_token_id", None)
                               if encoder_decoder else None)
    model_class = model_classes(encoder_decoder)[1]
    model = model_class(llm, processor.make_config(**config_kwargs), vision=vision, interaction=interaction)
    return processor, model


def published(tokenizer, llm: nn.Module, clip: nn.Module, response_prefix: Optional[str] = None,
              template: TemplateLike = "plain", **config_overrides) -> Tuple[LMEyeProcessor, LMEyeBaseModel]:
    """LMEye as released (v1): the LLM sees one global image token, the IPN asks for the rest.

    The static mapping maps CLIP's projected image embedding (one vector,
    ``get_image_features``) to a single ``<img>`` token; the IPN decomposes that
    same vector into S=5 sub-features (N=1) and lets R=5 requests interact with
    them through the frozen CLIP text encoder (``CLIPTextInteraction``), whose
    pooled, projected outputs are transmitted into the 5 ``<img-d>`` slots.

    Args:
        clip: a Hugging Face ``CLIPModel``; its vision tower and projection are the
            vision module (``CLIPImageEncoder``), its text tower the interaction
            (both frozen).
        config_overrides: further ``LMEyeConfig`` fields (e.g. ``static_hidden_dim``).
    """
    interaction = CLIPTextInteraction(clip, PUBLISHED_REQUESTS)
    # num_heads only shapes the built-in attention interaction; 1 divides any width.
    settings = dict(static_feature="projected", ipn_feature="projected", sub_features=PUBLISHED_SUB_FEATURES,
                    interaction_dim=interaction.width, num_heads=1)
    settings.update(config_overrides)
    return _build(tokenizer, llm, CLIPImageEncoder(clip), response_prefix, template, PUBLISHED_REQUESTS, interaction,
                  **settings)


def global_token(tokenizer, llm: nn.Module, clip: nn.Module, response_prefix: Optional[str] = None,
                 num_requests: int = 5, template: TemplateLike = "plain", **config_overrides) -> Tuple[LMEyeProcessor, LMEyeBaseModel]:
    """The published division of labour with patch-level features for the IPN: the static mapping maps
    CLIP's projected image embedding to a single ``<img>`` token, as released, and the requests attend
    over every token of ``last_hidden_state`` with the built-in attention interaction. The LLM's own
    view of the image is one global vector; whatever finer it needs comes through the IPN, on request.

    Args:
        clip: a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` (the projection makes the global
            embedding); one pass of its vision tower serves both consumers.
        config_overrides: further ``LMEyeConfig`` fields (``interaction_dim``, ``num_heads``,
            ``sub_features``, ...).
    """
    if not isinstance(getattr(clip, "visual_projection", None), nn.Module):
        raise ValueError(f"clip: expected a CLIPModel or CLIPVisionModelWithProjection (the global token is the "
                         f"projected image embedding), got {type(clip).__name__} without a visual_projection")
    settings = dict(static_feature="projected", ipn_feature="tokens")
    settings.update(config_overrides)
    return _build(tokenizer, llm, clip, response_prefix, template, num_requests, **settings)


def patch_tokens(tokenizer, llm: nn.Module, clip: nn.Module, response_prefix: Optional[str] = None,
                 num_requests: int = 5, template: TemplateLike = "plain", **config_overrides) -> Tuple[LMEyeProcessor, LMEyeBaseModel]:
    """The patch-token variant: the static mapping and the IPN both read every token of
    ``last_hidden_state`` (N = patches + 1 ``<img>`` slots), and the requests attend over
    them with the built-in attention interaction.

    Args:
        clip: a Hugging Face CLIP vision model (``CLIPVisionModel``,
            ``CLIPVisionModelWithProjection`` or ``CLIPModel``).
        config_overrides: further ``LMEyeConfig`` fields (``interaction_dim``,
            ``num_heads``, ``sub_features``, ...).
    """
    settings = dict(static_feature="tokens", ipn_feature="tokens")
    settings.update(config_overrides)
    return _build(tokenizer, llm, clip, response_prefix, template, num_requests, **settings)


PRESETS = {"published": published, "global_token": global_token, "patch_tokens": patch_tokens}
# What each preset reads of its CLIP checkpoint: the features, and whether the text tower (the interaction).
_PRESET_VISION: Dict[str, Tuple[Tuple[str, ...], bool]] = {
    "published": (("projected",), True), "global_token": (("projected", "tokens"), False),
    "patch_tokens": (("tokens",), False)}


def preset_vision(preset: str, name: str, revision: Optional[str] = None, dtype=None) -> nn.Module:
    """The CLIP checkpoint ``name`` loaded as ``preset`` needs it (``load_vision``): a ``CLIPModel`` for
    ``published`` (its text tower is the interaction), a vision model with its projection for
    ``global_token``, the vision tower for ``patch_tokens``."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    features, with_text = _PRESET_VISION[preset]
    return load_vision(name, features, with_text=with_text, revision=revision, dtype=dtype)
