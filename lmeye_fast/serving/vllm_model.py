"""LMEye as a vLLM model: any decoder-only LLM vLLM runs, with the static mapping and the IPN inside its forward.

The prompt, as the adapter's ``LMEyeProcessor`` lays out one row by its template (without padding)::

    [bos][text][<img> x N][text][<img-q>][<img-d> x R][response prefix] -> generated answer

The text vLLM is given is the question ``LMEyeProcessor`` reads, with vLLM's ``<img>`` placeholder
where the image goes (none: where the template puts it).

**The image block.** The processor below makes one multimodal placeholder per image that spans the
whole block from the first ``<img>`` to the last ``<img-d>`` slot; its ``<img>``, ``<img-q>`` and
``<img-d>`` positions take embeddings from the image's encoder output, one row each (the text
between them takes the LLM's word embeddings).

**What reaches the forward.** ``embed_multimodal`` runs the vision tower and the static mapping
and returns, per image, one row per embedding position of its block: the N ``<img>`` rows are
``[static token (D) | the IPN's image features, packed]``, the ``<img-q>`` row and the slot rows
start empty. vLLM's encoder cache keeps that tensor until the block is computed, and hands the
model the rows of the positions each step computes (``embed_input_ids``), which get the adapter's
learned rows as ``LMEyeModel.embed`` makes them, plus the row's content: the static token at
``<img>``, the transmitted token at ``<img-d>``. The image's cache key covers the prompt too, since
the transmitted tokens depend on it.

**The schedule.** In the step that computes a block's anchor (its ``<img-q>``, or its first slot for
an adapter that reads its request there, ``request_position="first_slot"``, the released v1
layout), the forward runs the LLM over the step, reads the anchor's hidden state, runs the IPN and
writes the transmitted tokens into the slot rows of the image's cached encoder output:

- ``single_pass`` (the default where the anchor is ``<img-q>``): ``LMEyeScheduler``
  (``scheduler.py``) ends that step at ``<img-q>``, so the slots come in a later step and take their
  tokens from the cache; every token runs through the LLM once.
- ``two_pass`` (the default for the first-slot layout, whose anchor is itself a slot): where slots
  of a block are in the step that computed its anchor, the LLM runs the step again with their
  tokens in them, so every key and value of the step is written again at the same cache slots (the
  prefix's unchanged, the LLM being causal).
- ``static``: the static-only model, one pass over every step and no IPN.

Decoding steps run once. Chunked prefill splits prompts anywhere and stays exact: an anchor's
step always precedes its slots' or holds them. Prefix caching is refused when the model is built (a
cached prefix could end between the anchor and its slots, leaving the IPN without the anchor's
hidden state).
"""

from __future__ import annotations

import functools
import hashlib
import math
import weakref
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

from . import SCHEDULER
from ..models.config import LMEyeConfig
from ..models.modeling import load_adapter_modules
from ..models.processor import LMEyeProcessor
from ..models.prompts import Turn
from ..models.sources import ModelSources, Source, adapter_processor, load_vision_modules
from ..models.vision import vision_features

__all__ = ["LMEyeForCausalLM", "ServingSettings"]

IMAGE_PLACEHOLDER = "<img>"
# The special tokens' indices in the adapter's special rows (``special_embed``, ``LMEyeConfig.row_modes``).
IMAGE_ROW, REQUEST_ROW, SLOT_ROW = 0, 1, 2


@dataclass(frozen=True)
class ServingSettings:
    """The ``lmeye`` record that ``lmeye_fast.serving.hf_overrides`` puts into the LLM's config."""

    llm_architecture: str
    adapter: str
    vision: str
    response_prefix: Optional[str] = None
    schedule: str = "auto"

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


@dataclass(frozen=True)
class ServingLayout:
    """How an adapter's image block is served: the schedule (``ServingSettings.schedule`` with
    ``"auto"`` resolved), N, R, and the rows of the block's encoder output: N ``<img>`` rows, then
    the ``<img-q>`` row where the adapter has that token, then the R slot rows. The anchor, whose
    hidden state is the request, is row N: ``<img-q>``, or the first slot."""

    schedule: str
    num_image_tokens: int
    slots: int
    has_request_token: bool

    @property
    def anchor_row(self) -> int:
        return self.num_image_tokens

    @property
    def first_slot_row(self) -> int:
        return self.num_image_tokens + int(self.has_request_token)

    @property
    def rows(self) -> int:
        return self.first_slot_row + self.slots


