"""LMEye as a vLLM model: any decoder-only LLM vLLM runs, with the static mapping and the IPN inside its forward.

The prompt, as the adapter's ``LMEyeProcessor`` lays out one row by its template (without padding)::

    [bos][text][<img> x N][text][<img-q>][<img-d> x R][response prefix] -> generated answer

The text vLLM is given is the question ``LMEyeProcessor`` reads, with vLLM's ``<img>`` placeholder
where the image goes (none: where the template puts it).

**The image block.** The processor below makes one multimodal placeholder per image that spans the
whole block from the first ``<img>`` to the last ``<img-d>`` slot; only its ``<img>`` positions take
embeddings. The block's ``<img-q>`` and slots must be computed in one forward, so LMEye refuses,
when the model is built, the two engine settings that split a prompt: chunked prefill (vLLM's
``disable_chunked_mm_input`` does not hold a placeholder together when it starts at a chunk's first
token, which the step budget then cuts; the forward checks it and raises) and prefix caching (a
cached prefix could end between ``<img-q>`` and its slots). Without chunked prefill vLLM schedules
every prompt whole.

**What reaches the forward.** ``embed_multimodal`` runs the vision tower and the static mapping
and returns, per image, N rows ``[static token (D) | the IPN's image features, packed]``: the
features travel with the image through vLLM's encoder cache, and ``embed_input_ids`` splits the
rows again, adding the static tokens into the ``<img>`` embeddings (as ``LMEyeModel`` does) and
handing the features to the forward that follows it. The forward sees the flattened tokens of
every scheduled request (``requires_raw_input_tokens``), finds each image's ``<img-q>`` (the first
after its ``<img>`` run) and the slots after it; an adapter that reads its request at the first
slot (``request_position="first_slot"``, the released v1 layout) has no ``<img-q>``, and its
request is read there.

**The schedule: two passes with the cache rewritten.** In a step that holds image blocks the
LLM runs once over the step's tokens (writing their keys and values), the IPN reads each request
from that pass's last hidden state at ``<img-q>``, its tokens are added into the slots'
embeddings, and the LLM runs the step again: every token's keys and values are written again at
the same cache slots, those up to ``<img-q>`` with the same values (the LLM is causal) and the slots
and what follows with the IPN's tokens in them. Steps without an image block (decoding) run once,
and so does every step of the static-only model (``schedule="static"``: no IPN).
Splitting the step at ``<img-q>`` instead would need attention metadata for the part before it,
which vLLM builds outside the model; benchmarks/vllm_serving.py measures what the second pass
costs against the static-only model on the same engine (more than the split could save).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, PlaceholderRange
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdateDetails)
from vllm.sequence import IntermediateTensors

from ..models.config import LMEyeConfig
from ..models.modeling import load_adapter_modules
from ..models.processor import LMEyeProcessor
from ..models.prompts import Turn
from ..models.sources import ModelSources, Source, adapter_processor, load_vision_modules
from ..models.vision import vision_features

__all__ = ["LMEyeForCausalLM", "ServingSettings"]

IMAGE_PLACEHOLDER = "<img>"


@dataclass(frozen=True)
class ServingSettings:
    """The ``lmeye`` record that ``lmeye_fast.serving.hf_overrides`` puts into the LLM's config."""

    llm_architecture: str
    adapter: str
    vision: str
    response_prefix: Optional[str] = None
    schedule: str = "two_pass"

    @classmethod
    def from_hf_config(cls, hf_config) -> "ServingSettings":
        record = getattr(hf_config, "lmeye", None)
        if not isinstance(record, dict):
            raise ValueError("hf_overrides: the LLM's config has no 'lmeye' record; start vLLM with "
                             "hf_overrides=lmeye_fast.serving.hf_overrides(llm, adapter, vision, response_prefix)")
        try:
            return cls(**record)
        except TypeError as exc:
            raise ValueError(f"hf_overrides: the 'lmeye' record {record!r} is not one hf_overrides writes ({exc})") \
                from None


