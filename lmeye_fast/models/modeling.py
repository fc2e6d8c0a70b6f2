"""LMEye around any Hugging Face causal LM: the schedules, generation, save/load.

Schedules (all read the same ``LMEyeProcessor`` batch):

``two_pass``
    Faithful to the published method: one full LLM pass reads the request at
    ``<img-q>``, the IPN fills the ``<img-d>`` slots, and a second full pass
    over the whole sequence produces the logits.
``single_pass``
    The LLM is causal and every slot comes after ``<img-q>``, so the prefix
    (columns ``[0, P)``) is the same in both passes of ``two_pass``. It runs
    once with a KV cache, the request is read at its last column, the IPN fills
    the slots of the suffix, and the suffix runs on that cache. Same logits,
    loss and gradients (the prefix stays in the autograd graph through the
    cache), for about half the LLM work.
``static``
    The static-only model: one pass, no IPN (the stage-1 model).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import Cache
from transformers.utils import ModelOutput

from .. import __version__
from ..checks import INDEX_DTYPES, check_positions, check_tensor, validating
from ..layers import InteractiveLayer, StaticVisualMapping
from .adapter_files import ADAPTER_FILE, CONFIG_FILE, write_adapter
from .cache import cache_kwarg, checkpointing_enabled, new_cache
from .config import SCHEDULES, LMEyeConfig
from .gathered import gathered
from .processor import IGNORE_INDEX
from .sources import SOURCES_FILE, model_sources
from .vision import feature_shape, vision_features

__all__ = ["LMEyeBaseModel", "LMEyeModel", "LMEyeInputs", "LMEyeOutput", "Prefill", "labelled_loss",
           "next_token_targets", "ADAPTER_FILE", "AdapterModules", "load_adapter_modules"]


@dataclass(frozen=True)
class LMEyeInputs:
    """One checked batch of a decoder-only ``LMEyeModel``, from ``LMEyeModel.prepare_inputs``: what every
    schedule, ``generate``, ``attention_weights`` and ``score_options`` read.

    ``input_ids``, ``attention_mask``, ``position_ids`` (B, T); ``image_pos`` (B, N), the ``<img>``
    columns; ``prefix_len`` P, the columns ``[0, P)`` before the first slot; ``static_features``
    (B, N, Ds), the static mapping's image features, and ``image_features`` (B, M, Dv), the IPN's (one
    tensor twice when both read the same vision output); ``image_mask`` (B, M) or None;
    ``request_pos`` (B,), the column the request is read at; ``slot_pos`` (B, K), the ``<img-d>``
    columns; ``schedule``, one of the model's ``schedules``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_pos: torch.Tensor
    prefix_len: int
    static_features: torch.Tensor
    image_features: torch.Tensor
    image_mask: Optional[torch.Tensor]
    request_pos: torch.Tensor
    slot_pos: torch.Tensor
    schedule: str


@dataclass(frozen=True)
class Prefill:
    """The prefix ``[0, P)`` run once on a fresh KV cache (``LMEyeModel.prefill``): ``cache``, which the
    suffix continues on; ``hidden`` (B, P, D), the LLM's last hidden states; ``logits`` (B, P, V), or
    None unless asked for; ``embeds`` (B, P, D), the prefix's embeddings with the static mapping's image
    tokens, as the LLM read them."""

    cache: Cache
    hidden: torch.Tensor
    logits: Optional[torch.Tensor]
    embeds: torch.Tensor


