"""Log-likelihood of answer texts: all the options of a question scored on one shared prefix.

The options of a multiple-choice question share the prompt, the image, the
request at ``<img-q>`` and therefore what the IPN writes into the ``<img-d>``
slots; only the answer text differs. ``score_options`` runs what they share
once per question and only the answers once per option, as the model's own
``answer_logits`` does for its kind of LLM:

- a decoder-only LLM (``LMEyeModel``): the prefix once with a KV cache, the IPN
  once, the slots and the response prefix (the suffix head, the same for every
  option) once on that cache, and then the K answers as a batch of short
  continuations on the cache, whose rows are repeated (not recomputed) once per
  option. The first answer token is predicted by the head's last column, so
  options of one token each need no further LLM call at all.
- an encoder-decoder LLM (``LMEyeSeq2SeqModel``): the question's two encoder
  passes (and the IPN between them) once, and then the decoder once over the K
  answers, on the question's encoding repeated (not recomputed) once per option.

``answer_log_likelihood`` is the plain way: one full forward per (prompt,
answer) row of a training-style batch, under any schedule. It defines what
``score_options`` must equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

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


class _Answers(NamedTuple):
    """The K options of a batch of questions as one right-padded batch of answer rows."""

    splits: List[int]      # options per question, on the host
    rows: torch.Tensor     # (K,) the question of each option
    tokens: torch.Tensor   # (K, L) answer token ids, right-padded
    lengths: torch.Tensor  # (K,) answer tokens per option
    real: torch.Tensor     # (K, L) the columns that hold an answer token


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


def _answers(option_ids: List[List[List[int]]], pad_token_id: int, device) -> _Answers:
    # The counts are known on the host: kept there, neither the repeat (with its output size) nor the
    # final split waits on the device.
    splits = [len(choices) for choices in option_ids]
    rows = torch.repeat_interleave(torch.arange(len(option_ids), device=device),
                                   torch.tensor(splits, device=device), output_size=sum(splits))
    flat = [tokens for choices in option_ids for tokens in choices]
    longest = max(len(tokens) for tokens in flat)
    tokens = torch.full((len(flat), longest), pad_token_id, dtype=torch.long)
    for row, ids in enumerate(flat):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    lengths = torch.tensor([len(ids) for ids in flat], device=device)
    real = torch.arange(longest, device=device) < lengths[:, None]
    return _Answers(splits, rows, tokens.to(device), lengths, real)


def _token_scores(logits: torch.Tensor, targets: torch.Tensor, real: torch.Tensor):
    """Summed log-likelihood (K,) of the ``real`` targets (K, L) under ``logits`` (K, L, V), and whether
    each of them is the argmax of its column."""
    token_ll = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    summed = torch.where(real, token_ll, 0.0).sum(dim=1)
    greedy = ((logits.argmax(dim=-1) == targets) | ~real).all(dim=1)
    return summed, greedy


@torch.no_grad()
def score_options(model, processor, prompts: Sequence[str], options: Sequence[Sequence[str]],
                  pixel_values: Optional[torch.Tensor] = None, image_features: Optional[torch.Tensor] = None,
                  static_features: Optional[torch.Tensor] = None, schedule: Optional[str] = None) -> OptionScores:
    """Score every option of every prompt by the log-likelihood of its answer tokens.

    Args:
        model: an ``LMEyeModel`` or an ``LMEyeSeq2SeqModel``, whose ``answer_logits`` runs what the
            options of a question share once; processor: its ``LMEyeProcessor``
            (built with ``encoder_decoder=True`` for the latter).
        prompts: B prompts (as for generation, at most one ``<img>`` each).
        options: B lists of answer texts; the lists may differ in length.
        pixel_values / image_features, static_features: the B images, as for ``model.generate``.
        schedule: ``"static"`` scores without the IPN; any other value (or
            None) runs the IPN. For a decoder-only LLM ``"two_pass"`` gives the
            same scores as ``"single_pass"`` (the prefix is the same in both passes).
    Returns:
        ``OptionScores``; the answer tokens are encoded exactly as the
        processor encodes training answers (EOS is not scored).
    """
    model.check_processor(processor)
    option_ids = _option_ids(processor, options, len(prompts))
    device = model.special_embed.device
    batch = processor(prompts, images=pixel_values).to(device)
    image_features, static_features = (None if f is None else f.to(device) for f in (image_features, static_features))
    answers = _answers(option_ids, processor.pad_token_id, device)
    logits = model.answer_logits(answers.tokens, answers.rows, **batch, image_features=image_features,
                                 static_features=static_features, schedule=schedule)
    summed, greedy = _token_scores(logits, answers.tokens, answers.real)
    return OptionScores(summed=list(summed.split(answers.splits)),
                        num_tokens=list(answers.lengths.float().split(answers.splits)),
                        greedy=list(greedy.split(answers.splits)))


@torch.no_grad()
def answer_log_likelihood(model, batch, schedule: Optional[str] = None):
    """Summed log-likelihood (B,) and token count (B,) of each row's answer in a training batch
    (``processor(prompts, answers, ...)``), from one full forward of ``schedule``; EOS is not scored."""
    if "labels" not in batch:
        raise ValueError("batch: needs labels (call the processor with answers)")
    out = model(**batch, schedule=schedule)
    logits, targets = model.loss_targets(out.logits, batch["labels"])
    scored = targets != IGNORE_INDEX
    if model.config.eos_token_id is not None:
        scored &= targets != model.config.eos_token_id
    summed, _ = _token_scores(logits, targets.clamp_min(0), scored)
    return summed, scored.sum(dim=1)
