"""Log-likelihood of answer texts: all the options of a question scored on one shared prefix.

The options of a multiple-choice question share the prompt, the image, the
request at ``<img-q>`` and therefore what the IPN writes into the ``<img-d>``
slots; only the answer text differs. ``score_options`` runs the prefix once
with a KV cache, runs the IPN once, runs the slots and the response prefix
(the suffix head, the same for every option) once on that cache, and then
scores the K answers as a batch of short continuations on the cache, whose
rows are repeated (not recomputed) once per option. The first answer token is
predicted by the head's last column, so options of one token each need no
further LLM call at all.

``answer_log_likelihood`` is the plain way: one full forward per (prompt,
answer) row of a training-style batch, under any schedule. It defines what
``score_options`` must equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .processor import IGNORE_INDEX

__all__ = ["OptionScores", "score_options", "answer_log_likelihood"]


@dataclass
class OptionScores:
    """Per question, one entry per option: ``summed`` log-likelihood of its answer tokens
    (float32), ``num_tokens``, the number of those tokens, and ``greedy``: whether greedy
    decoding would produce exactly those tokens."""

    summed: List[torch.Tensor]
    num_tokens: List[torch.Tensor]
    greedy: List[torch.Tensor]

    @property
    def normalised(self) -> List[torch.Tensor]:
        """The log-likelihood per answer token."""
        return [s / n for s, n in zip(self.summed, self.num_tokens)]


def _option_ids(processor, options: Sequence[Sequence[str]], batch: int) -> List[List[List[int]]]:
    if isinstance(options, str) or len(options) != batch:
        raise ValueError(f"options: expected {batch} lists of option texts (one list per prompt), got "
                         f"{'a string' if isinstance(options, str) else len(options)}")
    encoded = []
    for index, choices in enumerate(options):
        if isinstance(choices, str) or len(choices) == 0:
            raise ValueError(f"options[{index}]: expected a non-empty list of option texts, got {choices!r}")
        ids = [processor.encode(text) for text in choices]
        empty = [text for text, tokens in zip(choices, ids) if not tokens]
        if empty:
            raise ValueError(f"options[{index}]: {empty[0]!r} encodes to no token; there is nothing to score")
        encoded.append(ids)
    return encoded


@torch.no_grad()
def score_options(model, processor, prompts: Sequence[str], options: Sequence[Sequence[str]],
                  pixel_values: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None,
                  static_features: Optional[torch.Tensor] = None, schedule: Optional[str] = None) -> OptionScores:
    """Score every option of every prompt by the log-likelihood of its answer tokens.

    Args:
        model: an ``LMEyeModel``; processor: its ``LMEyeProcessor``.
        prompts: B prompts (as for generation, at most one ``<img>`` each).
        options: B lists of answer texts; the lists may differ in length.
        pixel_values / image_features, static_features: the B images, as for ``model.generate``.
        schedule: ``"static"`` scores without the IPN; any other value (or
            None) runs the IPN, and ``"two_pass"`` gives the same scores as
            ``"single_pass"`` (the prefix is the same in both passes).
    Returns:
        ``OptionScores``; the answer tokens are encoded exactly as the
        processor encodes training answers (EOS is not scored).
    """
    option_ids = _option_ids(processor, options, len(prompts))
    device = model.special_embed.device
    batch = processor(prompts, images=pixel_values).to(device)
    prefix_len = batch["prefix_len"]
    image_features, static_features = (None if f is None else f.to(device) for f in (image_features, static_features))
    ids = batch["input_ids"]
    schedule, mask, pos, static_image, image, request_pos, slot_pos = model._inputs(
        ids, batch["attention_mask"], batch["position_ids"], batch["image_pos"], prefix_len,
        batch.get("pixel_values"), image_features, static_features, None, batch["request_pos"], batch["slot_pos"],
        schedule or model.config.schedule, False)
    llm, cache_key = model.llm, model._cache_key

    # Prefix and IPN once per question; the head (slots + response prefix) once on the cache.
    cache, hidden, _, _ = model._prefill(ids, mask, pos, static_image, batch["image_pos"], prefix_len)
    if schedule == "static":
        head = model.embed(ids[:, prefix_len:])
    else:
        head = model._suffix_embeds(ids, hidden, image, None, request_pos, slot_pos, prefix_len)
    first_logits = llm(inputs_embeds=head, attention_mask=mask, position_ids=pos[:, prefix_len:], use_cache=True,
                       logits_to_keep=1, **{cache_key: cache}).logits[:, -1]

    # The counts are known on the host: kept there, neither the repeat (with its output size) nor the
    # final split waits on the device.
    splits = [len(choices) for choices in option_ids]
    rows = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                   torch.tensor(splits, device=device), output_size=sum(splits))
    flat = [tokens for choices in option_ids for tokens in choices]
    longest = max(len(tokens) for tokens in flat)
    answers = torch.full((len(flat), longest), processor.pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(flat):
        answers[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    answers = answers.to(device)
    lengths = torch.tensor([len(tokens) for tokens in flat], device=device)

    summed = torch.log_softmax(first_logits.float(), dim=-1)[rows, answers[:, 0]]
    greedy = first_logits.argmax(dim=-1)[rows] == answers[:, 0]
    if longest > 1:
        # Each question's cache rows, repeated once per option; answer token j+1 is read off the
        # output at answer token j, so the last answer column never needs to run. Right padding
        # sits after every real token, so causality keeps it out of the scores.
        cache.batch_select_indices(rows)
        steps = longest - 1
        inputs = answers[:, :steps]
        step_mask = torch.cat([mask[rows], torch.ones_like(inputs, dtype=mask.dtype)], dim=1)
        step_pos = pos[rows, -1:] + 1 + torch.arange(steps, device=device)
        logits = llm(inputs_embeds=model.embed(inputs), attention_mask=step_mask, position_ids=step_pos,
                     use_cache=True, logits_to_keep=0, **{cache_key: cache}).logits
        token_ll = torch.log_softmax(logits.float(), dim=-1).gather(-1, answers[:, 1:, None]).squeeze(-1)
        real = torch.arange(1, longest, device=device) < lengths[:, None]
        summed = summed + torch.where(real, token_ll, 0.0).sum(dim=1)
        greedy &= ((logits.argmax(dim=-1) == answers[:, 1:]) | ~real).all(dim=1)
    return OptionScores(summed=list(summed.split(splits)), num_tokens=list(lengths.float().split(splits)),
                        greedy=list(greedy.split(splits)))


@torch.no_grad()
def answer_log_likelihood(model, batch, schedule: Optional[str] = None):
    """Summed log-likelihood (B,) and token count (B,) of each row's answer in a training batch
    (``processor(prompts, answers, ...)``), from one full forward of ``schedule``; EOS is not scored."""
    if "labels" not in batch:
        raise ValueError("batch: needs labels (call the processor with answers)")
    out = model(**batch, schedule=schedule)
    targets = batch["labels"][:, batch["prefix_len"] + 1:]
    scored = targets != IGNORE_INDEX
    if model.config.eos_token_id is not None:
        scored &= targets != model.config.eos_token_id
    token_ll = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    token_ll = token_ll.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(scored, token_ll, 0.0).sum(dim=1), scored.sum(dim=1)