def serving_layout(settings: ServingSettings) -> ServingLayout:
    """The layout and the schedule of the adapter that ``settings`` serve, refused by name where the
    schedule asked for cannot run on it."""
    config = _adapter_config(settings.adapter)
    has_request_token = config.request_position == "request_token"
    schedule = settings.schedule
    if schedule == "auto":
        schedule = "single_pass" if has_request_token else "two_pass"
    elif schedule == "single_pass" and not has_request_token:
        raise ValueError("schedule: 'single_pass' ends a step at <img-q>, and this adapter has none (it reads its "
                         "request at its first <img-d> slot, request_position='first_slot', a slot the IPN then "
                         "writes); serve it with schedule='two_pass' or 'auto'")
    return ServingLayout(schedule, config.num_image_tokens, config.slots, has_request_token)


def check_engine_settings(vllm_config: VllmConfig, layout: ServingLayout) -> None:
    """Refuse the engine settings the schedule cannot run under (module docstring)."""
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    if cache.enable_prefix_caching:
        raise ValueError("LMEye on vLLM: prefix caching is not supported (a cached prefix could end between "
                         "<img-q> and its <img-d> slots, leaving the IPN without the request's hidden state); "
                         "start vLLM with --no-enable-prefix-caching (LLM(..., enable_prefix_caching=False))")
    if layout.schedule == "single_pass":
        from .scheduler import LMEyeScheduler

        chosen = scheduler.get_scheduler_cls()
        if not (isinstance(chosen, type) and issubclass(chosen, LMEyeScheduler)):
            raise ValueError(f"LMEye on vLLM: the single-pass schedule needs LMEye's scheduler, which ends a step at "
                             f"<img-q>, and vLLM runs {getattr(chosen, '__qualname__', chosen)}; start vLLM with "
                             f"--scheduler-cls {SCHEDULER} (LLM(..., scheduler_cls={SCHEDULER!r}), in "
                             f"lmeye_fast.serving.ENGINE_ARGS), or serve with schedule='two_pass'")


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

    def layout(self) -> ServingLayout:
        return serving_layout(self.settings())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.layout().rows}

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
        block = torch.tensor(ids[start:end], dtype=torch.long)
        lmeye_ids = torch.tensor([i for i in config.token_ids() if i is not None])
        is_embed = torch.isin(block, lmeye_ids)
        rows = self.info.layout().rows
        if int(is_embed.sum()) != rows:
            raise ValueError(f"prompt: the image block {ids[start:end]} does not hold the {rows} LMEye tokens of "
                             f"its layout")
        out["mm_placeholders"] = {"image": [PlaceholderRange(offset=start, length=end - start, is_embed=is_embed)]}
        # The encoder output carries this prompt's transmitted tokens (module docstring): one cache entry per
        # image and prompt, not per image.
        (image_hash,) = out["mm_hashes"]["image"]
        key = hashlib.sha256(f"{image_hash}:{ids}".encode()).hexdigest()
        out["mm_hashes"] = {"image": [key]}
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
        hf_config = vllm_config.model_config.hf_config
        settings = ServingSettings.from_hf_config(hf_config)
        self.layout = serving_layout(settings)
        check_engine_settings(vllm_config, self.layout)
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
        self.register_buffer("special_embed", adapter.special_embed, persistent=False)
        # Per special token (<img>, <img-q>, <img-d>): whether its learned row is added to the LLM's word row.
        self.register_buffer("adds_word_row", torch.tensor([mode == "add" for mode in adapter.config.row_modes]),
                             persistent=False)
        self.register_buffer("never_generated", torch.tensor([i for i in adapter.config.token_ids() if i is not None]),
                             persistent=False)
        vocab = hf_config.vocab_size
        if max(adapter.config.token_ids()) >= vocab:
            raise ValueError(f"llm: its vocabulary ({vocab} tokens) does not hold LMEye's special tokens (ids "
                             f"{adapter.config.token_ids()}); save the LLM with its embeddings resized to the "
                             "tokenizer (llm.resize_token_embeddings(len(processor)))")
        self.vision = towers.vision.requires_grad_(False).eval()
        self.packed_width = _packed_width(adapter.config)
        # The special token of each row of an image block's encoder output.
        layout = self.layout
        kinds = ([IMAGE_ROW] * layout.num_image_tokens + [REQUEST_ROW] * int(layout.has_request_token)
                 + [SLOT_ROW] * layout.slots)
        self.register_buffer("row_kinds", torch.tensor(kinds), persistent=False)
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        # Each image's encoder output by the address of its storage: vLLM hands a step slices of it, and the
        # forward writes the transmitted tokens into the whole (weak: vLLM's encoder cache owns them).
        self._block_outputs: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
        self._step: Optional[_StepImages] = None

    # ------------------------------------------------------------------ images

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixels = kwargs.get("pixel_values")
        if pixels is None:
            return []
        config, layout = self.lmeye_config, self.layout
        tower = next(self.vision.parameters())
        pixels = torch.stack(list(pixels)) if isinstance(pixels, (list, tuple)) else pixels
        with torch.no_grad():
            out = vision_features(self.vision, pixels.to(tower.device, tower.dtype),
                                  (config.static_feature, config.ipn_feature))
        static = self.static.mapped(out[config.static_feature])                 # (B, N, D)
        features = out[config.ipn_feature].reshape(static.shape[0], -1)         # (B, M * Dv)
        images, tokens, width = static.shape
        blocks = static.new_zeros(images, layout.rows, width + self.packed_width)
        blocks[:, :tokens, :width] = static
        packed = features.new_zeros(images, tokens * self.packed_width)
        packed[:, :features.shape[1]] = features
        blocks[:, :tokens, width:] = packed.view(images, tokens, self.packed_width).to(blocks.dtype)
        outputs = [block.clone() for block in blocks]  # each its own storage, found again by its address
        for output in outputs:
            self._block_outputs[output.untyped_storage().data_ptr()] = output
        return outputs

    def _block_output(self, rows: torch.Tensor) -> torch.Tensor:
        """The whole encoder output of the image block that ``rows`` (a slice vLLM handed over) belong to."""
        block = self._block_outputs.get(rows.untyped_storage().data_ptr())
        if block is None:
            raise RuntimeError("LMEye on vLLM: a step's image rows are not an encoder output of this model")
        return block

    def _first_row(self, rows: torch.Tensor) -> int:
        """The block row that the slice ``rows`` starts at."""
        return rows.storage_offset() // rows.stride(0)

    def _features(self, block: torch.Tensor) -> torch.Tensor:
        """One image's IPN features (M, Dv) from its block's encoder output."""
        config = self.lmeye_config
        count = _ipn_tokens(config) * config.vision_dim
        return block[:config.num_image_tokens, self.hidden_size:].reshape(-1)[:count].view(-1, config.vision_dim)

    @property
    def hidden_size(self) -> int:
        return self.special_embed.shape[1]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Optional[MultiModalEmbeddings] = None,
                        *, is_multimodal: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LLM's token embeddings, with the rows of the step's image blocks made as ``LMEyeModel.embed``
        makes them: each LMEye token's learned row (added to its word row or in its place), plus the row's
        content, the static token at ``<img>``, the transmitted token at ``<img-d>``. LMEye's tokens are
        never generated (``compute_logits``)."""
        embeds = self.language_model.embed_input_ids(input_ids)
        items = list(multimodal_embeddings) if multimodal_embeddings is not None else []
        self._step = _StepImages(is_multimodal, items) if items else None
        if items:
            kinds = torch.cat([self.row_kinds[self._first_row(item):][:item.shape[0]] for item in items])
            content = torch.cat([item[:, :self.hidden_size] for item in items]).to(embeds.device)
            mask = is_multimodal.to(embeds.device)
            embeds[mask] = (self._special_rows(kinds, embeds[mask]) + content.float()).to(embeds.dtype)
        return embeds

    def _special_rows(self, kinds: torch.Tensor, word_rows: torch.Tensor) -> torch.Tensor:
        """The input rows (float32), without content, of LMEye tokens of ``kinds`` (0 ``<img>``, 1 ``<img-q>``,
        2 ``<img-d>``) at positions whose LLM word rows are ``word_rows``: each one's learned row, added to
        its word row or in its place (``LMEyeConfig.special_rows``)."""
        adds = self.adds_word_row[kinds][:, None]
        return self.special_embed[kinds] + torch.where(adds, word_rows.float(), 0.0)

    # ------------------------------------------------------------------ forward

    def _anchors(self, step: "_StepImages") -> "_StepAnchors":
        """The blocks whose anchor this step computes: the anchors' and their slots' indices among the
        step's tokens, and each block's encoder output."""
        layout = self.layout
        token_at = step.is_multimodal.nonzero()[:, 0].tolist()
        anchors, slot_tokens, slot_blocks, slot_rows, blocks = [], [], [], [], []
        offset = 0
        for item in step.items:
            first, count = self._first_row(item), item.shape[0]
            if first <= layout.anchor_row < first + count:
                blocks.append(self._block_output(item))
                anchors.append(token_at[offset + layout.anchor_row - first])
                for row in range(max(first, layout.first_slot_row), first + count):
                    slot_tokens.append(token_at[offset + row - first])
                    slot_blocks.append(len(blocks) - 1)
                    slot_rows.append(row - layout.first_slot_row)
            offset += count
        if offset != len(token_at):
            raise RuntimeError(f"LMEye on vLLM: the step's image rows ({offset}) and embedding positions "
                               f"({len(token_at)}) disagree")
        return _StepAnchors(anchors, slot_tokens, slot_blocks, slot_rows, blocks)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                intermediate_tensors: Optional[IntermediateTensors] = None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs: object):
        step, self._step = self._step, None
        llm = self.language_model.model
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        anchors = self._anchors(step) if step is not None and self.layout.schedule != "static" else None
        if not anchors:
            return llm(None, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        if not anchors.slot_tokens:  # the single pass: the slots come in a later step, from the cache
            hidden = llm(None, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
            self._transmit(hidden, anchors)
            return hidden
        # Two passes. The slots computed with their anchor go without content into the pass that reads the
        # anchor (a block seen before may hold a transmitted token), with their tokens into the pass after it.
        device = inputs_embeds.device
        slot_tokens = torch.tensor(anchors.slot_tokens, dtype=torch.long, device=device)
        slot_words = self.language_model.embed_input_ids(input_ids[slot_tokens])
        empty_slots = self._special_rows(self.row_kinds.new_full((len(anchors.slot_tokens),), SLOT_ROW), slot_words)
        embeds = inputs_embeds.clone()
        embeds[slot_tokens] = empty_slots.to(embeds.dtype)
        # A copy: vLLM's fused residual norms may write into the tensor a layer stack was given.
        transmitted = self._transmit(llm(None, positions, intermediate_tensors, inputs_embeds=embeds.clone()), anchors)
        own = transmitted[torch.tensor(anchors.slot_blocks, device=device), torch.tensor(anchors.slot_rows,
                                                                                            device=device)]
        embeds[slot_tokens] = (empty_slots + own.float()).to(embeds.dtype)
        return llm(None, positions, intermediate_tensors, inputs_embeds=embeds)

    def _transmit(self, hidden: torch.Tensor, anchors: "_StepAnchors") -> torch.Tensor:
        """The IPN's tokens (K, slots, D) from the hidden states at the step's anchors, written into the slot
        rows of their blocks' encoder outputs, where later steps read them."""
        device = hidden.device
        requests = hidden[torch.tensor(anchors.anchors, dtype=torch.long, device=device)]
        features = torch.stack([self._features(block) for block in anchors.blocks]).to(device)
        transmitted = self.ipn.transmitted(requests, features)
        first, count = self.layout.first_slot_row, self.layout.slots
        for block, tokens in zip(anchors.blocks, transmitted):
            block[first:first + count, :self.hidden_size] = tokens.to(block.dtype)
        return transmitted

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
class _StepAnchors:
    """The image blocks whose anchor a step computes (``LMEyeForCausalLM._anchors``): per block its anchor's
    index among the step's tokens and its encoder output; per slot of those blocks in the step, its token
    index, its block and its slot number."""

    anchors: List[int]
    slot_tokens: List[int]
    slot_blocks: List[int]
    slot_rows: List[int]
    blocks: List[torch.Tensor]

    def __bool__(self) -> bool:
        return bool(self.anchors)


@dataclass
class _StepImages:
    """What ``embed_input_ids`` saw of the step's images, for the forward that follows it."""

    is_multimodal: torch.Tensor
    items: Sequence[torch.Tensor]
