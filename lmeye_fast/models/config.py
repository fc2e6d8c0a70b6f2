"""The adapter's configuration: what it takes to rebuild the LMEye modules around an LLM."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import List, Optional, Union

from .adapter_files import CONFIG_FILE, check_save_id, config_file

__all__ = ["LMEyeConfig", "SCHEDULES", "SEQ2SEQ_SCHEDULES", "VISION_FEATURES", "CONFIG_FILE", "TRANSMISSIONS",
           "REQUEST_POSITIONS", "SPECIAL_ROWS"]

SCHEDULES = ("single_pass", "two_pass", "static")
# An encoder reads the whole sequence both ways: no prefix is the same in both passes (docs/encoder_decoder.md).
SEQ2SEQ_SCHEDULES = ("two_pass", "static")
VISION_FEATURES = ("tokens", "pooled", "projected")
TRANSMISSIONS = ("shared", "per_slot")
REQUEST_POSITIONS = ("request_token", "first_slot")
# How each special token's input row is built, in the order of ``LMEyeConfig.token_ids``.
SPECIAL_ROWS = ("replace", "add")
FORMAT_VERSION = 1


@dataclass
class LMEyeConfig:
    """Sizes of the LMEye adapter and the token ids it is bound to.

    Build it with ``LMEyeProcessor.make_config(...)``, which fills in the
    special-token ids and the vocabulary size of the tokenizer.

    Attributes:
        num_image_tokens: static image tokens (``<img>`` slots) per image, equal
            to the number of features N of ``static_feature`` (1 for the pooled or
            projected embedding, every patch token plus the class token for ``"tokens"``).
        num_requests: R, the requests the IPN reads from the one request hidden state.
        num_slots: K, the ``<img-d>`` slots the transmission fills (a multiple of R: slot j
            carries request ``j // (K // R)``); None for K = R.
        transmission: ``"shared"`` (one (D, Di) map for every slot) or ``"per_slot"`` (slot j has
            its own map, a (K*D, Di) linear layer: v1 LMEye's ``imgdLinear``).
        interaction_dim, sub_features, num_heads: the IPN's Di, S and H.
        static_hidden_dim: hidden width of a two-layer static mapping, or None
            for the linear mapping.
        vision_dim: Dv, the width of the IPN's image features; read off the
            vision module when None.
        static_vision_dim: the width of the static mapping's image features;
            read off the vision module when None, else equal to ``vision_dim``.
        static_feature, ipn_feature: which output of the vision module the
            static mapping and the IPN read: ``"tokens"`` (``last_hidden_state``,
            all tokens), ``"pooled"`` (``pooler_output``, one token) or
            ``"projected"`` (CLIP's projected image embedding, one token, as
            ``CLIPModel.get_image_features`` or ``CLIPVisionModelWithProjection``
            give it). One vision pass serves both; a module returning a tensor
            is used as it is by both.
        schedule: default schedule, ``"single_pass"``, ``"two_pass"`` or
            ``"static"`` (no IPN: the static-only model).
        interaction: ``"attention"``, or the class name of a user interaction
            module (which must then be passed again when loading).
        interaction_options: what that module's ``options`` say (``CLIPTextInteraction``'s
            passes and positions), checked against the module passed when loading.
        request_position: ``"request_token"`` (the request is the hidden state at ``<img-q>``, the
            last prefix column) or ``"first_slot"`` (no ``<img-q>``: the hidden state at the first
            ``<img-d>`` slot, computed from its row before the IPN fills it, as v1 LMEye reads it).
        special_rows: how the input rows of ``<img>``, ``<img-q>``, ``<img-d>`` are built, one of
            ``"replace"`` (the learned vector is the row) or ``"add"`` (the LLM's word row of the
            token plus the learned vector, as LMEye's releases build them) for each, or one string
            for all three. With ``"add"``, rows the model appends to the LLM's vocabulary for the
            tokens start at zero, so the learned vector alone makes them.
        encoder_decoder: the LLM is an encoder-decoder (``LMEyeSeq2SeqModel``,
            the processor's encoder-decoder layout); its schedules are
            ``"two_pass"`` and ``"static"``.
    """

    num_image_tokens: int
    num_requests: int = 5
    num_slots: Optional[int] = None
    transmission: str = "shared"
    interaction_dim: int = 768
    sub_features: int = 1
    num_heads: int = 12
    static_hidden_dim: Optional[int] = None
    vision_dim: Optional[int] = None
    llm_dim: Optional[int] = None
    static_vision_dim: Optional[int] = None
    static_feature: str = "tokens"
    ipn_feature: str = "tokens"
    image_token_id: Optional[int] = None
    request_token_id: Optional[int] = None
    slot_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    vocab_size: Optional[int] = None
    schedule: str = "single_pass"
    interaction: str = "attention"
    backend: str = "auto"
    encoder_decoder: bool = False
    request_position: str = "request_token"
    special_rows: Union[str, List[str]] = "replace"
    interaction_options: Optional[dict] = None

    def __post_init__(self):
        for name in ("num_image_tokens", "num_requests", "interaction_dim", "sub_features", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        schedules = SEQ2SEQ_SCHEDULES if self.encoder_decoder else SCHEDULES
        if self.schedule not in schedules:
            raise ValueError(f"schedule: expected one of {schedules}"
                             + (" for an encoder-decoder LLM" if self.encoder_decoder else "")
                             + f", got {self.schedule!r}")
        for name in ("static_feature", "ipn_feature"):
            if getattr(self, name) not in VISION_FEATURES:
                raise ValueError(f"{name}: expected one of {VISION_FEATURES}, got {getattr(self, name)!r}")
        if self.num_slots is not None:
            if not isinstance(self.num_slots, int) or self.num_slots < 1 or self.num_slots % self.num_requests:
                raise ValueError(f"num_slots: expected a positive multiple of num_requests={self.num_requests} "
                                 f"(or None for as many slots as requests), got {self.num_slots!r}")
        for name, allowed in (("transmission", TRANSMISSIONS), ("request_position", REQUEST_POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.transmission == "shared" and self.slots != self.num_requests:
            raise ValueError(f"num_slots: the shared transmission fills one slot per request, so {self.slots} slots "
                             f"need num_requests={self.slots} or transmission='per_slot', got "
                             f"num_requests={self.num_requests}")
        rows = [self.special_rows] * 3 if isinstance(self.special_rows, str) else self.special_rows
        if not isinstance(rows, (list, tuple)) or len(rows) != 3 or any(r not in SPECIAL_ROWS for r in rows):
            raise ValueError(f"special_rows: expected one of {SPECIAL_ROWS}, or a list of three of them (for <img>, "
                             f"<img-q>, <img-d>), got {self.special_rows!r}")
        self.special_rows = rows[0] if len(set(rows)) == 1 else list(rows)

    @property
    def hidden_size(self) -> Optional[int]:
        """The LLM's width, by the name Hugging Face's integrations read off ``model.config``: the
        Trainer sizes DeepSpeed's ``"auto"`` ZeRO-3 buckets by it."""
        return self.llm_dim

    @property
    def slots(self) -> int:
        """K, the number of ``<img-d>`` slots."""
        return self.num_requests if self.num_slots is None else self.num_slots

    @property
    def row_modes(self) -> List[str]:
        """``special_rows`` for ``<img>``, ``<img-q>``, ``<img-d>`` in that order."""
        return [self.special_rows] * 3 if isinstance(self.special_rows, str) else list(self.special_rows)

    def token_ids(self):
        return self.image_token_id, self.request_token_id, self.slot_token_id

    def missing_token_ids(self) -> List[str]:
        """The special-token ids this layout needs that are unset (``<img-q>`` only with a request token)."""
        needed = [("image_token_id", self.image_token_id), ("slot_token_id", self.slot_token_id)]
        if self.request_position == "request_token":
            needed.append(("request_token_id", self.request_token_id))
        return [name for name, value in needed if value is None]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LMEyeConfig":
        data = dict(data)
        if "vision_feature" in data:
            # Configs written before the two consumers could read different outputs.
            feature = data.pop("vision_feature")
            data.setdefault("static_feature", feature)
            data.setdefault("ipn_feature", feature)
            data.setdefault("static_vision_dim", data.get("vision_dim"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LMEye config: unknown fields {unknown} (written by a newer lmeye_fast?)")
        return cls(**data)

    def payload(self) -> dict:
        """What ``lmeye_config.json`` holds (``save_pretrained`` adds the save id)."""
        return {"format_version": FORMAT_VERSION, "config": self.to_dict()}

    @classmethod
    def load(cls, directory) -> "LMEyeConfig":
        """The config of the adapter saved in ``directory`` (``adapter_files.config_file`` says which file)."""
        path = config_file(directory)
        if not path.is_file():
            raise FileNotFoundError(f"directory: no {CONFIG_FILE} in {directory} (not written by save_pretrained?)")
        try:
            payload = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION or "config" not in payload:
            raise ValueError(f"{path}: expected an LMEye config with format_version {FORMAT_VERSION}")
        check_save_id(path, payload)
        return cls.from_dict(payload["config"])