@functools.lru_cache(maxsize=8)
def _adapter_config(adapter: str) -> LMEyeConfig:
    return LMEyeConfig.load(adapter)


@functools.lru_cache(maxsize=8)
def _prompt_processor(adapter: str, llm: str, response_prefix: Optional[str]) -> LMEyeProcessor:
    """The processor the adapter was saved with (or, without one, on the LLM's tokenizer): it lays out prompts."""
    return adapter_processor(adapter, _adapter_config(adapter), Source(llm), response_prefix=response_prefix)


@functools.lru_cache(maxsize=8)
def _image_processor(vision: str):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(vision)


def _packed_width(config: LMEyeConfig) -> int:
    """Columns each of an image's N rows carries beside its static token: the IPN's M x Dv features, packed."""
    return math.ceil(_ipn_tokens(config) * config.vision_dim / config.num_image_tokens)


def _ipn_tokens(config: LMEyeConfig) -> int:
    """M, the IPN's image tokens: one for the pooled or projected embedding, N for "tokens" read by both consumers."""
    if config.ipn_feature != "tokens":
        return 1
    if config.static_feature == "tokens":
        return config.num_image_tokens
    raise ValueError("adapter: the IPN reads every vision token while the static mapping reads one; serving "
                     "needs the IPN's token count, which the adapter's config does not record")


def check_engine_settings(vllm_config: VllmConfig) -> None:
    """Refuse the engine settings under which an image block could be split (module docstring)."""
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    if cache.enable_prefix_caching:
        raise ValueError("LMEye on vLLM: prefix caching is not supported (a cached prefix could end between "
                         "<img-q> and its <img-d> slots, leaving the IPN without the request's hidden state); "
                         "start vLLM with --no-enable-prefix-caching (LLM(..., enable_prefix_caching=False))")
    if scheduler.enable_chunked_prefill:
        raise ValueError("LMEye on vLLM: chunked prefill is not supported (it can split a prompt between <img-q> "
                         "and its <img-d> slots, which one forward must compute together); start vLLM with "
                         "--no-enable-chunked-prefill (LLM(..., enable_chunked_prefill=False))")


class LMEyeProcessingInfo(BaseProcessingInfo):
    def settings(self) -> ServingSettings:
        return ServingSettings.from_hf_config(self.get_hf_config())

    def lmeye_config(self) -> LMEyeConfig:
        return _adapter_config(self.settings().adapter)

    def image_processor(self):
        return _image_processor(self.settings().vision)

    def prompt_processor(self) -> LMEyeProcessor:
        """The adapter's ``LMEyeProcessor``, checked to read the LMEye tokens as vLLM's tokenizer does."""
        settings = self.settings()
        processor = _prompt_processor(settings.adapter, self.ctx.model_config.model, settings.response_prefix)
        tokenizer = self.get_tokenizer()
        tokens = (processor.image_token, processor.request_token, processor.slot_token)
        ids = tuple(tokenizer.convert_tokens_to_ids(token) for token in tokens)
        if ids != self.lmeye_config().token_ids() or len(tokenizer) != len(processor):
            raise ValueError(f"tokenizer: vLLM's tokenizer reads {tokens} as {ids} in a vocabulary of {len(tokenizer)} "
                             f"tokens, the adapter's as {self.lmeye_config().token_ids()} in {len(processor)}; "
                             f"start vLLM with --tokenizer {settings.adapter}")
        return processor

    def get_default_tok_params(self):
        # LMEyeProcessor puts BOS itself (LMEyeMultiModalProcessor._postprocess_prompt).
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)

    def get_supported_mm_limits(self) -> Mapping[str, Optional[int]]:
        return {"image": 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.lmeye_config().num_image_tokens}

    def image_size(self) -> int:
        processor = self.image_processor()
        crop = getattr(processor, "crop_size", None) or {}
        size = crop.get("height") or (getattr(processor, "size", None) or {}).get("shortest_edge")
        if not isinstance(size, int):
            raise ValueError(f"vision: the image processor in {self.settings().vision} names no crop or edge size")
        return size


