"""The user-facing modules: thin ``nn.Module``s over the dispatched ops.

Parameters are plain ``nn.Linear`` / ``nn.Parameter`` so that PEFT/LoRA and
optimizers see ordinary modules; all arithmetic goes through ``lmeye_fast.ops``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from . import backends, ops, reference
from .checks import (INDEX_DTYPES, AttentionSchedule, check_positions, check_schedule, check_tensor, check_writable,
                     metadata_key, validating)


class _Ops(NamedTuple):
    """The dispatched functions of the IPN's steps (see ``lmeye_fast.ops``)."""

    request: Callable
    attend_decomposed: Callable
    transmit: Callable
    transmit_interleave: Callable

    @staticmethod
    def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> "_Ops":
        return _Ops(*(ops.get(name, backend, device, dtype) for name in _Ops._fields))


class _Params(NamedTuple):
    """The IPN's parameters in the compute dtype."""

    w_q: torch.Tensor
    b_q: Optional[torch.Tensor]
    w_f: torch.Tensor
    b_f: Optional[torch.Tensor]
    w_o: torch.Tensor
    b_o: Optional[torch.Tensor]
    slot_embed: torch.Tensor


def _check_slots(embeds, slot_pos, device, validate, batch, width, dims="(B, R)"):
    """``embeds`` (B, T', D) with the image's batch B and the LLM's width D, ``slot_pos`` (B, ?)."""
    check_tensor("embeds", embeds, (None, None, None), device=device, dims="(B, T', D)")
    if embeds.shape[0] != batch:
        raise ValueError(f"embeds: expected shape (B, T', D) with B = {batch} (the image's batch), "
                         f"got {tuple(embeds.shape)}")
    if embeds.shape[2] != width:
        raise ValueError(f"embeds: expected shape (B, T', D) = ({batch}, ?, {width}), got {tuple(embeds.shape)}")
    check_tensor("slot_pos", slot_pos, (batch, None), INDEX_DTYPES, device, dims=dims)
    if validating(validate):
        check_positions("slot_pos", slot_pos, embeds.shape[1], distinct=True)


def _available_backend(backend: str) -> str:
    """The backend a module asked for (``LMEYE_FAST_BACKEND`` overrides it), refused at construction when it
    is missing here, with the reason ``python -m lmeye_fast.info`` reports; its kernels are then imported,
    so that a compiled forward finds them loaded."""
    choice = backends.requested(backend)
    if choice != "auto":
        ok, reason = backends.status(choice)
        if not ok:
            raise RuntimeError(f"backend {choice!r} is not available here: {reason} "
                               "(see `python -m lmeye_fast.info`)")
    ops.preload(choice)
    return choice


# The transmissions InteractiveLayer offers (see its docstring).
TRANSMISSIONS = ("shared", "per_slot")