@dataclass
class LMEyeOutput(ModelOutput):
    """``logits`` (B, T - P, V) are the outputs at the suffix columns ``[P, T)`` (all T
    columns with ``all_logits=True``); ``loss`` is the mean cross-entropy of the
    labelled tokens, or None without labels.

    A ``ModelOutput`` (a dict as well) like every Hugging Face model's output: engines that
    hook a module's output tensors find them in it (DeepSpeed ZeRO-3 re-gathers the
    model's own parameters for the backward pass through those hooks)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


def _adapter_modules(config: LMEyeConfig, llm_dim: int, interaction: Optional[nn.Module],
                     device=None, dtype=None) -> Tuple[StaticVisualMapping, InteractiveLayer]:
    static = StaticVisualMapping(config.static_vision_dim, llm_dim, config.static_hidden_dim, backend=config.backend,
                                 device=device, dtype=dtype)
    ipn = InteractiveLayer(llm_dim, config.vision_dim, config.interaction_dim, config.num_requests, config.sub_features,
                           config.num_heads, interaction if interaction is not None else "attention",
                           backend=config.backend, num_slots=config.num_slots, transmission=config.transmission,
                           device=device, dtype=dtype)
    return static, ipn


def _ipn_state(ipn: InteractiveLayer) -> Dict[str, torch.Tensor]:
    """The IPN's tensors for the adapter file: a frozen user interaction module (a CLIP text encoder)
    comes from its own checkpoint and is passed again when loading, so its weights are left out; one
    with trainable parameters is part of the adapter."""
    state = ipn.state_dict()
    interaction = ipn.interaction
    if interaction is not None and not any(p.requires_grad for p in interaction.parameters()):
        state = {k: v for k, v in state.items() if not k.startswith("interaction.")}
    return state


def _zero_added_rows(llm: nn.Module, words: int) -> None:
    """Zero the embedding and LM-head rows (and head bias) from ``words`` on, which the resize drew from the
    random state: the same adapter then gives the same logits under any seed. The input rows are read only
    where ``special_rows`` adds the learned vector to them (as released: the vector alone then makes the row;
    elsewhere ``embed`` takes LMEye's tokens from ``special_embed``); the head's give LMEye's tokens the logit 0,
    and generation never picks them (``generate`` suppresses them)."""
    head = llm.get_output_embeddings()
    tensors = [llm.get_input_embeddings().weight]
    if head is not None:
        tensors += [head.weight] + ([head.bias] if getattr(head, "bias", None) is not None else [])
    with gathered(tensors, modify=True), torch.no_grad():
        for tensor in tensors:
            tensor[words:].zero_()


class _Embedded(Exception):
    """Stops ``_token_scale``'s probe at the first layer: only the embedding stage is wanted."""


def _token_scale(reader: nn.Module, embedding: nn.Module) -> float:
    """The factor ``reader`` (the module LMEye hands ``inputs_embeds`` to) applies to its token
    embeddings when it embeds ``input_ids`` itself but not to given ``inputs_embeds``; 1.0 otherwise.

    Most LLMs scale inside the embedding module (BART, mBART) or apply their scale to given
    ``inputs_embeds`` as well (Gemma, the Pegasus and Marian decoders), so LMEye's sequence sees the
    text as the LLM does. Some scale only on the ``input_ids`` path (the Pegasus, Marian,
    BlenderbotSmall and MVP encoders with ``scale_embedding``): without this factor their text would
    reach them ``embed_scale`` times too small. Which kind ``reader`` is, its attributes cannot tell,
    so where it has an ``embed_scale`` the probe runs its embedding stage both ways, on one token, and
    compares what its first layer receives.
    """
    scale = getattr(reader, "embed_scale", None)
    if not isinstance(scale, (int, float)) or scale == 1 or getattr(embedding, "embed_scale", None) is not None:
        return 1.0
    first = next((child[0] for child in reader.children() if isinstance(child, nn.ModuleList) and len(child)), None)
    if first is None:
        raise ValueError(f"llm: {type(reader).__name__} has an embed_scale but no list of layers to probe how it "
                         "applies it")
    received = []

    def stop(module, args, kwargs):
        received.append(args[0] if args else kwargs["hidden_states"])
        raise _Embedded

    token = torch.ones(1, 1, dtype=torch.long, device=embedding.weight.device)
    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    training = reader.training
    # The probe stops at the first layer: only the embedding stage's weights (the reader's outside its
    # layer list) are read, and gathered under ZeRO-3.
    layers = {id(p) for child in reader.children() if isinstance(child, nn.ModuleList) for p in child.parameters()}
    embedding_stage = [p for p in reader.parameters() if id(p) not in layers]
    try:
        reader.eval()  # no dropout between the two runs
        with torch.no_grad(), gathered(embedding_stage):
            # ``input_ids=None`` named beside the embeddings: some encoders (FSMT's) require the argument.
            for inputs in (dict(input_ids=token), dict(input_ids=None, inputs_embeds=embedding(token)),
                           dict(input_ids=None, inputs_embeds=embedding(token) * scale)):
                with contextlib.suppress(_Embedded):
                    reader(**inputs)
    finally:
        handle.remove()
        reader.train(training)
    from_ids, given, scaled = received
    if torch.equal(from_ids, given):
        return 1.0
    if torch.allclose(from_ids, scaled):
        return float(scale)
    raise ValueError(f"llm: {type(reader).__name__} embeds input_ids in a way that neither its embedding module nor "
                     "its embed_scale reproduces, so LMEye cannot hand it the text as it would see it")


def _feature_widths(config: LMEyeConfig, vision: Optional[nn.Module]) -> Tuple[int, int]:
    """(IPN feature width Dv, static feature width): the config's, else read off the vision module."""

    def read(feature):
        return None if vision is None else feature_shape(vision, feature)[1]

    vision_dim = config.vision_dim if config.vision_dim is not None else read(config.ipn_feature)
    if vision_dim is None:
        raise ValueError(f"config.vision_dim: required when the vision module does not tell the width of its "
                         f"{config.ipn_feature!r} features (the IPN's)")
    static_dim = config.static_vision_dim if config.static_vision_dim is not None else read(config.static_feature)
    if static_dim is None:
        if vision is not None and config.static_feature != config.ipn_feature:
            raise ValueError(f"config.static_vision_dim: required when the vision module does not tell the width "
                             f"of its {config.static_feature!r} features (the static mapping's)")
        static_dim = vision_dim
    return vision_dim, static_dim


def labelled_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy (in float32) of the ``targets`` (B, L) that are not ``IGNORE_INDEX`` under ``logits``
    (B, L, V), summed and divided by ``num_items_in_batch``; the mean without it.

    The Trainer counts ``num_items_in_batch`` over all micro-batches of an optimizer step and all
    data-parallel ranks, so the step's gradient is that of the mean over the whole global batch,
    however it is split."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    return total / num_items_in_batch


def next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The label shift of a causal LLM: (logits (B, S - 1, V), targets (B, S - 1)), each column's logits beside
    the label they predict. ``logits`` (B, S, V) are those of the last S columns ``[T - S, T)`` of ``labels``
    (B, T) (the suffix ``[P, T)``, or all T columns); column t predicts the label of column t + 1, so the
    last column predicts nothing and the label at ``T - S`` is no target."""
    return logits[:, :-1], labels[:, labels.shape[1] - logits.shape[1] + 1:]


class LMEyeBaseModel(nn.Module, abc.ABC):
    """What every LMEye model shares: a frozen LLM and vision module with LMEye's static mapping, IPN and
    special-token embeddings, their stages, and save/load of the adapter alone.

    Args:
        llm: the frozen LLM, of the kind the subclass wraps (``check_llm``). Its token embeddings are
            resized to ``config.vocab_size`` when the special tokens lie beyond them. Its weights may be
            partitioned by DeepSpeed ZeRO-3 (loaded under ``zero.Init``): what is read from them here is
            gathered.
        config: ``LMEyeConfig``, normally from ``LMEyeProcessor.make_config``.
        vision: a module called as ``vision(pixel_values)`` that returns image
            features (B, N, Dv) or (B, Dv), or a Hugging Face CLIP model
            (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``)
            whose outputs ``config.static_feature`` and ``config.ipn_feature``
            pick (see ``lmeye_fast.models.vision``). None when the caller passes
            ``image_features`` (and ``static_features``) directly.
        interaction: an optional user interaction module for the IPN
            (see ``InteractiveLayer``).

    The LLM and the vision module are frozen (``requires_grad=False``); they
    follow this module's train/eval mode, so that the LLM's gradient
    checkpointing applies (set its dropout to 0 for a deterministic frozen LLM).
    The adapter (static mapping, IPN, special-token embeddings) is created on
    the LLM's device in float32; ``set_stage`` picks what trains.

    What differs with the kind of LLM is each subclass's own: ``LMEyeModel`` (a decoder-only LLM)
    and ``LMEyeSeq2SeqModel`` (an encoder-decoder one) implement ``forward``, ``generate``,
    ``attention_weights``, the loss (``loss_targets``, ``loss``) and the shared-prompt step of
    ``score_options`` (``answer_logits``), each on the batches of its processor.
    """

    schedules: Tuple[str, ...]  # the schedules ``forward``'s ``schedule`` takes
    ipn_schedule: str  # the one of them that runs the IPN at the least cost
    encoder_decoder: bool  # which kind of LLM (its config's ``is_encoder_decoder``) the class wraps

    def __init__(self, llm: nn.Module, config: LMEyeConfig, vision: Optional[nn.Module] = None,
                 interaction: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(config, LMEyeConfig):
            raise TypeError(f"config: expected an LMEyeConfig, got {type(config).__name__}")
        if config.missing_token_ids() or config.vocab_size is None:
            unset = config.missing_token_ids() + (["vocab_size"] if config.vocab_size is None else [])
            raise ValueError(f"config: {', '.join(unset)} unset; build it with LMEyeProcessor.make_config(...)")
        self.check_llm(llm)
        if config.encoder_decoder != self.encoder_decoder:
            raise ValueError(f"config: made for {'an encoder-decoder' if config.encoder_decoder else 'a decoder-only'} "
                             f"LLM (encoder_decoder={config.encoder_decoder}); build the processor with "
                             f"encoder_decoder={self.encoder_decoder}")
        embedding = llm.get_input_embeddings()
        llm_dim = embedding.embedding_dim
        if config.llm_dim is not None and config.llm_dim != llm_dim:
            raise ValueError(f"llm: its embeddings are {llm_dim} wide, but the config was made for "
                             f"llm_dim={config.llm_dim}")
        vision_dim, static_dim = _feature_widths(config, vision)
        count = None if vision is None else feature_shape(vision, config.static_feature)[0]
        if count is not None and count != config.num_image_tokens:
            raise ValueError(f"num_image_tokens: the config has {config.num_image_tokens} <img> slots, but the "
                             f"vision module's {config.static_feature!r} features are {count} tokens per image "
                             f"(build the processor with num_image_tokens={count})")
        if interaction is None and config.interaction != "attention":
            raise ValueError(f"interaction: the config names a user interaction module ({config.interaction}); "
                             "pass an instance of it")
        self.config = LMEyeConfig.from_dict({**config.to_dict(), "llm_dim": llm_dim, "vision_dim": vision_dim,
                                             "static_vision_dim": static_dim, "interaction": "attention" if interaction is None
                                             else type(interaction).__name__,
                                             "interaction_options": getattr(interaction, "options", None)})
        words = embedding.num_embeddings
        token_ids = [i for i in config.token_ids() if i is not None]
        if max(token_ids) >= words:
            llm.resize_token_embeddings(max(config.vocab_size, max(token_ids) + 1), mean_resizing=False)
            _zero_added_rows(llm, words)
            embedding = llm.get_input_embeddings()

        self.llm = llm.requires_grad_(False)
        self.vision = vision.requires_grad_(False) if vision is not None else None
        self.token_scale = _token_scale(self.reader, embedding)
        device = embedding.weight.device
        self.static, self.ipn = _adapter_modules(self.config, llm_dim, interaction, device=device)
        with torch.no_grad(), gathered([embedding.weight]):
            # A replaced <img> row becomes exactly the mapped image tokens (the mapping adds into it);
            # replaced <img-q> and <img-d> rows start as an average word; an added vector starts at zero,
            # leaving the word row as it is.
            mean = embedding.weight[:words].float().mean(dim=0) * self.token_scale
            init = torch.stack([torch.zeros_like(mean), mean, mean])
            modes = self.config.row_modes
            init[torch.tensor([mode == "add" for mode in modes])] = 0
        self.special_embed = nn.Parameter(init.to(device))
        # -1 (no token) for the request token of a layout without one.
        self.register_buffer("special_ids", torch.tensor([-1 if i is None else i for i in config.token_ids()],
                                                          dtype=torch.long, device=device), persistent=False)
        self.register_buffer("replaced_rows", torch.tensor([mode == "replace" for mode in modes], device=device),
                             persistent=False)
        self.set_stage(2)

    @classmethod
    @abc.abstractmethod
    def check_llm(cls, llm: nn.Module) -> None:
        """Refuse, with ``ValueError`` naming why, an LLM this class cannot wrap."""

    # ------------------------------------------------------------------ setup

    def set_stage(self, stage: int, train_special_tokens: bool = False) -> "LMEyeBaseModel":
        """Stage 1 trains the static mapping (captioning); stage 2 the IPN and, if asked,
        the special-token embeddings (instructions). The LLM and vision stay frozen, and a
        user interaction module keeps the ``requires_grad`` it came with (a frozen CLIP text
        encoder stays frozen; one the user made trainable trains)."""
        if stage not in (1, 2):
            raise ValueError(f"stage: expected 1 or 2, got {stage!r}")
        self.static.requires_grad_(stage == 1)
        for name, param in self.ipn.named_parameters():
            if not name.startswith("interaction."):
                param.requires_grad_(stage == 2)
        self.special_embed.requires_grad_(stage == 2 and train_special_tokens)
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------- pieces

    @property
    @abc.abstractmethod
    def reader(self) -> nn.Module:
        """The part of the LLM that reads the sequence LMEye builds (as ``inputs_embeds``)."""

    def encode_images(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One vision pass over ``pixel_values``: ``{"image_features": (B, M, Dv) for the IPN,
        "static_features": (B, N, Ds) for the static mapping}`` (one tensor twice when both read
        the same output), to pass to ``forward`` / ``generate`` in place of ``pixel_values``."""
        if self.vision is None:
            raise ValueError("pixel_values: this model has no vision module; pass image_features (B, M, Dv) "
                             "and static_features (B, N, Ds)")
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = vision_features(self.vision, pixel_values, (self.config.static_feature, self.config.ipn_feature))
        return {"image_features": out[self.config.ipn_feature], "static_features": out[self.config.static_feature]}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, as the LLM would make them from ``input_ids`` (``token_scale``), with the special
        tokens' rows taken from ``special_embed`` (trainable on its own), or that vector added to the word
        row where ``config.special_rows`` says ``"add"``."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if self.token_scale != 1.0:
            embeds = embeds * self.token_scale
        match = input_ids.unsqueeze(-1) == self.special_ids
        special = match.to(embeds.dtype) @ self.special_embed.to(embeds.dtype)
        replaced = (match & self.replaced_rows).any(dim=-1, keepdim=True)
        return torch.where(replaced, special, embeds + special)

    def mapped_embeds(self, input_ids: torch.Tensor, static_features: torch.Tensor,
                      image_pos: torch.Tensor) -> torch.Tensor:
        """``embed(input_ids)`` (B, T, D) with the static mapping's image tokens of ``static_features``
        (B, N, Ds) in the ``<img>`` columns ``image_pos`` (B, N): the sequence before the IPN."""
        return self.static(static_features, self.embed(input_ids), image_pos, inplace=True)

    def _schedule(self, schedule: Optional[str]) -> str:
        schedule = schedule or self.config.schedule
        if schedule not in self.schedules:
            raise ValueError(f"schedule: expected one of {self.schedules}, got {schedule!r}")
        return schedule

    def _token_inputs(self, input_ids, attention_mask):
        """Check the token ids (B, T) and their mask; (B, T, device)."""
        check_tensor("input_ids", input_ids, (None, None), INDEX_DTYPES, dims="(B, T)")
        batch, total = input_ids.shape
        limit = _max_positions(self.llm)
        if limit is not None and total > limit:
            raise ValueError(f"input_ids: {total} tokens, more than the LLM's {limit} positions "
                             f"(config.max_position_embeddings); shorten the prompts")
        check_tensor("attention_mask", attention_mask, (batch, total), INDEX_DTYPES + (torch.bool,),
                     input_ids.device, dims="(B, T)")
        return batch, total, input_ids.device

    def _image_inputs(self, batch, device, pixel_values, image_features, static_features):
        """(static mapping's features (B, N, Ds), IPN's features (B, M, Dv)), from the pixels when not given."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pixel_values / image_features: one of them is required")
            encoded = self.encode_images(pixel_values)
            image_features, static_features = encoded["image_features"], encoded["static_features"]
        if static_features is None:
            if self.config.static_feature != self.config.ipn_feature:
                raise ValueError(f"static_features: required with image_features, since the static mapping reads "
                                 f"the {self.config.static_feature!r} features and the IPN the "
                                 f"{self.config.ipn_feature!r} ones (model.encode_images gives both)")
            static_features = image_features
        check_tensor("image_features", image_features, (batch, None, self.config.vision_dim), device=device,
                     dims="(B, M, Dv)")
        # One tensor read by both consumers is named as the caller passed it.
        static_name = "image_features" if static_features is image_features else "static_features"
        check_tensor(static_name, static_features, (batch, self.config.num_image_tokens,
                                                    self.config.static_vision_dim), device=device, dims="(B, N, Ds)")
        return static_features, image_features

    def _position_inputs(self, batch, device, image_pos, request_pos, slot_pos):
        check_tensor("image_pos", image_pos, (batch, self.config.num_image_tokens), INDEX_DTYPES, device,
                     dims="(B, N)")
        check_tensor("request_pos", request_pos, (batch,), INDEX_DTYPES, device, dims="(B,)")
        check_tensor("slot_pos", slot_pos, (batch, self.config.slots), INDEX_DTYPES, device, dims="(B, K)")

    def _generation_defaults(self, generate_kwargs: dict) -> None:
        """Pad and stop with the processor's tokens unless the caller says otherwise; LMEye's own tokens
        are placeholders of the input, never an answer's, so they are never generated."""
        generate_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        # Beside the tokens the caller or the LLM's generation config suppresses, not instead of them.
        settings = generate_kwargs.get("generation_config") or self.llm.generation_config
        asked = generate_kwargs.get("suppress_tokens", settings.suppress_tokens) or []
        generate_kwargs["suppress_tokens"] = sorted(set(asked) | {i for i in self.config.token_ids() if i is not None})
        if self.config.eos_token_id is not None:
            generate_kwargs.setdefault("eos_token_id", self.config.eos_token_id)

    def check_processor(self, processor) -> None:
        """Refuse a processor that builds the batches of the other kind of LLM."""
        if processor.encoder_decoder != self.encoder_decoder:
            raise ValueError(f"processor: built with encoder_decoder={processor.encoder_decoder}, but the model wraps "
                             f"{'an encoder-decoder' if self.encoder_decoder else 'a decoder-only'} LLM; build it "
                             f"with encoder_decoder={self.encoder_decoder}")

    # ------------------------------------------------------------- what each kind of LLM runs its own way

    @abc.abstractmethod
    def forward(self, *args, **kwargs) -> LMEyeOutput:
        """Run one batch of the model's processor (``model(**batch)``): the logits, and the loss with labels."""

    @abc.abstractmethod
    def generate(self, *args, **generate_kwargs) -> torch.Tensor:
        """The new tokens (B, L) answering a batch of prompts (the processor called without answers)."""

    @abc.abstractmethod
    def attention_weights(self, *args, **kwargs) -> torch.Tensor:
        """What each request of a batch attended to: ``InteractiveLayer.attention_weights`` (B, H, R, M*S)."""

    @staticmethod
    @abc.abstractmethod
    def loss_targets(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets): ``forward``'s logits beside the labels (the batch's ``labels``) they predict."""

    @staticmethod
    @abc.abstractmethod
    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """``labelled_loss`` of ``forward``'s ``outputs`` against the batch's ``labels``: the Trainer's
        ``compute_loss_func`` for this kind of model."""

    @abc.abstractmethod
    def answer_logits(self, answers: torch.Tensor, rows: torch.Tensor, **batch) -> torch.Tensor:
        """The logits (K, L, V) that predict each of K right-padded answers (K, L) given the prompt of row
        ``rows[k]`` of ``batch``, a batch of prompts (the processor's, with ``image_features`` and the like
        and ``schedule``, as ``generate`` takes them): column j predicts ``answers[:, j]``.
        What the prompts share runs once per prompt, the answers once as a batch on it
        (``lmeye_fast.models.scoring.score_options``)."""

    # ------------------------------------------------------------- save / load

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """The adapter's tensors only: static mapping, IPN, special-token embeddings (and a user
        interaction module's weights when any of them trains; a frozen one is passed again when loading)."""
        state = {f"static.{k}": v for k, v in self.static.state_dict().items()}
        state.update({f"ipn.{k}": v for k, v in _ipn_state(self.ipn).items()})
        state["special_embed"] = self.special_embed.detach()
        return state

    def save_pretrained(self, directory) -> None:
        """Write the adapter (``lmeye_adapter.safetensors``), its config (``lmeye_config.json``) and where its LLM,
        vision model and CLIP interaction come from (``lmeye_sources.json``); never the LLM. With the processor's
        ``save_pretrained`` in the same directory, ``lmeye_fast.models.load_pretrained`` needs nothing else.

        A process killed at any moment of the save leaves the adapter that was there or this one, never
        a mix (``adapter_files``: one save id in all three files, the JSON files renamed last)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
        write_adapter(directory, tensors, {"format": "pt", "lmeye_fast": __version__},
                      {CONFIG_FILE: self.config.payload(), SOURCES_FILE: model_sources(self).payload()})

    @classmethod
    def from_pretrained(cls, directory, llm: nn.Module, vision: Optional[nn.Module] = None,
                        interaction: Optional[nn.Module] = None) -> "LMEyeBaseModel":
        """Rebuild the adapter saved in ``directory`` around ``llm`` (and ``vision``).

        The file is checked against the config and the modules before anything
        is built or resized, so a mismatch raises and changes nothing.
        """
        config = LMEyeConfig.load(directory)
        llm_dim = llm.get_input_embeddings().embedding_dim
        if config.llm_dim is not None and config.llm_dim != llm_dim:
            raise ValueError(f"llm: the adapter in {directory} was saved for an LLM {config.llm_dim} wide, "
                             f"this one is {llm_dim} wide")
        if vision is not None:
            for feature, saved in ((config.ipn_feature, config.vision_dim),
                                   (config.static_feature, config.static_vision_dim)):
                width = feature_shape(vision, feature)[1]
                if None not in (width, saved) and width != saved:
                    raise ValueError(f"vision: the adapter in {directory} was saved for {feature!r} vision "
                                     f"features {saved} wide, this module's are {width} wide")
        _check_interaction_options(directory, config.interaction_options, getattr(interaction, "options", None))
        _read_adapter(directory, _adapter_shapes(config, llm_dim, interaction))
        model = cls(llm, config, vision=vision, interaction=interaction)
        model.load_adapter(directory)
        return model

    def load_adapter(self, directory) -> None:
        """Load saved adapter weights into this model; on any mismatch raise and load nothing."""
        saved = LMEyeConfig.load(directory).to_dict()
        mine = self.config.to_dict()
        structural = ("num_image_tokens", "num_requests", "interaction_dim", "sub_features", "num_heads",
                      "static_hidden_dim", "vision_dim", "static_vision_dim", "static_feature", "ipn_feature",
                      "llm_dim", "image_token_id", "request_token_id",
                      "slot_token_id", "interaction", "encoder_decoder", "num_slots", "transmission",
                      "request_position", "special_rows")
        differ = [f"{k}: saved {saved[k]!r}, model {mine[k]!r}" for k in structural if saved[k] != mine[k]]
        _check_interaction_options(directory, saved["interaction_options"], mine["interaction_options"])
        if differ:
            raise ValueError(f"directory: the adapter in {directory} does not fit this model (" + "; ".join(differ)
                             + ")")
        state = self.adapter_state_dict()
        tensors = _read_adapter(directory, {k: tuple(v.shape) for k, v in state.items()})
        with torch.no_grad():
            for key, value in state.items():
                value.copy_(tensors[key])


class LMEyeModel(LMEyeBaseModel):
    """A frozen causal LM (any ``AutoModelForCausalLM``) and vision module with LMEye's static mapping and
    IPN, for ``LMEyeProcessor``'s batches; the arguments are ``LMEyeBaseModel``'s. An encoder-decoder LLM
    (T5, BART) goes into ``LMEyeSeq2SeqModel`` instead."""

    schedules = SCHEDULES
    ipn_schedule = "single_pass"
    encoder_decoder = False

    def __init__(self, llm: nn.Module, config: LMEyeConfig, vision: Optional[nn.Module] = None,
                 interaction: Optional[nn.Module] = None):
        super().__init__(llm, config, vision=vision, interaction=interaction)
        # The keyword the LLM takes its KV cache under (``cache_kwarg``), for callers that run it on ``prefill``'s.
        self.cache_kwarg = cache_kwarg(llm)

    @classmethod
    def check_llm(cls, llm: nn.Module) -> None:
        if getattr(getattr(llm, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"llm: {type(llm).__name__} is an encoder-decoder LLM; wrap it in LMEyeSeq2SeqModel")

    @property
    def decoder(self) -> nn.Module:
        """The LLM without its head: the passes that only need hidden states skip the vocabulary projection."""
        return self.llm.base_model

    @property
    def reader(self) -> nn.Module:
        """The part of the LLM that reads the sequence LMEye builds (as ``inputs_embeds``)."""
        get_decoder = getattr(self.llm, "get_decoder", None)
        return get_decoder() if callable(get_decoder) else self.llm

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        prefix_len: int,
        position_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        request_pos: Optional[torch.Tensor] = None,
        slot_pos: Optional[torch.Tensor] = None,
        schedule: Optional[str] = None,
        validate: bool = False,
    ) -> LMEyeInputs:
        """Check a batch (the keywords of ``forward``) and fill in what it leaves out: ``LMEyeInputs``.

        ``schedule`` defaults to ``config.schedule``; ``position_ids`` to the mask's running count;
        the images are encoded from ``pixel_values`` unless their features are given; ``request_pos``
        defaults to the last column the single pass reads the request at and ``slot_pos`` to the
        first ``config.slots`` columns of the suffix. A tensor of the wrong shape, dtype or device, or
        a ``prefix_len`` outside ``[1, T)``, raises ``ValueError`` naming it; ``validate=True`` also
        checks the positions' values (a host sync)."""
        schedule = self._schedule(schedule)
        batch, total, device = self._token_inputs(input_ids, attention_mask)
        if not isinstance(prefix_len, int) or not 1 <= prefix_len < total:
            raise ValueError(f"prefix_len: expected an int in [1, T) = [1, {total}), got {prefix_len!r}")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        check_tensor("position_ids", position_ids, (batch, total), INDEX_DTYPES, device, dims="(B, T)")
        static_features, image_features = self._image_inputs(batch, device, pixel_values, image_features,
                                                              static_features)
        if request_pos is None:
            request_pos = torch.full((batch,), self._request_reach(prefix_len) - 1, dtype=torch.long, device=device)
        if slot_pos is None:
            slot_pos = prefix_len + torch.arange(self.config.slots, device=device).expand(batch, -1)
        self._position_inputs(batch, device, image_pos, request_pos, slot_pos)
        if validating(validate):
            check_positions("image_pos", image_pos, prefix_len, distinct=True)
            check_positions("request_pos", request_pos, self._request_reach(prefix_len))
            check_positions("slot_pos", slot_pos - prefix_len, total - prefix_len, distinct=True)
        return LMEyeInputs(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           image_pos=image_pos, prefix_len=prefix_len, static_features=static_features,
                           image_features=image_features, image_mask=image_mask, request_pos=request_pos,
                           slot_pos=slot_pos, schedule=schedule)

    def _check_checkpointing(self, schedule):
        if (schedule == "single_pass" and torch.is_grad_enabled() and self.llm.training
                and checkpointing_enabled(self.llm)):
            raise ValueError("schedule='single_pass' does not support gradient checkpointing of the LLM: a "
                             "recomputed layer would extend the prefix's KV cache a second time. Use "
                             "schedule='two_pass', or call llm.gradient_checkpointing_disable()")

    # ------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        prefix_len: int,
        position_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        request_pos: Optional[torch.Tensor] = None,
        slot_pos: Optional[torch.Tensor] = None,
        schedule: Optional[str] = None,
        all_logits: bool = False,
        validate: bool = False,
    ) -> LMEyeOutput:
        """Run one batch of ``LMEyeProcessor`` (``model(**batch)``).

        The images come as ``pixel_values`` (one vision pass), or as
        ``image_features`` (B, M, Dv), the IPN's, with ``static_features``
        (B, N, Ds), the static mapping's (``encode_images`` gives both; when both
        read the same output ``image_features`` alone will do). ``image_mask``
        (B, M) masks the IPN's features. ``request_pos`` must lie in the prefix and ``slot_pos`` in the suffix
        (the processor's layout; ``validate=True`` checks it at the cost of a
        host sync). ``all_logits`` also returns the prefix columns' logits.
        """
        inputs = self.prepare_inputs(input_ids, attention_mask, image_pos, prefix_len, position_ids=position_ids,
                                     pixel_values=pixel_values, image_features=image_features,
                                     static_features=static_features, image_mask=image_mask,
                                     request_pos=request_pos, slot_pos=slot_pos, schedule=schedule,
                                     validate=validate)
        self._check_checkpointing(inputs.schedule)
        run = {"single_pass": self._single_pass, "two_pass": self._two_pass, "static": self._static}[inputs.schedule]
        logits = run(inputs, all_logits)
        suffix_logits = logits[:, prefix_len:] if all_logits else logits
        loss = None
        if labels is not None:
            check_tensor("labels", labels, tuple(input_ids.shape), INDEX_DTYPES, input_ids.device,
                         dims="(B, T), as input_ids")
            loss = labelled_loss(*self.loss_targets(suffix_logits, labels))
        return LMEyeOutput(loss=loss, logits=logits)

    def _keep(self, inputs: LMEyeInputs, all_logits: bool) -> int:
        return 0 if all_logits else inputs.input_ids.shape[1] - inputs.prefix_len

    def _static(self, inputs: LMEyeInputs, all_logits: bool) -> torch.Tensor:
        embeds = self.mapped_embeds(inputs.input_ids, inputs.static_features, inputs.image_pos)
        return self.llm(inputs_embeds=embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                        use_cache=False, logits_to_keep=self._keep(inputs, all_logits)).logits

    def _two_pass(self, inputs: LMEyeInputs, all_logits: bool) -> torch.Tensor:
        embeds = self.mapped_embeds(inputs.input_ids, inputs.static_features, inputs.image_pos)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                              position_ids=inputs.position_ids, use_cache=False).last_hidden_state
        # Out of place: the first pass keeps ``embeds`` for its backward.
        filled = self.ipn(hidden, inputs.image_features, embeds, inputs.slot_pos, request_pos=inputs.request_pos,
                          image_mask=inputs.image_mask)
        return self.llm(inputs_embeds=filled, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                        use_cache=False, logits_to_keep=self._keep(inputs, all_logits)).logits

    def prefill(self, inputs: LMEyeInputs, prefix_logits: bool = False) -> Prefill:
        """Run the prefix ``[0, P)`` of ``inputs`` (its image tokens mapped in) once, on a fresh KV cache:
        the first step of the single pass, of its generation and of ``score_options``. ``prefix_logits``
        also returns the prefix's logits."""
        prefix_len = inputs.prefix_len
        embeds = self.mapped_embeds(inputs.input_ids[:, :prefix_len], inputs.static_features, inputs.image_pos)
        cache = new_cache(self.llm.config)
        common = dict(inputs_embeds=embeds, attention_mask=inputs.attention_mask[:, :prefix_len],
                      position_ids=inputs.position_ids[:, :prefix_len], use_cache=True, **{self.cache_kwarg: cache})
        if prefix_logits:
            out = self.llm(**common, output_hidden_states=True, logits_to_keep=0)
            return Prefill(cache=cache, hidden=out.hidden_states[-1], logits=out.logits, embeds=embeds)
        return Prefill(cache=cache, hidden=self.decoder(**common).last_hidden_state, logits=None, embeds=embeds)

    def _request_reach(self, prefix_len: int) -> int:
        """One past the last column the single pass can read the request at: the prefix's, and the first
        slot's where the request sits there (``request_position="first_slot"``)."""
        return prefix_len + (self.config.request_position == "first_slot")

    def _request_hidden(self, inputs: LMEyeInputs, prefill: Prefill) -> torch.Tensor:
        """The hidden states the single pass reads the request from: the prefix's, and with the request at
        the first slot one more column. That column is a probe: the first slot with its first-pass row
        (before the IPN fills it) runs on the prefix's cache, as in the first of two passes, and its cache
        entry is dropped again, so that the suffix runs with the filled slot in its place."""
        prefix_len, request_pos, cache = inputs.prefix_len, inputs.request_pos, prefill.cache
        reach = self._request_reach(prefix_len)
        if not torch.compiler.is_compiling():
            # A value check (a host sync of B positions): the request outside what this pass computed
            # would otherwise be read as zeros.
            low, high = (int(v) for v in torch.stack([request_pos.min(), request_pos.max()]).tolist())
            if low < 0 or high >= reach:
                raise ValueError(f"request_pos: the single pass reads the request at columns [0, {reach}) (the "
                                 f"prefix{' and the first slot' if reach > prefix_len else ''}), got positions in "
                                 f"[{low}, {high}]; put the request in the prefix or use schedule='two_pass'")
        if reach == prefix_len:
            return prefill.hidden
        probe = self.decoder(inputs_embeds=self.embed(inputs.input_ids[:, prefix_len:reach]),
                             attention_mask=inputs.attention_mask[:, :reach],
                             position_ids=inputs.position_ids[:, prefix_len:reach], use_cache=True,
                             **{self.cache_kwarg: cache}).last_hidden_state
        cache.crop(prefix_len - reach)  # a negative count drops that many positions in every 5.x release
        return torch.cat([prefill.hidden, probe], dim=1)

    def fill_slots(self, inputs: LMEyeInputs, prefill: Prefill) -> torch.Tensor:
        """The suffix's embeddings (B, T - P, D) with the IPN's output in the ``<img-d>`` slots: the IPN
        reads the request the LLM makes at ``request_pos`` from ``prefill`` and the image features of
        ``inputs``. The suffix then runs on ``prefill.cache``; with the request at the first slot
        (``request_position="first_slot"``) that column is run on the cache here and dropped from it
        again, so the cache holds the prefix alone afterwards as before."""
        hidden = self._request_hidden(inputs, prefill)
        prefix_len = inputs.prefix_len
        # The suffix is embedded on its own, so the slots are written in place
        # without touching the prefix embeddings the cached pass still needs.
        suffix = self.embed(inputs.input_ids[:, prefix_len:])
        return self.ipn(hidden, inputs.image_features, suffix, inputs.slot_pos - prefix_len,
                        request_pos=inputs.request_pos, image_mask=inputs.image_mask, inplace=True)

    def _single_pass(self, inputs: LMEyeInputs, all_logits: bool) -> torch.Tensor:
        prefill = self.prefill(inputs, prefix_logits=all_logits)
        suffix = self.fill_slots(inputs, prefill)
        logits = self.llm(inputs_embeds=suffix, attention_mask=inputs.attention_mask,
                          position_ids=inputs.position_ids[:, inputs.prefix_len:], use_cache=True, logits_to_keep=0,
                          **{self.cache_kwarg: prefill.cache}).logits
        return torch.cat([prefill.logits, logits], dim=1) if all_logits else logits

    # ------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        prefix_len: int,
        position_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        request_pos: Optional[torch.Tensor] = None,
        slot_pos: Optional[torch.Tensor] = None,
        schedule: Optional[str] = None,
        labels: Optional[torch.Tensor] = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate answers for a batch of prompts (the processor called without answers).

        ``single_pass`` prefills the prefix, runs the IPN and hands the cache
        to the LLM's own ``generate``, which runs the suffix on it and decodes
        (greedy, sampling, beams: ``generate_kwargs`` go to it). Returns the new
        tokens (B, L).
        """
        del labels  # a training batch may be passed as it is; its answers are not part of the prompt
        inputs = self.prepare_inputs(input_ids, attention_mask, image_pos, prefix_len, position_ids=position_ids,
                                     pixel_values=pixel_values, image_features=image_features,
                                     static_features=static_features, image_mask=image_mask,
                                     request_pos=request_pos, slot_pos=slot_pos, schedule=schedule)
        self._generation_defaults(generate_kwargs)
        limit, new_tokens = _max_positions(self.llm), generate_kwargs.get("max_new_tokens")
        if limit is not None and isinstance(new_tokens, int) and input_ids.shape[1] + new_tokens > limit:
            raise ValueError(f"max_new_tokens: {input_ids.shape[1]} prompt tokens and max_new_tokens={new_tokens} "
                             f"need more than the LLM's {limit} positions; ask for fewer new tokens or shorten "
                             "the prompt")
        if inputs.schedule == "single_pass":
            prefill = self.prefill(inputs)
            suffix = self.fill_slots(inputs, prefill)
            # generate() runs only the columns the cache does not hold yet: the suffix.
            embeds = torch.cat([prefill.embeds, suffix], dim=1)
            generate_kwargs[self.cache_kwarg] = self._expanded_cache(prefill.cache, generate_kwargs)
        else:
            embeds = self.mapped_embeds(input_ids, inputs.static_features, image_pos)
            if inputs.schedule == "two_pass":
                hidden = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask,
                                      position_ids=inputs.position_ids, use_cache=False).last_hidden_state
                embeds = self.ipn(hidden, inputs.image_features, embeds, inputs.slot_pos,
                                  request_pos=inputs.request_pos, image_mask=image_mask, inplace=True)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    @torch.no_grad()
    def attention_weights(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        prefix_len: int,
        position_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        request_pos: Optional[torch.Tensor] = None,
        slot_pos: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """What each request of a batch attended to: ``InteractiveLayer.attention_weights`` (B, H, R, M*S)
        for the requests the LLM makes at ``request_pos`` (the prefix's last hidden states), over the IPN's
        image features (the first slot's, with ``request_position="first_slot"``). The attention interaction
        only: with a user interaction module the layer raises ``ValueError``."""
        del labels, slot_pos  # a batch is passed as it is; only the prefix is read
        inputs = self.prepare_inputs(input_ids, attention_mask, image_pos, prefix_len, position_ids=position_ids,
                                     pixel_values=pixel_values, image_features=image_features,
                                     static_features=static_features, image_mask=image_mask,
                                     request_pos=request_pos, schedule="single_pass")
        hidden = self._request_hidden(inputs, self.prefill(inputs))
        return self.ipn.attention_weights(hidden, inputs.image_features, request_pos=inputs.request_pos,
                                          image_mask=image_mask)

    def _expanded_cache(self, cache, generate_kwargs: dict):
        """The prefix's cache with each row repeated as ``generate`` repeats its inputs (once per beam, or
        per returned sequence): it expands the tensors it is given, never a cache."""
        config = generate_kwargs.get("generation_config") or self.llm.generation_config
        beams = generate_kwargs.get("num_beams", config.num_beams) or 1
        repeats = beams if beams > 1 else generate_kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        return cache

    # ------------------------------------------------------------- loss and scoring

    @staticmethod
    def loss_targets(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``next_token_targets``: the logits of the suffix columns (or of all of them, ``all_logits``) beside
        the labels of the columns after them."""
        return next_token_targets(logits, labels)

    @staticmethod
    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The loss of a decoder-only LLM: ``outputs.logits`` cover the suffix columns ``[P, T)`` of ``labels``
        (B, T), so P is ``T - logits.shape[1]``; the label at column P is never a target. Summed and divided
        by ``num_items_in_batch`` (the mean without it)."""
        return labelled_loss(*next_token_targets(outputs.logits, labels), num_items_in_batch)

    @torch.no_grad()
    def answer_logits(self, answers: torch.Tensor, rows: torch.Tensor, **batch) -> torch.Tensor:
        """``LMEyeBaseModel.answer_logits``: the prefix, the IPN and the suffix head (the slots and the response
        prefix, the same for every answer) once per prompt on a KV cache, then the answers as a batch of
        short continuations on that cache, its rows repeated (not recomputed) once per answer. The first
        answer token is predicted by the head's last column, so answers of one token need no further LLM
        call. ``two_pass`` gives the same logits as ``single_pass`` (the prefix is the same in both passes)."""
        inputs = self.prepare_inputs(**batch)
        mask, pos, prefix_len = inputs.attention_mask, inputs.position_ids, inputs.prefix_len
        prefill = self.prefill(inputs)
        cache = prefill.cache
        if inputs.schedule == "static":
            head = self.embed(inputs.input_ids[:, prefix_len:])
        else:
            head = self.fill_slots(inputs, prefill)
        first = self.llm(inputs_embeds=head, attention_mask=mask, position_ids=pos[:, prefix_len:], use_cache=True,
                         logits_to_keep=1, **{self.cache_kwarg: cache}).logits[rows]
        steps = answers.shape[1] - 1
        if steps == 0:
            return first
        # Each prompt's cache rows, repeated once per answer; answer token j+1 is read off the output at
        # answer token j, so the last answer column never needs to run. Right padding sits after every
        # real token, so causality keeps it out of the real tokens' logits.
        cache.batch_select_indices(rows)
        step_ids = answers[:, :steps]
        step_mask = torch.cat([mask[rows], torch.ones_like(step_ids, dtype=mask.dtype)], dim=1)
        step_pos = pos[rows, -1:] + 1 + torch.arange(steps, device=answers.device)
        rest = self.llm(inputs_embeds=self.embed(step_ids), attention_mask=step_mask, position_ids=step_pos,
                        use_cache=True, logits_to_keep=0, **{self.cache_kwarg: cache}).logits
        return torch.cat([first, rest], dim=1)

def _check_interaction_options(directory, saved: Optional[dict], given: Optional[dict]) -> None:
    """Refuse an interaction module set up otherwise than the one the adapter was saved with (an adapter
    written before the options were recorded has none, and is taken as written for the module's defaults)."""
    if saved is not None and saved != given:
        raise ValueError(f"interaction: the adapter in {directory} was saved with an interaction set to {saved}, "
                         f"the one passed is set to {given}")


def _adapter_shapes(config: LMEyeConfig, llm_dim: int, interaction: Optional[nn.Module]) -> Dict[str, Tuple[int, ...]]:
    """The name and shape of every tensor of the adapter file ``config`` describes, around an LLM ``llm_dim`` wide."""
    static, ipn = _adapter_modules(config, llm_dim, interaction, device="meta")
    expected = {f"static.{k}": tuple(v.shape) for k, v in static.state_dict().items()}
    expected.update({f"ipn.{k}": tuple(v.shape) for k, v in _ipn_state(ipn).items()})
    expected["special_embed"] = (3, llm_dim)
    return expected


@dataclass
class AdapterModules:
    """A saved adapter without its LLM: what an engine that runs the LLM itself (vLLM) adds to it."""

    config: LMEyeConfig
    static: StaticVisualMapping
    ipn: InteractiveLayer
    special_embed: torch.Tensor  # (3, D): the <img>, <img-q> and <img-d> embeddings, in config.token_ids() order


def load_adapter_modules(directory, llm_dim: int, device=None, dtype=None,
                         interaction: Optional[nn.Module] = None) -> AdapterModules:
    """The static mapping, IPN and special-token embeddings saved in ``directory`` by ``save_pretrained``,
    for an LLM ``llm_dim`` wide, checked as ``LMEyeModel.from_pretrained`` checks them. ``interaction``: the
    IPN's interaction module, for an adapter saved with one (``sources.load_vision_modules`` rebuilds it)."""
    config = LMEyeConfig.load(directory)
    if (config.interaction != "attention") != (interaction is not None):
        raise ValueError(f"interaction: the adapter in {directory} was saved with the interaction "
                         f"{config.interaction!r}, got {'none' if interaction is None else type(interaction).__name__}")
    _check_interaction_options(directory, config.interaction_options, getattr(interaction, "options", None))
    if config.encoder_decoder:
        raise ValueError(f"directory: the adapter in {directory} is for an encoder-decoder LLM; "
                         "load_adapter_modules serves decoder-only ones")
    if config.llm_dim is not None and config.llm_dim != llm_dim:
        raise ValueError(f"llm_dim: the adapter in {directory} was saved for an LLM {config.llm_dim} wide, "
                         f"this one is {llm_dim} wide")
    if None in (config.vision_dim, config.static_vision_dim):
        raise ValueError(f"directory: the config in {directory} does not record the vision widths "
                         "(vision_dim, static_vision_dim); save it from an LMEyeModel")
    tensors = _read_adapter(directory, _adapter_shapes(config, llm_dim, interaction))
    static, ipn = _adapter_modules(config, llm_dim, interaction, device=device, dtype=dtype)
    static.load_state_dict({k[len("static."):]: v for k, v in tensors.items() if k.startswith("static.")})
    # A frozen interaction module's weights are its own checkpoint's, not the adapter's (_ipn_state).
    ipn.load_state_dict({k[len("ipn."):]: v for k, v in tensors.items() if k.startswith("ipn.")},
                        strict=interaction is None)
    special = tensors["special_embed"].to(device=device, dtype=dtype)
    return AdapterModules(config, static.requires_grad_(False), ipn.requires_grad_(False), special)


def _max_positions(llm: nn.Module) -> Optional[int]:
    """How many positions the LLM's config says it has (GPT-2 names it n_positions), or None."""
    config = getattr(llm, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _read_adapter(directory, expected: Dict[str, Tuple[int, ...]]) -> Dict[str, torch.Tensor]:
    """The saved adapter tensors, after checking their names and shapes against ``expected``."""
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"directory: no {ADAPTER_FILE} in {directory} (not written by save_pretrained?)")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    with handle as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        problems = [f"missing {k}" for k in sorted(set(expected) - set(shapes))]
        problems += [f"unexpected {k}" for k in sorted(set(shapes) - set(expected))]
        problems += [f"{k}: saved shape {shapes[k]}, expected {expected[k]}"
                     for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]]
        # Floating tensors load into parameters of any floating dtype (cast as copy_ casts);
        # integers or booleans where a parameter belongs mean the file is not an adapter.
        dtypes = {k: f.get_slice(k).get_dtype() for k in set(shapes) & set(expected)}
        problems += [f"{k}: saved as {dtypes[k]}, expected a floating dtype" for k in sorted(dtypes)
                     if dtypes[k] not in ("F16", "BF16", "F32", "F64")]
        if problems:
            raise ValueError(f"{path}: does not match this model's adapter (" + "; ".join(problems) + ")")
        try:
            return {k: f.get_tensor(k) for k in expected}
        except Exception as exc:  # a file cut short passes the header checks and fails here
            raise ValueError(f"{path}: its tensors cannot be read, the file is damaged or truncated ({exc})") from None
