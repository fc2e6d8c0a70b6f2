"""What an adapter directory records of the models around it, and the one loader that rebuilds them.

An adapter directory holds, besides the adapter (``lmeye_adapter.safetensors``,
``lmeye_config.json``: sizes, token ids, which vision output feeds the static mapping and
which the IPN):

- ``lmeye_sources.json`` (``ModelSources``, written by ``LMEyeModel.save_pretrained``): where
  the LLM and the vision model come from (a hub name or a directory, and a revision), and the
  CLIP checkpoint whose text tower is the interaction, when it is one;
- ``lmeye_processor.json`` and the tokenizer (``LMEyeProcessor.save_pretrained``): the special
  tokens, the image-token and slot counts, the prompt template.

``load_pretrained(directory)`` needs nothing else. Its arguments replace what is recorded: the
LLM and the vision model may be read from elsewhere (another copy of the same checkpoint) and
are checked against the record (model type, widths); a prompt setting (``response_prefix``,
``template``, ``add_bos``) must agree with the saved processor, and one that contradicts it is
refused, naming both values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional

import torch
from torch import nn

from ..checks import check_known_fields
from .adapter_files import adapter_file, check_save_id
from .config import LMEyeConfig

if TYPE_CHECKING:
    from .processor import LMEyeProcessor

__all__ = ["Source", "ModelSources", "SOURCES_FILE", "LoadedLMEye", "VisionModules", "load_pretrained",
           "load_vision_modules", "adapter_processor", "source_of", "model_sources"]

SOURCES_FILE = "lmeye_sources.json"
SOURCES_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Source:
    """Where a Hugging Face model comes from: ``name`` (a hub name or a directory), ``revision`` (a
    branch, tag or commit of a hub repository; None for the default or a directory), and
    ``model_type`` (its config's, so that another copy can be checked against it)."""

    name: str
    revision: Optional[str] = None
    model_type: Optional[str] = None


@dataclass(frozen=True)
class ModelSources:
    """The models an adapter was trained around: ``llm``, ``vision`` and, for the CLIP text interaction
    (``CLIPTextInteraction``), ``interaction``: the ``CLIPModel`` whose text tower it is."""

    llm: Optional[Source] = None
    vision: Optional[Source] = None
    interaction: Optional[Source] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelSources":
        check_known_fields(cls, data, "model sources")
        for value in data.values():
            if value is not None:
                check_known_fields(Source, value, "model source")
        return cls(**{key: None if value is None else Source(**value) for key, value in data.items()})

    def payload(self) -> Dict[str, Any]:
        """What ``lmeye_sources.json`` holds (``LMEyeModel.save_pretrained`` writes it with the adapter)."""
        return {"format_version": SOURCES_FORMAT_VERSION, "sources": self.to_dict()}

    @classmethod
    def load(cls, directory) -> "ModelSources":
        """The record of the adapter in ``directory``; an empty one where there is none (an adapter saved
        before it)."""
        path = adapter_file(directory, SOURCES_FILE)
        if not path.is_file():
            return cls()
        try:
            payload = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(payload, dict) or payload.get("format_version") != SOURCES_FORMAT_VERSION:
            raise ValueError(f"{path}: expected LMEye model sources with format_version {SOURCES_FORMAT_VERSION}")
        check_save_id(path, payload)
        return cls.from_dict(payload["sources"])


def source_of(module: Optional[nn.Module]) -> Optional[Source]:
    """Where a loaded module came from: its ``source`` where it says (the wrappers and sub-towers LMEye
    builds set one), else what ``from_pretrained`` left on it (``name_or_path``, and the commit of a hub
    download in its config); None for a module built in memory."""
    if module is None:
        return None
    if isinstance(getattr(module, "source", None), Source):
        return module.source
    name = getattr(module, "name_or_path", "") or getattr(getattr(module, "config", None), "_name_or_path", "")
    if not name:
        return None
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    return Source(str(name), getattr(config, "_commit_hash", None), model_type or None)


class LoadedLMEye(NamedTuple):
    """What ``load_pretrained`` rebuilds: the processor, the model and the vision model's image processor."""

    processor: Any
    model: nn.Module
    image_processor: Any


def _chosen(what: str, recorded: Optional[Source], name: Optional[str], revision: Optional[str],
            directory) -> Source:
    """The source to load: the recorded one, or the caller's name/revision in its place."""
    if name is None:
        if recorded is None:
            raise ValueError(f"{what}: the adapter in {directory} does not record its {what} ({SOURCES_FILE}); "
                             f"pass it (--{what})")
        return recorded if revision is None else dataclasses.replace(recorded, revision=revision)
    return Source(str(name), revision, None if recorded is None else recorded.model_type)


def _check_type(what: str, source: Source, recorded: Optional[Source], revision: Optional[str]) -> None:
    """Refuse a replacement checkpoint of another model type than the one the adapter was trained on."""
    if recorded is None or recorded.model_type is None:
        return
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(source.name, revision=revision).model_type
    if _family(model_type) != _family(recorded.model_type):
        raise ValueError(f"{what}: the adapter was trained on {recorded.name} (a {recorded.model_type!r} model), "
                         f"but {source.name} is a {model_type!r} model")


def _family(model_type: str) -> str:
    """A model type without the tower suffix: a CLIP vision tower loaded from a whole CLIP checkpoint
    reports ``clip_vision_model``, the checkpoint ``clip``."""
    return model_type.replace("_vision_model", "").replace("_text_model", "")


def model_sources(model: nn.Module) -> ModelSources:
    """The ``ModelSources`` of an ``LMEyeModel``: read off its LLM, vision module and CLIP interaction."""
    interaction = getattr(getattr(model, "ipn", None), "interaction", None)
    return ModelSources(llm=source_of(model.llm), vision=source_of(model.vision),
                        interaction=source_of(interaction) if type(interaction).__name__ == "CLIPTextInteraction"
                        else None)


def adapter_processor(directory, config: LMEyeConfig, llm: Source, llm_config=None, tokenizer=None,
                      **prompt_settings) -> "LMEyeProcessor":
    """The ``LMEyeProcessor`` the adapter in ``directory`` was saved with (``config`` its ``LMEyeConfig``).

    An adapter saved without one gets a processor on the LLM's tokenizer (``llm``, ``llm_config`` its
    config for an encoder-decoder's start token) laid out by ``prompt_settings``; with one, the
    settings must agree with it. ``tokenizer`` replaces the saved tokenizer. The processor's LMEye
    token ids are checked against the adapter's.
    """
    from transformers import AutoTokenizer

    from .processor import LMEyeProcessor, read_processor_config

    if read_processor_config(directory) is not None:
        processor = LMEyeProcessor.from_pretrained(directory, tokenizer=tokenizer,
                                                   num_image_tokens=config.num_image_tokens,
                                                   num_requests=config.slots, **prompt_settings)
    else:
        start = getattr(llm_config, "decoder_start_token_id", None) if config.encoder_decoder else None
        processor = LMEyeProcessor(tokenizer or AutoTokenizer.from_pretrained(llm.name, revision=llm.revision),
                                   num_image_tokens=config.num_image_tokens, num_requests=config.slots,
                                   encoder_decoder=config.encoder_decoder, decoder_start_token_id=start,
                                   **{key: value for key, value in prompt_settings.items() if value is not None})
    ids = (processor.image_token_id, processor.request_token_id, processor.slot_token_id)
    if ids != config.token_ids():
        raise ValueError(f"tokenizer: its LMEye token ids {ids} differ from the adapter's {config.token_ids()}; "
                         "load the tokenizer the adapter was trained with")
    return processor


class VisionModules(NamedTuple):
    """What ``load_vision_modules`` returns: the vision module, the interaction module for the IPN (None for
    its own attention) and the source the vision module was read from (its image processor's too)."""

    vision: nn.Module
    interaction: Optional[nn.Module]
    source: Source


def load_vision_modules(directory, config: LMEyeConfig, sources: "ModelSources", vision: Optional[str] = None,
                        vision_revision: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> VisionModules:
    """The vision module (the outputs ``config`` feeds the static mapping and the IPN) and the interaction
    module of the adapter in ``directory``, from its record ``sources`` (``vision``/``vision_revision``
    read another copy instead, checked to be of the recorded type): the CLIP text interaction's
    ``CLIPModel`` is loaded once and serves as the vision tower too where it is the same checkpoint.
    A user interaction module, which only its code can rebuild, is refused naming it."""
    from .clip_interaction import CLIPTextInteraction
    from .vision import CLIPImageEncoder, load_vision

    source = _chosen("vision", sources.vision, vision, vision_revision, directory)
    _check_type("vision", source, sources.vision, source.revision)
    features = (config.static_feature, config.ipn_feature)
    if config.interaction == "attention":
        return VisionModules(load_vision(source.name, features, revision=source.revision, dtype=dtype), None, source)
    if config.interaction != CLIPTextInteraction.__name__:
        raise ValueError(f"interaction: the adapter in {directory} uses the user interaction module "
                         f"{config.interaction}, which only its code can rebuild; load it with "
                         f"{'LMEyeSeq2SeqModel' if config.encoder_decoder else 'LMEyeModel'}.from_pretrained(..., "
                         "interaction=...)")
    clip_source = sources.interaction if sources.interaction is not None and vision is None else source
    clip = load_vision(clip_source.name, features, with_text=True, revision=clip_source.revision, dtype=dtype)
    interaction = CLIPTextInteraction(clip, config.num_requests, **(config.interaction_options or {}))
    same = (clip_source.name, clip_source.revision) == (source.name, source.revision)
    tower = CLIPImageEncoder(clip) if same else load_vision(source.name, features, revision=source.revision,
                                                            dtype=dtype)
    return VisionModules(tower, interaction, source)


def load_pretrained(directory, llm: Optional[str] = None, vision: Optional[str] = None,
                    llm_revision: Optional[str] = None, vision_revision: Optional[str] = None,
                    tokenizer: Optional[str] = None, image_processor: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, vision_dtype: Optional[torch.dtype] = None,
                    **prompt_settings) -> LoadedLMEye:
    """Rebuild the LMEye model saved in ``directory`` and its processor from what the directory records.

    Args:
        llm, vision (and their revisions): read the LLM / vision model from here instead of the
            recorded place; a model of another type than the recorded one is refused.
        tokenizer: a tokenizer to use instead of the saved one (its LMEye token ids must match the
            adapter's); image_processor: instead of the vision model's.
        dtype: the LLM's dtype, and the vision model's unless ``vision_dtype`` says (the adapter stays
            float32).
        prompt_settings: ``response_prefix``, ``template``, ``add_bos``: for an adapter saved without
            its processor; with one they must agree with it.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from .seq2seq import model_classes

    config = LMEyeConfig.load(directory)
    sources = ModelSources.load(directory)
    llm_source = _chosen("llm", sources.llm, llm, llm_revision, directory)
    _check_type("llm", llm_source, sources.llm, llm_source.revision)
    llm_config = AutoConfig.from_pretrained(llm_source.name, revision=llm_source.revision)
    if bool(getattr(llm_config, "is_encoder_decoder", False)) != config.encoder_decoder:
        raise ValueError(f"llm: the adapter in {directory} was saved for "
                         f"{'an encoder-decoder' if config.encoder_decoder else 'a decoder-only'} LLM, "
                         f"{llm_source.name} is not one")

    loaded_tokenizer = None if tokenizer is None else AutoTokenizer.from_pretrained(tokenizer)
    processor = adapter_processor(directory, config, llm_source, llm_config, loaded_tokenizer, **prompt_settings)

    vision_dtype = dtype if vision_dtype is None else vision_dtype
    towers = load_vision_modules(directory, config, sources, vision=vision, vision_revision=vision_revision,
                                 dtype=vision_dtype)
    llm_class, model_class = model_classes(config.encoder_decoder)
    llm_module = llm_class.from_pretrained(llm_source.name, revision=llm_source.revision, dtype=dtype)
    model = model_class.from_pretrained(directory, llm_module, vision=towers.vision, interaction=towers.interaction)
    images = AutoImageProcessor.from_pretrained(image_processor or towers.source.name,
                                                revision=None if image_processor else towers.source.revision)
    return LoadedLMEye(processor, model, images)