def _as(tensor: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


class InteractiveLayer(nn.Module):
    """LMEye's interactive perception network (IPN).

    Turns the LLM's hidden state at the request token into ``num_requests``
    requests, lets them attend over the decomposed image features, and adds the
    ``num_slots`` transmitted tokens into the slot rows of an embedding sequence
    (docs/design.md §2).

    Args:
        llm_dim: LLM width D.
        vision_dim: image-feature width Dv.
        interaction_dim: interaction width Di (divisible by ``num_heads``).
        num_requests: R, requests (the interaction's output rows).
        sub_features: S, sub-features per image token.
        num_heads: H, heads of the attention interaction.
        interaction: ``"attention"`` (fused kernels) or an ``nn.Module`` called
            as ``module(sequence, mask)`` on ``[sub-features ; requests]``
            (B, N*S + R, Di) with a (B, N*S + R) bool keep-mask (or None); it
            returns (B, N*S + R, Di) or just its last R positions (or an object
            with ``last_hidden_state``), read at the last R positions, as the
            original work did with a frozen text encoder
            (``lmeye_fast.models.CLIPTextInteraction``).
        backend: ``"auto" | "reference" | "triton" | "cuda"``; the environment
            variable ``LMEYE_FAST_BACKEND`` overrides it.
        attention: the Triton backend's attention schedule (docs/design.md §5), a name or an
            ``AttentionSchedule`` with the split schedule's tile options for this layer:
            ``"split"`` attends over F tile by tile, ``"folded"`` never forms F,
            ``"auto"`` is split except for heads wider than 64, which fold
            (split stays the default until both are measured on a GPU).
        num_slots: K, transmitted tokens (``<img-d>`` slots); R when not given.
        transmission: ``"shared"``, one (D, Di) linear map for every request
            (K = R, slot j reads request j), or ``"per_slot"``, a map of its own
            for every slot (stored as one ``nn.Linear(Di, K*D)``, row ``j*D + d``
            for column d of slot j), slot j reading request ``j // (K / R)``
            (K a multiple of R).
    """

    # Metadata keys whose argument checks passed, kept per layer; emptied when full, so a
    # sequence length that changes on every call cannot grow it without bound.
    CHECKED_LIMIT = 256

    def __init__(
        self,
        llm_dim: int,
        vision_dim: int,
        interaction_dim: int = 768,
        num_requests: int = 5,
        sub_features: int = 1,
        num_heads: int = 12,
        interaction: Union[str, nn.Module] = "attention",
        *,
        num_slots: Optional[int] = None,
        transmission: str = "shared",
        backend: str = "auto",
        attention: Union[str, AttentionSchedule] = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_slots = num_requests if num_slots is None else num_slots
        for name, value in (("llm_dim", llm_dim), ("vision_dim", vision_dim), ("interaction_dim", interaction_dim),
                            ("num_requests", num_requests), ("sub_features", sub_features), ("num_heads", num_heads),
                            ("num_slots", num_slots)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if transmission not in TRANSMISSIONS:
            raise ValueError(f"transmission: expected one of {TRANSMISSIONS}, got {transmission!r}")
        if transmission == "shared" and num_slots != num_requests:
            raise ValueError(f"num_slots: the shared transmission writes one slot per request, so num_slots must "
                             f"equal num_requests={num_requests}, got {num_slots} (use transmission='per_slot')")
        if num_slots % num_requests:
            raise ValueError(f"num_slots: must be a multiple of num_requests={num_requests} (slot j reads request "
                             f"j // (num_slots / num_requests)), got {num_slots}")
        if interaction_dim % num_heads:
            raise ValueError(f"num_heads: must divide interaction_dim={interaction_dim}, got {num_heads}")
        if not (interaction == "attention" or isinstance(interaction, nn.Module)):
            raise ValueError(f"interaction: expected 'attention' or an nn.Module, got {interaction!r}")
        self.llm_dim, self.vision_dim, self.interaction_dim = llm_dim, vision_dim, interaction_dim
        self.num_requests, self.sub_features, self.num_heads = num_requests, sub_features, num_heads
        self.num_slots, self.transmission = num_slots, transmission
        self.backend = _available_backend(backend)
        check_schedule(attention)
        self.attention = attention
        factory = {"device": device, "dtype": dtype}
        self.request_proj = nn.Linear(llm_dim, num_requests * interaction_dim, **factory)
        self.decompose_proj = nn.Linear(vision_dim, sub_features * interaction_dim, **factory)
        per_slot = num_slots if transmission == "per_slot" else 1
        self.transmit_proj = nn.Linear(interaction_dim, per_slot * llm_dim, **factory)
        self.slot_embed = nn.Parameter(torch.zeros(num_slots, llm_dim, **factory))
        self.interaction = interaction if isinstance(interaction, nn.Module) else None
        # Per-instance caches of the eager hot path (see ``_ops`` and ``_check``).
        self._resolved = {}
        self._checked = set()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # An untrained layer should barely perturb the frozen LLM: a tiny
        # transmission and a zero slot embedding leave the slot rows almost as
        # they were, while keeping every gradient path non-zero.
        nn.init.normal_(self.transmit_proj.weight, std=1e-3 / math.sqrt(self.interaction_dim))
        nn.init.zeros_(self.transmit_proj.bias)
        nn.init.zeros_(self.slot_embed)

    def extra_repr(self) -> str:
        kind = "attention" if self.interaction is None else type(self.interaction).__name__
        return (f"requests={self.num_requests}, slots={self.num_slots}, transmission={self.transmission}, "
                f"sub_features={self.sub_features}, heads={self.num_heads}, interaction={kind}, "
                f"backend={self.backend}, attention={self.attention}")

    def _ops(self, device: torch.device, dtype: torch.dtype, traced: bool) -> _Ops:
        """The step functions for ``device`` and ``dtype``, resolved once per device type and dtype. A
        compiled forward asks ``ops.get`` (resolved at construction by ``ops.preload``)."""
        if traced:
            return _Ops.resolve(self.backend, device, dtype)
        fns = self._resolved.get((device.type, dtype))
        if fns is None:
            fns = self._resolved[(device.type, dtype)] = _Ops.resolve(self.backend, device, dtype)
        return fns

    def _check(self, hidden, request_pos, image, image_mask, embeds, slot_pos, validate, traced):
        """The argument checks, run once per inputs' metadata in eager mode (the
        ops check the parameters against them on every call); the value checks
        of ``validate`` run every time."""
        key = None if traced else metadata_key(hidden, request_pos, image, image_mask, embeds, slot_pos)
        try:
            known = key is not None and key in self._checked
        except TypeError:  # an unhashable argument, not a tensor: the checks below name it
            key, known = None, False
        if not known:
            self._check_metadata(hidden, request_pos, image, image_mask, embeds, slot_pos)
            if key is not None:
                if len(self._checked) >= self.CHECKED_LIMIT:
                    self._checked.clear()
                self._checked.add(key)
        if validating(validate):
            if embeds is not None:
                check_positions("slot_pos", slot_pos, embeds.shape[1], distinct=True)
            if request_pos is not None:
                check_positions("request_pos", request_pos, hidden.shape[1])
        return image.device

    def _check_metadata(self, hidden, request_pos, image, image_mask, embeds, slot_pos):
        device = image.device if isinstance(image, torch.Tensor) else None
        check_tensor("image", image, (None, None, self.vision_dim), device=device, dims="(B, N, Dv)")
        batch = image.shape[0]
        if embeds is not None:
            _check_slots(embeds, slot_pos, device, False, batch, self.llm_dim, dims="(B, K)")
            if slot_pos.shape[1] != self.num_slots:
                raise ValueError(f"slot_pos: expected shape (B, K) with K = num_slots = {self.num_slots}, "
                                 f"got {tuple(slot_pos.shape)}")
        if request_pos is None:
            check_tensor("hidden", hidden, (batch, self.llm_dim), device=device, dims="(B, D) request vectors")
        else:
            check_tensor("hidden", hidden, (batch, None, self.llm_dim), device=device, dims="(B, T, D)")
            check_tensor("request_pos", request_pos, (batch,), INDEX_DTYPES, device, dims="(B,)")
            if hidden.shape[1] == 0 and batch:
                raise ValueError("hidden (B, T, D): has no positions (T = 0) to read the request from")
        if image_mask is not None:
            check_tensor("image_mask", image_mask, (batch, image.shape[1]), (torch.bool,), device, dims="(B, N)")

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the IPN runs in: autocast's where it is on, else the parameters' (float32 accumulation
        either way). Activations of another dtype (a bf16 LLM beside float32 adapter weights) are cast
        to it, as an autocast linear layer would cast them."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.request_proj.weight.dtype

    def _params(self, dtype: torch.dtype) -> _Params:
        """The parameters in ``dtype``; the casts are autograd ops, so gradients reach the parameters in
        their own dtype."""
        w_o, b_o = self.transmit_proj.weight, self.transmit_proj.bias
        if self.transmission == "per_slot":
            # The (K·D, Di) linear weight as the per-slot transmission's (K, D, Di) (a view, no copy).
            w_o = w_o.view(self.num_slots, self.llm_dim, self.interaction_dim)
            b_o = None if b_o is None else b_o.view(self.num_slots, self.llm_dim)
        tensors = (self.request_proj.weight, self.request_proj.bias, self.decompose_proj.weight,
                   self.decompose_proj.bias, w_o, b_o, self.slot_embed)
        return _Params(*(_as(t, dtype) for t in tensors))

    def _interaction_output(self, hidden, request_pos, image, image_mask, embeds, slot_pos, validate):
        """Steps 1-3, shared by ``forward`` and ``transmitted``: (step functions, parameters in the
        compute dtype, z (B, R, Di))."""
        traced = torch.compiler.is_compiling()
        device = self._check(hidden, request_pos, image, image_mask, embeds, slot_pos, validate, traced)
        dtype = self._compute_dtype(device)
        p = self._params(dtype)
        fns = self._ops(device, dtype, traced)
        r = fns.request(_as(hidden, dtype), request_pos, p.w_q, p.b_q, self.num_requests)
        image = _as(image, dtype)
        if self.interaction is None:
            z = fns.attend_decomposed(r, image, image_mask, p.w_f, p.b_f, self.num_heads, self.sub_features,
                                      self.attention)
        else:
            z = self._interact(r, image, image_mask, p.w_f, p.b_f, device)
        return fns, p, z

    def _interact(self, r, image, image_mask, w_f, b_f, device):
        feats = reference.decompose(image, w_f, b_f, self.sub_features)
        sequence = torch.cat([feats, r.to(feats.dtype)], dim=1)
        mask = None
        if image_mask is not None:
            keep_req = torch.ones(r.shape[:2], dtype=torch.bool, device=device)
            mask = torch.cat([image_mask.repeat_interleave(self.sub_features, dim=1), keep_req], dim=1)
        out = self.interaction(sequence, mask)
        out = getattr(out, "last_hidden_state", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[:, -self.num_requests:]

    def attention_weights(self, hidden, image, request_pos=None, image_mask=None) -> torch.Tensor:
        """What each request attended to: the attention interaction's weights (B, H, R, N*S) in float32
        (float64 for float64 inputs), per head and request its softmax over the decomposed image
        features, column ``n*S + k`` being sub-feature k of image token n (``reference.attention_weights``).
        The inputs are those of ``transmitted``. A layer with a user interaction module has no such
        weights and raises ``ValueError``."""
        if self.interaction is not None:
            raise ValueError(f"attention_weights: this layer's interaction is {type(self.interaction).__name__}, "
                             "a user module; only the built-in attention interaction has attention weights")
        self._check(hidden, request_pos, image, image_mask, None, None, False, torch.compiler.is_compiling())
        p = self._params(self._compute_dtype(image.device))
        r = reference.request(_as(hidden, p.w_q.dtype), request_pos, p.w_q, p.b_q, self.num_requests)
        feats = reference.decompose(_as(image, p.w_f.dtype), p.w_f, p.b_f, self.sub_features)
        return reference.attention_weights(r, feats, image_mask, self.num_heads, self.sub_features)

    def transmitted(self, hidden, image, request_pos=None, image_mask=None, validate: bool = False):
        """The K transmitted tokens (B, K, D), without writing them anywhere."""
        fns, p, z = self._interaction_output(hidden, request_pos, image, image_mask, None, None, validate)
        return fns.transmit(z, p.w_o, p.b_o, p.slot_embed)

    def forward(
        self,
        hidden: torch.Tensor,
        image: torch.Tensor,
        embeds: torch.Tensor,
        slot_pos: torch.Tensor,
        request_pos: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        inplace: bool = False,
        validate: bool = False,
    ) -> torch.Tensor:
        """Add the transmitted tokens into ``embeds`` at ``slot_pos``.

        Args:
            hidden: LLM hidden states (B, T, D) with ``request_pos`` (B,), or
                the request hidden vectors (B, D) with ``request_pos=None``.
            image: image features (B, N, Dv); ``image_mask`` (B, N) bool, True = keep.
            embeds: the embedding sequence (B, T', D) to write into.
            slot_pos: (B, K) slot positions, distinct per row, in ``[0, T')``.
            inplace: write into ``embeds`` itself (no copy of the sequence).
            validate: also check position values (a host sync; positions built
                by ``lmeye_fast.models`` are checked where they are built).
        Returns:
            ``embeds`` with the slot rows updated (the same tensor when ``inplace``).
        """
        if inplace:
            # Written in place, embeds must not be expanded nor share memory with what the IPN reads.
            check_writable(embeds, "interleave", hidden=hidden, image=image)
        fns, p, z = self._interaction_output(hidden, request_pos, image, image_mask, embeds, slot_pos, validate)
        return fns.transmit_interleave(z, p.w_o, p.b_o, p.slot_embed, embeds, slot_pos, inplace)


class StaticVisualMapping(nn.Module):
    """LMEye's stage-1 mapping: image features -> LLM width, written into ``<img>`` slots.

    A linear layer, or a two-layer GELU MLP when ``hidden_dim`` is given.
    """

    def __init__(self, vision_dim: int, llm_dim: int, hidden_dim: Optional[int] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.vision_dim, self.llm_dim = vision_dim, llm_dim
        self.backend = _available_backend(backend)
        if hidden_dim is None:
            self.proj = nn.Linear(vision_dim, llm_dim, **factory)
            self.out_proj = None
        else:
            self.proj = nn.Linear(vision_dim, hidden_dim, **factory)
            self.out_proj = nn.Linear(hidden_dim, llm_dim, **factory)

    def mapped(self, image: torch.Tensor) -> torch.Tensor:
        """The mapped image tokens (B, N, D)."""
        check_tensor("image", image, (None, None, self.vision_dim), dims="(B, N, Dv)")
        out = self.out_proj
        return reference.static_map(image, self.proj.weight, self.proj.bias,
                                    None if out is None else out.weight, None if out is None else out.bias)

    def forward(self, image: torch.Tensor, embeds: Optional[torch.Tensor] = None,
                slot_pos: Optional[torch.Tensor] = None, inplace: bool = False, validate: bool = False):
        """The mapped tokens (B, N, D), or ``embeds`` with them added at ``slot_pos`` (B, N)."""
        tokens = self.mapped(image)
        if embeds is None:
            return tokens
        if slot_pos is None:
            raise ValueError("slot_pos: required (shape (B, N)) when embeds is given")
        _check_slots(embeds, slot_pos, image.device, validate, image.shape[0], self.llm_dim)
        if slot_pos.shape[1] != image.shape[1]:
            raise ValueError(f"slot_pos: expected shape (B, N) = ({image.shape[0]}, {image.shape[1]}), "
                             f"got {tuple(slot_pos.shape)}")
        if inplace:
            check_writable(embeds, "interleave", image=image)
        interleave = ops.get("interleave", self.backend, embeds.device, embeds.dtype)
        return interleave(embeds, tokens.to(embeds.dtype), slot_pos, inplace)
