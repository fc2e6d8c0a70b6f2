"""Text side of LMEye: special tokens and the batch layout both schedules rely on.

Every row of a batch is laid out as

    [pad ...][bos][text][<img> x N][text][<img-q>] | [<img-d> x R][response prefix][answer][eos][pad ...]
    \\______________ prefix, left-padded _________/   \\____________ suffix, right-padded ___________/

so that ``<img-q>`` sits in the same column ``P - 1`` of every row and the R
``<img-d>`` slots in the columns ``P .. P + R - 1`` right after it. The
positions the model needs are therefore known by construction (no search for
special tokens on the device, no host sync), and the prefix is exactly what the
single-pass schedule runs once with a KV cache. Prompts for generation (no
answers) have suffixes of one length, so their last column is a real token in
every row.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .config import LMEyeConfig

__all__ = ["LMEyeProcessor", "LMEyeBatch", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class LMEyeBatch(dict):
    """The processor's output: a dict of tensors plus the int ``prefix_len``; ``.to(device)`` moves the tensors."""

    def to(self, device=None, non_blocking: bool = False) -> "LMEyeBatch":
        return LMEyeBatch({key: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor)
                           else value for key, value in self.items()})


class LMEyeProcessor:
    """Adds LMEye's special tokens to a tokenizer and builds padded batches.

    Args:
        tokenizer: a Hugging Face tokenizer; ``<img>``, ``<img-q>`` and
            ``<img-d>`` are added to it (the model resizes the LLM's embeddings
            to ``len(tokenizer)``).
        num_image_tokens: N, static image tokens per image (the number of
            vision features); the ``<img>`` placeholder of a prompt expands to N.
        num_requests: R, ``<img-d>`` slots after ``<img-q>``.
        response_prefix: text between the slots and the answer (e.g. ``" Answer:"``).
        add_bos: put the tokenizer's BOS token first; by default when it has one
            that differs from EOS.
    """

    def __init__(self, tokenizer, num_image_tokens: int, num_requests: int = 5, response_prefix: str = "",
                 image_token: str = "<img>", request_token: str = "<img-q>", slot_token: str = "<img-d>",
                 add_bos: Optional[bool] = None):
        for name, value in (("num_image_tokens", num_image_tokens), ("num_requests", num_requests)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.tokenizer = tokenizer
        self.num_image_tokens, self.num_requests = num_image_tokens, num_requests
        self.image_token, self.request_token, self.slot_token = image_token, request_token, slot_token
        tokenizer.add_tokens([image_token, request_token, slot_token], special_tokens=True)
        self.image_token_id, self.request_token_id, self.slot_token_id = (
            tokenizer.convert_tokens_to_ids(t) for t in (image_token, request_token, slot_token))
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer: has neither a pad token nor an EOS token to pad with")
        bos = tokenizer.bos_token_id
        self.add_bos = (bos is not None and bos != self.eos_token_id) if add_bos is None else add_bos
        if self.add_bos and bos is None:
            raise ValueError("add_bos: the tokenizer has no BOS token")
        self.bos_token_id = bos
        self.response_ids = self._encode(response_prefix)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def make_config(self, **kwargs) -> LMEyeConfig:
        """An ``LMEyeConfig`` bound to this tokenizer; ``kwargs`` set the IPN sizes and the rest."""
        return LMEyeConfig(num_image_tokens=self.num_image_tokens, num_requests=self.num_requests,
                           image_token_id=self.image_token_id, request_token_id=self.request_token_id,
                           slot_token_id=self.slot_token_id, pad_token_id=self.pad_token_id,
                           eos_token_id=self.eos_token_id, vocab_size=len(self.tokenizer), **kwargs)

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _prefix(self, prompt: str):
        """Token ids of one prompt up to and including ``<img-q>``, and where its image block starts."""
        pieces = prompt.split(self.image_token)
        if len(pieces) > 2:
            raise ValueError(f"prompts: expected at most one {self.image_token!r} placeholder per prompt, "
                             f"got {len(pieces) - 1} in {prompt!r}")
        if len(pieces) == 1:
            pieces = ["", prompt]
        ids = [self.bos_token_id] if self.add_bos else []
        ids += self._encode(pieces[0])
        start = len(ids)
        ids += [self.image_token_id] * self.num_image_tokens + self._encode(pieces[1]) + [self.request_token_id]
        return ids, start

    def __call__(self, prompts: Sequence[str], answers: Optional[Sequence[str]] = None,
                 images: Optional[torch.Tensor] = None) -> LMEyeBatch:
        """Build a batch.

        Args:
            prompts: B instruction texts, each with at most one ``<img>``
                placeholder (the image goes first when there is none).
            answers: B answer texts for training (labels cover the answer and
                EOS only), or None for generation prompts.
            images: passed through as ``pixel_values`` (B, ...) when given.
        Returns:
            ``LMEyeBatch`` with ``input_ids``, ``attention_mask``,
            ``position_ids`` (B, T), ``image_pos`` (B, N), ``request_pos`` (B,),
            ``slot_pos`` (B, R), the int ``prefix_len`` P, ``labels`` (B, T)
            when answers are given, and ``pixel_values`` when images are.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a sequence of strings, got one string")
        batch = len(prompts)
        if batch == 0:
            raise ValueError("prompts: expected at least one prompt")
        if answers is not None and len(answers) != batch:
            raise ValueError(f"answers: expected {batch} answers (one per prompt), got {len(answers)}")
        if images is not None and (not isinstance(images, torch.Tensor) or images.shape[0] != batch):
            raise ValueError(f"images: expected a tensor with batch size {batch}, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        prefixes, starts = zip(*(self._prefix(p) for p in prompts))
        head = [self.slot_token_id] * self.num_requests + self.response_ids
        tails = [self._encode(a) + ([] if self.eos_token_id is None else [self.eos_token_id]) for a in answers] \
            if answers is not None else [[] for _ in prompts]
        prefix_len = max(len(p) for p in prefixes)
        suffix_len = len(head) + max(len(t) for t in tails)
        total = prefix_len + suffix_len

        input_ids = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, total), dtype=torch.long)
        labels = torch.full((batch, total), IGNORE_INDEX, dtype=torch.long)
        image_start = torch.empty(batch, dtype=torch.long)
        for row, (prefix, start, tail) in enumerate(zip(prefixes, starts, tails)):
            pad = prefix_len - len(prefix)
            end = prefix_len + len(head) + len(tail)
            input_ids[row, pad:end] = torch.tensor(prefix + head + tail, dtype=torch.long)
            attention_mask[row, pad:end] = 1
            labels[row, end - len(tail):end] = torch.tensor(tail, dtype=torch.long)
            image_start[row] = pad + start

        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        out = LMEyeBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_pos=image_start[:, None] + torch.arange(self.num_image_tokens),
            request_pos=torch.full((batch,), prefix_len - 1, dtype=torch.long),
            slot_pos=prefix_len + torch.arange(self.num_requests).expand(batch, -1).contiguous(),
            prefix_len=prefix_len,
        )
        if answers is not None:
            out["labels"] = labels
        if images is not None:
            out["pixel_values"] = images
        return out

    def decode(self, token_ids) -> List[str]:
        """Generated token ids (B, L) -> B strings, without special tokens."""
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
