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

For an encoder-decoder LLM (``encoder_decoder=True``) the prefix and the slots
are the encoder's input and the answer (a conversation's body) the decoder's,
each right-padded (docs/encoder_decoder.md, "The layout").
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .config import LMEyeConfig

__all__ = ["LMEyeProcessor", "LMEyeBatch", "TokenizedRow", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class TokenizedRow(NamedTuple):
    """One row before padding (``LMEyeProcessor.pad``).

    ``prefix``: token ids up to the end of the prefix (``<img-q>`` last when the
    row has an image); ``image_start``: where its ``<img>`` block starts, None
    for a row without image (it gets no slots, and the IPN writes nothing into
    it); ``body``: the suffix after the ``<img-d>`` slots; ``body_labels``: one
    label per ``body`` token, ``IGNORE_INDEX`` where there is no target.
    """

    prefix: List[int]
    image_start: Optional[int]
    body: List[int]
    body_labels: List[int]


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
        encoder_decoder: build batches for an encoder-decoder LLM
            (``LMEyeSeq2SeqModel``): the prompt is the encoder's input, the answer
            the decoder's labels (docs/encoder_decoder.md shows the layouts).
        decoder_start_token_id: the encoder-decoder LLM's
            ``config.decoder_start_token_id`` (T5: the pad token, BART: EOS).
            ``pad`` needs it to lay out conversations (``LMEyeCollator``): their
            decoder input cannot be derived from the labels, which hide the
            prompts of later turns, so it is built here, beginning with this token.
    """

    def __init__(self, tokenizer, num_image_tokens: int, num_requests: int = 5, response_prefix: str = "",
                 image_token: str = "<img>", request_token: str = "<img-q>", slot_token: str = "<img-d>",
                 add_bos: Optional[bool] = None, encoder_decoder: bool = False,
                 decoder_start_token_id: Optional[int] = None):
        for name, value in (("num_image_tokens", num_image_tokens), ("num_requests", num_requests)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if decoder_start_token_id is not None:
            if not encoder_decoder:
                raise ValueError("decoder_start_token_id: only an encoder-decoder LLM has a decoder start token; "
                                 "pass encoder_decoder=True with it, or leave it None")
            if isinstance(decoder_start_token_id, bool) or not isinstance(decoder_start_token_id, int) \
                    or decoder_start_token_id < 0:
                raise ValueError(f"decoder_start_token_id: expected a token id (an int >= 0), got "
                                 f"{decoder_start_token_id!r}")
        marks = {"image_token": image_token, "request_token": request_token, "slot_token": slot_token}
        for name, mark in marks.items():
            if not isinstance(mark, str) or not mark.strip():
                raise ValueError(f"{name}: expected a non-empty string, got {mark!r}")
        if len(set(marks.values())) < 3:
            raise ValueError(f"image_token, request_token, slot_token: expected three different tokens, got "
                             f"{tuple(marks.values())}")
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
        self.response_ids = self.encode(response_prefix)
        self.encoder_decoder = bool(encoder_decoder)
        self.decoder_start_token_id = decoder_start_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def make_config(self, **kwargs) -> LMEyeConfig:
        """An ``LMEyeConfig`` bound to this tokenizer; ``kwargs`` set the IPN sizes and the rest."""
        if self.encoder_decoder:
            kwargs.setdefault("schedule", "two_pass")
        return LMEyeConfig(num_image_tokens=self.num_image_tokens, num_requests=self.num_requests,
                           image_token_id=self.image_token_id, request_token_id=self.request_token_id,
                           slot_token_id=self.slot_token_id, pad_token_id=self.pad_token_id,
                           eos_token_id=self.eos_token_id, vocab_size=len(self.tokenizer),
                           encoder_decoder=self.encoder_decoder, **kwargs)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without the tokenizer's BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prefix_ids(self, prompt: str, image: bool = True):
        """Token ids of one prompt up to the end of the prefix, and where its image block starts.

        With an image: ``[bos][text][<img> x N][text][<img-q>]`` (the image goes first
        when the prompt has no ``<img>`` placeholder); without: ``[bos][text]`` and
        None, and the prompt may not hold a placeholder.
        """
        pieces = prompt.split(self.image_token)
        if len(pieces) > 2 or (not image and len(pieces) > 1):
            raise ValueError(f"prompts: expected {'at most one' if image else 'no'} {self.image_token!r} "
                             f"placeholder in a prompt {'with' if image else 'without'} an image, "
                             f"got {len(pieces) - 1} in {prompt!r}")
        ids = [self.bos_token_id] if self.add_bos else []
        if not image:
            return ids + self.encode(prompt), None
        if len(pieces) == 1:
            pieces = ["", prompt]
        ids += self.encode(pieces[0])
        start = len(ids)
        ids += [self.image_token_id] * self.num_image_tokens + self.encode(pieces[1]) + [self.request_token_id]
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
            With ``encoder_decoder=True``: ``input_ids``, ``attention_mask``
            (B, T), ``image_pos``, ``request_pos``, ``slot_pos``, ``labels``
            (B, L) for the decoder when answers are given, and ``pixel_values``.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a sequence of strings, got one string")
        batch = len(prompts)
        if batch == 0:
            raise ValueError("prompts: expected at least one prompt")
        if answers is not None and len(answers) != batch:
            raise ValueError(f"answers: expected {batch} answers (one per prompt), got {len(answers)}")
        for name, texts in (("prompts", prompts), ("answers", answers or ())):
            for index, text in enumerate(texts):
                if not isinstance(text, str):  # never tokenized as its repr
                    raise TypeError(f"{name}[{index}]: expected a string, got {type(text).__name__} ({text!r})")
        if images is not None and (not isinstance(images, torch.Tensor) or images.shape[0] != batch):
            raise ValueError(f"images: expected a tensor with batch size {batch}, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        tails = [self.encode(a) + ([] if self.eos_token_id is None else [self.eos_token_id]) for a in answers] \
            if answers is not None else [[] for _ in prompts]
        if self.encoder_decoder:
            out = self.pad_encoder_decoder([self.prefix_ids(prompt) for prompt in prompts],
                                           tails if answers is not None else None)
            if images is not None:
                out["pixel_values"] = images
            return out
        ignored = [IGNORE_INDEX] * len(self.response_ids)
        rows = [TokenizedRow(*self.prefix_ids(prompt), self.response_ids + tail, ignored + tail)
                for prompt, tail in zip(prompts, tails)]
        out = self.pad(rows)
        if answers is None:
            del out["labels"]
        if images is not None:
            out["pixel_values"] = images
        return out

    def pad(self, rows: Sequence[TokenizedRow]) -> LMEyeBatch:
        """Lay out tokenized rows (conversations, ``LMEyeCollator``) as one batch.

        Decoder-only: prefixes left-padded to P, ``<img-d>`` slots at ``[P, P + R)`` of the
        rows with an image, bodies after them, right-padded. A row without image has
        ``image_pos`` and ``slot_pos`` -1 (outside the sequence, so nothing is written there)
        and its body starts at column P. Returns the tensors of ``__call__`` with ``labels``
        from ``body_labels``, without ``pixel_values``.

        Encoder-decoder (``encoder_decoder=True``, needs ``decoder_start_token_id``): the
        prefixes are the encoder's input as ``pad_encoder_decoder`` lays them out, the bodies
        the decoder's: ``decoder_input_ids`` (B, L) are each body shifted right behind the
        decoder start token, ``labels`` (B, L) its ``body_labels``, both right-padded (pad
        token, ``IGNORE_INDEX``).
        """
        if not rows:
            raise ValueError("rows: expected at least one row")
        for index, row in enumerate(rows):
            if len(row.body_labels) != len(row.body):
                raise ValueError(f"rows[{index}]: {len(row.body)} body tokens but {len(row.body_labels)} labels")
        if self.encoder_decoder:
            return self._pad_encoder_decoder_rows(rows)
        heads = [[self.slot_token_id] * self.num_requests if row.image_start is not None else [] for row in rows]
        prefix_len = max(len(row.prefix) for row in rows)
        total = prefix_len + max(len(head) + len(row.body) for head, row in zip(heads, rows))
        batch = len(rows)

        input_ids = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, total), dtype=torch.long)
        labels = torch.full((batch, total), IGNORE_INDEX, dtype=torch.long)
        image_start = torch.full((batch,), -1, dtype=torch.long)
        for index, (row, head) in enumerate(zip(rows, heads)):
            pad = prefix_len - len(row.prefix)
            end = prefix_len + len(head) + len(row.body)
            input_ids[index, pad:end] = torch.tensor(row.prefix + head + row.body, dtype=torch.long)
            attention_mask[index, pad:end] = 1
            labels[index, end - len(row.body):end] = torch.tensor(row.body_labels, dtype=torch.long)
            if row.image_start is not None:
                image_start[index] = pad + row.image_start
        has_image = (image_start >= 0)[:, None]
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        image_pos = image_start[:, None] + torch.arange(self.num_image_tokens)
        slot_pos = prefix_len + torch.arange(self.num_requests).expand(batch, -1)
        return LMEyeBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_pos=torch.where(has_image, image_pos, -1),
            request_pos=torch.full((batch,), prefix_len - 1, dtype=torch.long),
            slot_pos=torch.where(has_image, slot_pos, -1),
            prefix_len=prefix_len,
            labels=labels,
        )

    def _pad_encoder_decoder_rows(self, rows: Sequence[TokenizedRow]) -> LMEyeBatch:
        """``pad`` for an encoder-decoder LLM: prefixes to the encoder, bodies to the decoder."""
        if self.decoder_start_token_id is None:
            raise ValueError("decoder_start_token_id: required to lay out rows for an encoder-decoder LLM (their "
                             "bodies are the decoder's input, which begins with the LLM's decoder start token); "
                             "pass LMEyeProcessor(..., decoder_start_token_id=llm.config.decoder_start_token_id)")
        out = self.pad_encoder_decoder([(row.prefix, row.image_start) for row in rows],
                                       [row.body_labels for row in rows])
        # Built from the bodies, not the labels: those hide the prompts of later turns, which the decoder reads.
        out["decoder_input_ids"] = _right_padded(
            [([self.decoder_start_token_id] + row.body)[:len(row.body)] for row in rows], self.pad_token_id)
        return out

    def pad_encoder_decoder(self, prefixes: Sequence[Tuple[List[int], Optional[int]]],
                            answers: Optional[Sequence[List[int]]] = None) -> LMEyeBatch:
        """The encoder-decoder layout: encoder inputs ``prefix + [<img-d> x R] + response prefix + [eos]``
        right-padded, and, when ``answers`` are given, decoder ``labels`` (B, L) right-padded with
        ``IGNORE_INDEX``. ``prefixes`` are ``prefix_ids`` results; a row without image gets no slots and
        ``image_pos`` / ``slot_pos`` -1. ``answers`` are each row's labels: the answer's token ids (EOS
        included), ``IGNORE_INDEX`` where a token is read but not a target."""
        if not prefixes:
            raise ValueError("prefixes: expected at least one row")
        tail = self.response_ids + ([] if self.eos_token_id is None else [self.eos_token_id])
        rows = [prefix + ([self.slot_token_id] * self.num_requests if start is not None else []) + tail
                for prefix, start in prefixes]
        batch, total = len(rows), max(len(row) for row in rows)
        input_ids = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, total), dtype=torch.long)
        image_pos = torch.full((batch, self.num_image_tokens), -1, dtype=torch.long)
        slot_pos = torch.full((batch, self.num_requests), -1, dtype=torch.long)
        # The request of a row without image is read but written nowhere: any column in the row will do.
        request_pos = torch.zeros((batch,), dtype=torch.long)
        for index, (row, (prefix, start)) in enumerate(zip(rows, prefixes)):
            input_ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, :len(row)] = 1
            if start is not None:
                image_pos[index] = start + torch.arange(self.num_image_tokens)
                request_pos[index] = len(prefix) - 1
                slot_pos[index] = len(prefix) + torch.arange(self.num_requests)
        out = LMEyeBatch(input_ids=input_ids, attention_mask=attention_mask, image_pos=image_pos,
                         request_pos=request_pos, slot_pos=slot_pos)
        if answers is not None:
            if len(answers) != batch:
                raise ValueError(f"answers: expected {batch} answers (one per row), got {len(answers)}")
            out["labels"] = _right_padded(answers, IGNORE_INDEX)
        return out

    def decode(self, token_ids) -> List[str]:
        """Generated token ids (B, L) -> B strings, without special tokens."""
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)


def _right_padded(rows: Sequence[List[int]], fill: int) -> torch.Tensor:
    """``rows`` of token ids as one (B, L) tensor, each left-aligned and followed by ``fill``; L is the
    longest row's length, at least 1."""
    out = torch.full((len(rows), max(1, max(len(row) for row in rows))), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out
