"""vLLM's scheduler with LMEye's single-pass prefill: a prompt's chunk ends at its ``<img-q>``.

``LMEyeForCausalLM`` (``vllm_model.py``) computes the IPN from the LLM's hidden state at ``<img-q>``
in the step that computes ``<img-q>``, and stores the transmitted tokens with the image's encoder
output, where a later step reads them into the ``<img-d>`` slots. So that every token of a prompt
runs through the LLM once, this scheduler ends the step that reaches ``<img-q>`` there: the prefix
up to ``<img-q>`` in one step (or in several, as the token budget cuts it), the slots and the rest
of the prompt in the next ones. It is vLLM's own scheduler in everything else; engines of other
models never use it (``ENGINE_ARGS`` names it for LMEye's).
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from .vllm_model import ServingSettings, serving_layout

__all__ = ["LMEyeScheduler", "LMEyeAsyncScheduler"]


class LMEyeScheduler(Scheduler):
    """``Scheduler`` whose chunks of an LMEye prompt end at its ``<img-q>`` (module docstring). Where the
    engine schedules asynchronously (``async_scheduling``), it is built as ``LMEyeAsyncScheduler``,
    the same on vLLM's ``AsyncScheduler``: vLLM takes one scheduler class, and the engine's setting
    says which of its two it needs."""

    def __new__(cls, vllm_config, *args, **kwargs):
        if cls is LMEyeScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = LMEyeAsyncScheduler
        return super().__new__(cls)

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        layout = serving_layout(ServingSettings.from_hf_config(vllm_config.model_config.hf_config))
        # Tokens from <img-q> to the end of its image block (the block ends at its last <img-d>), where
        # the single pass applies; None where it does not (the two passes, the static-only model).
        self._request_from_block_end = layout.slots + 1 if layout.schedule == "single_pass" else None

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        scheduled = super()._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens, *args,
                                                         **kwargs)
        if self._request_from_block_end is None or not request.mm_features:
            return scheduled
        inputs, num_new_tokens, *rest = scheduled
        block = request.mm_features[0].mm_position
        request_at = block.offset + block.length - self._request_from_block_end
        if num_computed_tokens <= request_at < num_computed_tokens + num_new_tokens - 1:
            num_new_tokens = request_at + 1 - num_computed_tokens
        return (inputs, num_new_tokens, *rest)


class LMEyeAsyncScheduler(LMEyeScheduler, AsyncScheduler):
    """``LMEyeScheduler`` on vLLM's ``AsyncScheduler``."""