class LMEyeDummyInputsBuilder(BaseDummyInputsBuilder[LMEyeProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options):
        size = self.info.image_size()
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image") if mm_options else None)}


class LMEyeMultiModalProcessor(BaseMultiModalProcessor[LMEyeProcessingInfo]):
    """The prompt laid out by the adapter's ``LMEyeProcessor`` (its template, ``LMEyeProcessor.row``); the
    image's placeholder spans the block from its first ``<img>`` to its last ``<img-d>`` slot."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = [image.convert("RGB") for image in hf_data.get("images", [])]
        pixels = self.info.image_processor()(images=images, return_tensors="pt")["pixel_values"]
        return BatchFeature({"pixel_values": pixels})

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _postprocess_prompt(self, prompt: List[int]) -> List[int]:
        """vLLM's tokens of the prompt's text, laid out again as ``LMEyeProcessor`` lays out that text
        (as ``LMEyeModel.generate`` reads it), with one ``<img>`` for vLLM to expand into the image's N."""
        processor = self.info.prompt_processor()
        config = self.info.lmeye_config()
        image, request, slot = config.token_ids()
        found = [token for token in (request, slot) if token in prompt]
        if found or prompt.count(image) > 1:
            raise ValueError(f"prompt: expected at most one {IMAGE_PLACEHOLDER!r} and none of LMEye's request and "
                             f"slot tokens (ids {request}, {slot}), which the processor adds; got {prompt}")
        text = self.info.get_tokenizer().decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        bos = processor.tokenizer.bos_token
        if processor.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        row = processor.row([Turn(text)])
        start = row.image_start
        return (row.prefix[:start + 1] + row.prefix[start + processor.num_image_tokens:]
                + [slot] * processor.num_requests + row.body)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.lmeye_config()
        tokens = [config.image_token_id] * config.num_image_tokens
        return [PromptReplacement(modality="image", target=[config.image_token_id],
                                  replacement=PromptUpdateDetails.select_token_id(tokens, config.image_token_id))]

    def apply(self, inputs, timing_ctx):
        out = super().apply(inputs, timing_ctx)
        config = self.info.lmeye_config()
        ids = list(out["prompt_token_ids"])
        (start,) = [placeholder.offset for placeholder in out["mm_placeholders"]["image"]]
        end = len(ids) - ids[::-1].index(config.slot_token_id)
        is_embed = torch.tensor(ids[start:end], dtype=torch.long) == config.image_token_id
        out["mm_placeholders"] = {"image": [PlaceholderRange(offset=start, length=end - start, is_embed=is_embed)]}
        return out


@MULTIMODAL_REGISTRY.register_processor(LMEyeMultiModalProcessor, info=LMEyeProcessingInfo,
                                        dummy_inputs=LMEyeDummyInputsBuilder)
class LMEyeForCausalLM(nn.Module, SupportsMultiModal):
    """vLLM's model for an LMEye adapter on a decoder-only LLM (module docstring)."""

    requires_raw_input_tokens = True  # the forward finds <img-q> and its slots among the step's tokens

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> Optional[str]:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError(f"LMEye reads images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        check_engine_settings(vllm_config)
        hf_config = vllm_config.model_config.hf_config
        settings = ServingSettings.from_hf_config(hf_config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=hf_config,
                                                             prefix=maybe_prefix(prefix, "language_model"),
                                                             architectures=[settings.llm_architecture])
        width = hf_config.hidden_size
        # The adapter in float32 and the vision tower in the LLM's dtype, as lmeye_fast.eval loads them; a CLIP
        # text interaction, part of the IPN, in the adapter's float32 (and with it the vision tower it shares).
        config = _adapter_config(settings.adapter)
        towers = load_vision_modules(settings.adapter, config, ModelSources.load(settings.adapter),
                                     vision=settings.vision, dtype=torch.float32 if config.interaction != "attention"
                                     else vllm_config.model_config.dtype)
        adapter = load_adapter_modules(settings.adapter, width, dtype=torch.float32, interaction=towers.interaction)
        self.lmeye_config, self.static, self.ipn = adapter.config, adapter.static, adapter.ipn
        # Per special token (<img>, <img-q>, <img-d>): whether its learned row is added to the LLM's word row.
        self.adds_word_row = tuple(mode == "add" for mode in adapter.config.row_modes)
        self.register_buffer("special_embed", adapter.special_embed, persistent=False)
        self.register_buffer("never_generated", torch.tensor([i for i in adapter.config.token_ids() if i is not None]),
                             persistent=False)
        vocab = hf_config.vocab_size
        if max(adapter.config.token_ids()) >= vocab:
            raise ValueError(f"llm: its vocabulary ({vocab} tokens) does not hold LMEye's special tokens (ids "
                             f"{adapter.config.token_ids()}); save the LLM with its embeddings resized to the "
                             "tokenizer (llm.resize_token_embeddings(len(processor)))")
        self.vision = towers.vision.requires_grad_(False).eval()
        self.packed_width = _packed_width(adapter.config)
        self.runs_ipn = settings.schedule == "two_pass"
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self._step: Optional[_StepImages] = None

    # ------------------------------------------------------------------ images

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixels = kwargs.get("pixel_values")
        if pixels is None:
            return []
        config = self.lmeye_config
        tower = next(self.vision.parameters())
        pixels = torch.stack(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
        with torch.no_grad():
            out = vision_features(self.vision, pixels.to(tower.device, tower.dtype),
                                  (config.static_feature, config.ipn_feature))
        static = self.static.mapped(out[config.static_feature])                 # (B, N, D)
        features = out[config.ipn_feature].reshape(static.shape[0], -1)         # (B, M * Dv)
        packed = features.new_zeros(static.shape[0], config.num_image_tokens * self.packed_width)
        packed[:, :features.shape[1]] = features
        rows = torch.cat([static, packed.to(static.dtype).view(static.shape[0], config.num_image_tokens, -1)], -1)
        return list(rows)

    def _unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """One image's IPN features (M, Dv) from its N rows."""
        config = self.lmeye_config
        count = _ipn_tokens(config) * config.vision_dim
        return rows[:, self.hidden_size:].reshape(-1)[:count].view(-1, config.vision_dim)

    @property
    def hidden_size(self) -> int:
        return self.special_embed.shape[1]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Optional[MultiModalEmbeddings] = None,
                        *, is_multimodal: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LLM's token embeddings, with the ``<img>`` rows of the step's image blocks made as
        ``LMEyeModel`` makes them (the adapter's ``<img>`` embedding plus the static token). The
        block's ``<img-q>`` and ``<img-d>`` rows get theirs in ``forward`` (LMEye's tokens are never
        generated: ``compute_logits``)."""
        embeds = self.language_model.embed_input_ids(input_ids)
        items = list(multimodal_embeddings) if multimodal_embeddings is not None else []
        self._step = _StepImages(is_multimodal, items) if items else None
        if items:
            rows = torch.cat([item[:, :self.hidden_size] for item in items]).to(embeds.device)
            mask = is_multimodal.to(embeds.device)
            embeds[mask] = (self._special_rows(0, embeds[mask]) + rows.float()).to(embeds.dtype)
        return embeds

    def _special_rows(self, index: int, word_rows: torch.Tensor) -> torch.Tensor:
        """The input rows (float32) of the special token ``index`` (0 ``<img>``, 1 ``<img-q>``, 2 ``<img-d>``) at
        positions whose LLM word rows are ``word_rows``: its learned row, added to them or in their place
        (``LMEyeConfig.special_rows``), as ``LMEyeModel.embed`` makes them."""
        learned = self.special_embed[index].expand_as(word_rows)
        return learned + word_rows.float() if self.adds_word_row[index] else learned

    # ------------------------------------------------------------------ forward

    def _requests(self, input_ids: torch.Tensor, step: "_StepImages"):
        """(each image's <img-q> index among the step's tokens (K,), its slots' indices (K, R), features (K, M, Dv))."""
        config = self.lmeye_config
        count = config.num_image_tokens
        if any(item.shape[0] != count for item in step.items):
            raise RuntimeError("LMEye on vLLM: an image block was split across scheduler steps (its static tokens "
                               f"came {[item.shape[0] for item in step.items]} at a time, expected {count}); "
                               "run vLLM without chunked prefill and prefix caching")
        ids = input_ids.cpu()
        image_at = step.is_multimodal.cpu().nonzero()[:, 0]
        last_image_token = image_at[count - 1::count].contiguous()
        # The block's anchor, the first of its token after the image: <img-q>, whose slots follow it, or the
        # first <img-d> slot where the adapter reads its request there (request_position="first_slot").
        at_request_token = config.request_position == "request_token"
        anchor, name = ((config.request_token_id, "<img-q>") if at_request_token else (config.slot_token_id, "<img-d>"))
        anchors = (ids == anchor).nonzero()[:, 0]
        found = torch.searchsorted(anchors, last_image_token)
        if len(image_at) != count * len(step.items) or bool((found >= len(anchors)).any()):
            raise RuntimeError(f"LMEye on vLLM: a step holds an image without its {name} token after it")
        request_at = anchors[found]
        slots_at = request_at[:, None] + int(at_request_token) + torch.arange(config.slots)
        if int(slots_at.max()) >= len(ids) or not bool((ids[slots_at] == config.slot_token_id).all()):
            raise RuntimeError(f"LMEye on vLLM: an image's {name} token in this step does not begin its "
                               f"{config.slots} <img-d> slots")
        features = torch.stack([self._unpack(item) for item in step.items])
        device = input_ids.device
        return request_at.to(device), slots_at.to(device), features.to(device)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                intermediate_tensors: Optional[IntermediateTensors] = None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs: object):
        step, self._step = self._step, None
        llm = self.language_model.model
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        if step is None:
            return llm(None, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        request_at, slots_at, features = self._requests(input_ids, step)
        slots = slots_at.reshape(-1)
        embeds = inputs_embeds.clone()
        if self.lmeye_config.request_position == "request_token":
            embeds[request_at] = self._special_rows(1, inputs_embeds[request_at]).to(embeds.dtype)
        slot_rows = self._special_rows(2, inputs_embeds[slots])
        embeds[slots] = slot_rows.to(embeds.dtype)
        if not self.runs_ipn:  # the static-only model: the slots keep their learned rows
            return llm(None, positions, intermediate_tensors, inputs_embeds=embeds)
        # A copy: vLLM's fused residual norms may write into the tensor a layer stack was given.
        hidden = llm(None, positions, intermediate_tensors, inputs_embeds=embeds.clone())
        transmitted = self.ipn.transmitted(hidden[request_at], features)          # (K, slots, D)
        embeds[slots] = (slot_rows + transmitted.reshape(slots.shape[0], -1).float()).to(embeds.dtype)
        return llm(None, positions, intermediate_tensors, inputs_embeds=embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """The LLM's logits with LMEye's tokens ruled out: they are placeholders of the prompt, never part of an
        answer (``LMEyeModel.generate`` suppresses them too)."""
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:
            logits.index_fill_(1, self.never_generated.to(logits.device), float("-inf"))
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The LLM's weights from its checkpoint; the adapter and the vision tower were read from their own
        directories when the model was built."""
        loaded = {f"language_model.{name}" for name in self.language_model.load_weights(weights)}
        own = {name for name, _ in self.named_parameters() if not name.startswith("language_model.")}
        return loaded | own


@dataclass
class _StepImages:
    """What ``embed_input_ids`` saw of the step's images, for the forward that follows it."""

    is_multimodal: torch.Tensor
    items: Sequence[torch.Tensor]
