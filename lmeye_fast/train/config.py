"""The training CLI's configuration: every key, its type and range, checked before any model loads."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..data import BAD_IMAGE_POLICIES
from ..models.config import SCHEDULES, VISION_FEATURES
from ..models.presets import PRESETS, PUBLISHED_REQUESTS
from ..models.prompts import PROMPT_TEMPLATES, PromptTemplate, prompt_template

__all__ = ["TrainConfig", "load_config", "LLM_DTYPES"]

LLM_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """What ``python -m lmeye_fast.train`` runs; each field is a YAML/JSON key and a ``--flag``.

    Models: ``llm`` and ``vision`` are Hugging Face names or directories (the
    tokenizer is the LLM's, the image processor the vision tower's), at
    ``llm_revision`` / ``vision_revision`` of a hub repository; ``preset``
    (``published``, ``global_token``, ``patch_tokens``: ``lmeye_fast.models.presets``)
    builds the model as that preset does, loading ``vision`` as it needs it (a
    ``CLIPModel`` for ``published``, whose text tower is the interaction),
    else ``vision_feature`` (``tokens`` by default, ``pooled`` or ``projected``)
    feeds both the static mapping and the IPN; an
    encoder-decoder ``llm`` (T5 / FlanT5, BART: its config's
    ``is_encoder_decoder``) trains as an ``LMEyeSeq2SeqModel``, by default on
    two encoder passes in stage 2, and ``max_length`` then bounds its decoder's
    sequence; ``adapter`` starts from a saved adapter (stage 2 from stage 1's).
    Prompts: ``prompt_template`` is a template's name (``PROMPT_TEMPLATES``:
    ``vicuna``, ``plain``, ...) or a JSON file of ``PromptTemplate`` fields,
    ``response_prefix`` replaces its response prefix; the adapter saves it.
    Data: ``data`` is a LLaVA JSON, a JSONL or a CSV file of records
    (``lmeye_fast.data``), images relative to ``image_folder``; ``streaming``
    reads it as it goes (``datasets``' streaming, for files larger than
    memory), which needs ``max_steps``, as a stream has no length.
    Optimisation: the ``transformers.TrainingArguments`` of the same meaning;
    ``deepspeed`` is a DeepSpeed JSON config (ZeRO-3 loads the LLM partitioned);
    ``fsdp`` shards the frozen LLM and vision tower across the ``torchrun``
    processes with FSDP2 instead (``lmeye_fast.train.shard_frozen_llm``), the
    adapter trained data-parallel around them.
    ``resume``: a checkpoint directory, or true for the newest one in
    ``output_dir``.
    """

    llm: str
    vision: str
    data: str
    output_dir: str
    stage: int = 2
    image_folder: Optional[str] = None
    adapter: Optional[str] = None
    preset: Optional[str] = None
    llm_revision: Optional[str] = None
    vision_revision: Optional[str] = None
    schedule: Optional[str] = None
    llm_dtype: str = "float32"
    num_requests: int = 5
    interaction_dim: int = 768
    num_heads: int = 12
    static_hidden_dim: Optional[int] = None
    vision_feature: Optional[str] = None
    train_special_tokens: bool = True
    prompt_template: str = "vicuna"
    response_prefix: Optional[str] = None
    caption_prompt: str = ""
    max_length: Optional[int] = None
    on_bad_image: str = "skip"
    streaming: bool = False
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    bf16: bool = False
    seed: int = 42
    num_workers: int = 2
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    resume: Union[bool, str, None] = None
    deepspeed: Optional[str] = None
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self):
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name, field in fields.items():
            _check_type(name, getattr(self, name), field.type)
            if isinstance(getattr(self, name), float) and not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number, got {getattr(self, name)!r}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage: expected 1 or 2, got {self.stage!r}")
        positive = ("num_requests", "interaction_dim", "num_heads", "batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps")
        for name in positive + ("static_hidden_dim", "max_length", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        for name in ("learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps: expected a positive int, or -1 to train for `epochs`, got {self.max_steps}")
        if self.streaming and self.max_steps == -1:
            raise ValueError("max_steps: a streamed data set has no length, so training needs max_steps (> 0)")
        if self.interaction_dim % self.num_heads:
            raise ValueError(f"interaction_dim: {self.interaction_dim} is not divisible by num_heads={self.num_heads}")
        choices = {"schedule": SCHEDULES + (None,), "llm_dtype": LLM_DTYPES, "on_bad_image": BAD_IMAGE_POLICIES,
                   "vision_feature": VISION_FEATURES + (None,), "preset": tuple(PRESETS) + (None,)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.stage == 2 and self.schedule == "static":
            raise ValueError("schedule: 'static' runs no IPN, so stage 2 (which trains the IPN) cannot use it")
        if self.fsdp and self.deepspeed is not None:
            raise ValueError(f"fsdp: shards the LLM itself, so it cannot run under deepspeed={self.deepspeed!r}; "
                             "pass one of the two")
        for name in ("data", "deepspeed"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_file():
                raise ValueError(f"{name}: no file {getattr(self, name)}")
        for name in ("image_folder", "adapter"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_dir():
                raise ValueError(f"{name}: no directory {getattr(self, name)}")
        if isinstance(self.resume, str) and not Path(self.resume).is_dir():
            raise ValueError(f"resume: no checkpoint directory {self.resume}")
        output = Path(self.output_dir)
        if output.exists() and not output.is_dir():
            raise ValueError(f"output_dir: {output} is a file, expected a folder")
        existing = next(folder for folder in (output, *output.parents) if folder.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ValueError(f"output_dir: cannot write in {existing} (to create {output})")
        if Path(self.data).suffix.lower() not in (".json", ".jsonl", ".csv"):
            raise ValueError(f"data: expected a .json, .jsonl or .csv file, got {self.data}")
        if self.preset is not None and self.vision_feature is not None:
            raise ValueError(f"vision_feature: the preset {self.preset!r} decides which vision outputs feed what; "
                             "leave vision_feature out")
        if self.preset == "published" and self.num_requests != PUBLISHED_REQUESTS:
            raise ValueError(f"num_requests: the published preset has {PUBLISHED_REQUESTS} requests, got "
                             f"{self.num_requests}")
        self.template()  # a bad template is refused now, before any model loads

    def template(self) -> PromptTemplate:
        """The prompt template: ``prompt_template`` by name or from its JSON file, with ``response_prefix``."""
        if self.prompt_template in PROMPT_TEMPLATES:
            template = PROMPT_TEMPLATES[self.prompt_template]
        elif Path(self.prompt_template).is_file():
            try:
                template = prompt_template(json.loads(Path(self.prompt_template).read_text()))
            except ValueError as error:
                raise ValueError(f"prompt_template: {self.prompt_template}: {error}") from None
        else:
            raise ValueError(f"prompt_template: expected one of {sorted(PROMPT_TEMPLATES)} or a JSON file of "
                             f"PromptTemplate fields, got {self.prompt_template!r}")
        if self.response_prefix is not None:
            template = dataclasses.replace(template, response_prefix=self.response_prefix)
        return template

    def preset_settings(self) -> Dict[str, Any]:
        """The config's sizes as ``preset``'s arguments (the published preset fixes its own)."""
        if self.preset == "published":
            return {"static_hidden_dim": self.static_hidden_dim}
        return {"num_requests": self.num_requests, "interaction_dim": self.interaction_dim,
                "num_heads": self.num_heads, "static_hidden_dim": self.static_hidden_dim}

    def model_schedule(self, encoder_decoder: bool) -> str:
        """``schedule``, else the stage's default: stage 1 trains the static mapping alone (no IPN pass),
        stage 2 the single pass, or two passes for an encoder-decoder LLM, whose encoder has no single pass."""
        return self.schedule or ("static" if self.stage == 1 else "two_pass" if encoder_decoder else "single_pass")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Check ``value`` against a field's annotation (a string under ``from __future__ import annotations``)."""
    optional = annotation.startswith("Optional[") or "None" in annotation
    if value is None:
        if not optional:
            raise ValueError(f"{name}: required")
        return
    kinds = [kind for word, kinds_ in _TYPES.items() if word in annotation for kind in kinds_]
    if isinstance(value, bool) and bool not in kinds:
        raise ValueError(f"{name}: expected {annotation}, got {value!r}")
    if not isinstance(value, tuple(kinds)):
        raise ValueError(f"{name}: expected {annotation}, got {value!r} ({type(value).__name__})")


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """A ``TrainConfig`` from a YAML or JSON file and/or ``overrides`` (the flags, which win)."""
    values: Dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"config: no file {path}")
        text = file.read_text()
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"config: {path} must hold a mapping of keys to values")
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a configuration key (known: {', '.join(sorted(known))})")
    missing = [f.name for f in dataclasses.fields(TrainConfig)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ValueError(f"{missing[0]}: required")
    return TrainConfig(**values)
