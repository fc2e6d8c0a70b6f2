"""Text side of LMEye: special tokens and the batch layout both schedules rely on.

Every row of a batch is laid out as

    [pad ...][bos][text][<img> x N][text][<img-q>] | [<img-d> x R][response prefix][answer][eos][pad ...]
    \\______________ prefix, left-padded _________/   \\____________ suffix, right-padded ___________/

so that ``<img-q>`` sits in the same column ``P - 1`` of every row and the R
``<img-d>`` slots in the columns ``P .. P + R - 1`` right after it. The
positions the model needs are therefore known by construction (no search for
special tokens on the device, no host sync), and the prefix is exactly what the
single-pass schedule runs once with a KV cache. The text around the tokens
(where the image goes, the turns, the response prefix, BOS) is the processor's
``PromptTemplate`` (``lmeye_fast.models.prompts``); ``LMEyeProcessor.row`` turns
a conversation into one row, for training and evaluation alike. Prompts for
generation (no answers) pad their suffix on its left, after the slots, so their
last column is a real token in every row. A template without ``<img-q>``
(the released v1 layout) reads the request at the first slot, column ``P``.

For an encoder-decoder LLM (``encoder_decoder=True``) the prefix and the slots
are the encoder's input and the answer (a conversation's body) the decoder's,
each right-padded (docs/encoder_decoder.md, "The layout").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..atomic import replace_files, write_atomic
from .config import LMEyeConfig
from .prompts import PromptTemplate, Turn, prompt_template

__all__ = ["LMEyeProcessor", "LMEyeBatch", "TokenizedRow", "IGNORE_INDEX", "PROCESSOR_FILE", "read_processor_config"]

IGNORE_INDEX = -100
PROCESSOR_FILE = "lmeye_processor.json"
PROCESSOR_FORMAT_VERSION = 1


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
    """Adds LMEye's special tokens to a tokenizer, lays prompts out by its template and builds padded batches.

    Args:
        tokenizer: a Hugging Face tokenizer; ``<img>``, ``<img-q>`` and
            ``<img-d>`` are added to it (the model resizes the LLM's embeddings
            to ``len(tokenizer)``).
        num_image_tokens: N, static image tokens per image (the number of
            vision features); the image of a prompt expands to N ``<img>`` tokens.
        num_requests: K, ``<img-d>`` slots after ``<img-q>`` (``make_config(num_requests=R)`` gives
            the IPN fewer requests than slots).
        response_prefix: text between the slots and the answer (e.g. ``" Answer:"``);
            replaces the template's when given.
        add_bos: put the tokenizer's BOS token first; replaces the template's when
            given. Where neither says, when the tokenizer has one that differs from EOS.
        encoder_decoder: build batches for an encoder-decoder LLM
            (``LMEyeSeq2SeqModel``): the prompt is the encoder's input, the answer
            the decoder's labels (docs/encoder_decoder.md shows the layouts).
        decoder_start_token_id: the encoder-decoder LLM's
            ``config.decoder_start_token_id`` (T5: the pad token, BART: EOS).
            ``pad`` needs it to lay out conversations (``LMEyeCollator``): their
            decoder input cannot be derived from the labels, which hide the
            prompts of later turns, so it is built here, beginning with this token.
        template: the ``PromptTemplate`` (``lmeye_fast.models.prompts``), or the name of
            one in ``PROMPT_TEMPLATES``; ``"plain"`` by default: the prompt as given.

    ``processor.template`` is the template in effect (response prefix and BOS resolved);
    ``save_pretrained`` writes it with the tokenizer and the sizes, ``from_pretrained`` reads them.
    """

    def __init__(self, tokenizer, num_image_tokens: int, num_requests: int = 5, response_prefix: Optional[str] = None,
                 image_token: str = "<img>", request_token: str = "<img-q>", slot_token: str = "<img-d>",
                 add_bos: Optional[bool] = None, encoder_decoder: bool = False,
                 decoder_start_token_id: Optional[int] = None,
                 template: Union[str, PromptTemplate, dict] = "plain"):
        for name, value in (("num_image_tokens", num_image_tokens), ("num_requests", num_requests)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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
        template = prompt_template(template)
        if response_prefix is not None:
            template = dataclasses.replace(template, response_prefix=response_prefix)
        if add_bos is not None:
            template = dataclasses.replace(template, add_bos=add_bos)
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
        self.add_bos = (bos is not None and bos != self.eos_token_id) if template.add_bos is None else template.add_bos
        if self.add_bos and bos is None:
            raise ValueError("add_bos: the tokenizer has no BOS token")
        self.bos_token_id = bos
        self.template = dataclasses.replace(template, add_bos=self.add_bos)
        self.response_ids = self.encode(self.template.response_prefix)
        self.encoder_decoder = bool(encoder_decoder)
        self.decoder_start_token_id = decoder_start_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def response_prefix(self) -> str:
        return self.template.response_prefix

    def make_config(self, **kwargs) -> LMEyeConfig:
        """An ``LMEyeConfig`` bound to this tokenizer; ``kwargs`` set the IPN sizes and the rest."""
        if self.encoder_decoder:
            kwargs.setdefault("schedule", "two_pass")
        if not self.template.request_token:
            kwargs.setdefault("request_position", "first_slot")
        requests = kwargs.pop("num_requests", self.num_requests)
        if requests != self.num_requests:
            kwargs.setdefault("num_slots", self.num_requests)
        return LMEyeConfig(num_image_tokens=self.num_image_tokens, num_requests=requests,
                           image_token_id=self.image_token_id, request_token_id=self.request_token_id,
                           slot_token_id=self.slot_token_id, pad_token_id=self.pad_token_id,
                           eos_token_id=self.eos_token_id, vocab_size=len(self.tokenizer),
                           encoder_decoder=self.encoder_decoder, **kwargs)

    # ------------------------------------------------------------- save / load

    def to_dict(self) -> dict:
        """What ``from_pretrained`` needs besides the tokenizer (``lmeye_processor.json``)."""
        return {"num_image_tokens": self.num_image_tokens, "num_requests": self.num_requests,
                "image_token": self.image_token, "request_token": self.request_token, "slot_token": self.slot_token,
                "encoder_decoder": self.encoder_decoder, "decoder_start_token_id": self.decoder_start_token_id,
                "template": self.template.to_dict()}

    def save_pretrained(self, directory) -> Path:
        """Write the tokenizer (with LMEye's tokens) and ``lmeye_processor.json`` (sizes, template) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Each file whole, old or new (the tokenizer's files are read one by one).
        replace_files(directory, self.tokenizer.save_pretrained)
        payload = {"format_version": PROCESSOR_FORMAT_VERSION, "processor": self.to_dict()}
        return write_atomic(directory / PROCESSOR_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory, tokenizer=None, **overrides) -> "LMEyeProcessor":
        """The processor ``save_pretrained`` wrote to ``directory``; its tokenizer unless ``tokenizer`` is given.

        ``overrides`` (``response_prefix``, ``add_bos``, ``template``, ``num_image_tokens``, ...) must agree
        with what was saved: one that contradicts it is refused, naming both values.
        """
        saved = read_processor_config(directory)
        if saved is None:
            raise FileNotFoundError(f"directory: no {PROCESSOR_FILE} in {directory} (not written by "
                                    "LMEyeProcessor.save_pretrained?)")
        settings = dict(saved)
        template = PromptTemplate.from_dict(settings.pop("template"))
        for key, value in overrides.items():
            if value is None:
                continue
            if key in ("response_prefix", "add_bos"):
                recorded = getattr(template, key)
            elif key == "template":
                # A template that leaves BOS to the tokenizer agrees with the saved one's resolved choice.
                value = prompt_template(value)
                recorded, value = template, value if value.add_bos is not None else \
                    dataclasses.replace(value, add_bos=template.add_bos)
            elif key in settings:
                recorded = settings[key]
            else:
                raise TypeError(f"from_pretrained: unknown setting {key!r}")
            if value != recorded:
                raise ValueError(f"{key}: {directory} was saved with {_shown(recorded)}, but {_shown(value)} was "
                                 "asked for; leave it out to use the saved one")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(tokenizer, template=template, **settings)

    # ------------------------------------------------------------- prompts

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without the tokenizer's BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _text_ids(self, text: str) -> List[int]:
        """``encode`` for the text of a prompt, which may not spell out LMEye's own tokens."""
        ids = self.encode(text)
        special = (self.image_token_id, self.request_token_id, self.slot_token_id)
        if any(token in special for token in ids):
            raise ValueError(f"prompts: {text!r} spells out one of LMEye's tokens {self.image_token!r}, "
                             f"{self.request_token!r} or {self.slot_token!r}; the processor places them")
        return ids

    def prefix_ids(self, prompt: str, image: bool = True):
        """Token ids of a first question up to the end of the prefix, and where its image block starts.

        With an image: ``[bos] first_turn[<img> x N] [<img-q>]`` (the template's first turn around the
        question, the image where the template, or else the question, places it); without: ``[bos]
        first_turn`` and None.
        """
        before, after = self.template.first_pieces(prompt, image, self.image_token)
        ids = [self.bos_token_id] if self.add_bos else []
        ids += self._text_ids(before)
        if not image:
            return ids, None
        start = len(ids)
        ids += [self.image_token_id] * self.num_image_tokens + self._text_ids(after)
        return ids + ([self.request_token_id] if self.template.request_token else []), start

    def row(self, turns: Sequence[Turn], image: bool = True) -> TokenizedRow:
        """One conversation laid out by the template: the row training and evaluation share.

        ``turns``: its ``Turn`` records (or plain question strings for turns without answer);
        every answer is labelled, with the EOS after it. A prompt (for generation or scoring)
        is a conversation whose last turn has no answer: its row ends with the response
        prefix the answer would follow. For an encoder-decoder processor the first response
        prefix belongs to the encoder's input (``pad_encoder_decoder``), and the body, the
        decoder's, starts with the first answer.
        """
        turns = [Turn(turn) if isinstance(turn, str) else turn for turn in turns]
        if not turns or not all(isinstance(turn, Turn) for turn in turns):
            raise ValueError(f"turns: expected a non-empty sequence of Turn records, got {turns!r}")
        if any(turn.answer is None for turn in turns[:-1]):
            raise ValueError("turns: only the last turn may go without an answer")
        end = [] if self.eos_token_id is None else [self.eos_token_id]
        prefix, image_start = self.prefix_ids(turns[0].question, image=image)
        body, labels = [], []
        for index, turn in enumerate(turns):
            asked = [] if index == 0 else self._text_ids(self.template.later_text(turn.question))
            if index > 0 or not self.encoder_decoder:
                asked += self.response_ids
            body += asked
            labels += [IGNORE_INDEX] * len(asked)
            if turn.answer is not None:
                target = self.encode(turn.answer) + end
                body += target
                labels += target
        return TokenizedRow(prefix, image_start, body, labels)

    def prompt_text(self, token_ids: Sequence[int]) -> str:
        """A row's token ids as text, LMEye's tokens and the BOS included: the prompt as the model reads it."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def __call__(self, prompts: Sequence[Union[str, Sequence[Turn]]], answers: Optional[Sequence[str]] = None,
                 images: Optional[torch.Tensor] = None) -> LMEyeBatch:
        """Build a batch.

        Args:
            prompts: B questions, each laid out by the template (``row``): a string, or
                a conversation (a sequence of ``Turn``, the last without answer).
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
        for index, prompt in enumerate(prompts):  # never tokenized as its repr
            if not isinstance(prompt, str) and not (isinstance(prompt, Sequence) and prompt and all(
                    isinstance(turn, Turn) and isinstance(turn.question, str)
                    and (turn.answer is None or isinstance(turn.answer, str)) for turn in prompt)):
                raise TypeError(f"prompts[{index}]: expected a string or a sequence of Turn records with string "
                                f"texts, got {type(prompt).__name__} ({prompt!r})")
        for index, text in enumerate(answers or ()):
            if not isinstance(text, str):
                raise TypeError(f"answers[{index}]: expected a string, got {type(text).__name__} ({text!r})")
        if images is not None and (not isinstance(images, torch.Tensor) or images.shape[0] != batch):
            raise ValueError(f"images: expected a tensor with batch size {batch}, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        conversations = [[Turn(prompt)] if isinstance(prompt, str) else list(prompt) for prompt in prompts]
        if answers is not None:
            for index, (turns, answer) in enumerate(zip(conversations, answers)):
                if turns[-1].answer is not None:
                    raise ValueError(f"prompts[{index}]: its last turn has an answer already, and answers gives one")
                turns[-1] = Turn(turns[-1].question, answer)
        rows = [self.row(turns) for turns in conversations]
        if self.encoder_decoder:
            if answers is None and any(row.body for row in rows):
                raise ValueError("prompts: an encoder-decoder LLM answers one question at a time; a prompt of "
                                 "several turns would need the earlier ones in its decoder")
            out = self.pad_encoder_decoder([(row.prefix, row.image_start) for row in rows],
                                           [row.body_labels for row in rows] if answers is not None else None)
        else:
            out = self.pad(rows, prompts=answers is None)
            if answers is None:
                del out["labels"]
        if images is not None:
            out["pixel_values"] = images
        return out

    def pad(self, rows: Sequence[TokenizedRow], prompts: bool = False) -> LMEyeBatch:
        """Lay out tokenized rows (conversations, ``LMEyeCollator``) as one batch.

        Decoder-only: prefixes left-padded to P, ``<img-d>`` slots at ``[P, P + R)`` of the
        rows with an image, bodies after them, right-padded. A row without image has
        ``image_pos`` and ``slot_pos`` -1 (outside the sequence, so nothing is written there)
        and its body starts at column P. ``request_pos`` is P - 1 (``<img-q>``), or the first
        slot P when the template has no request token. Returns the tensors of ``__call__`` with
        ``labels`` from ``body_labels``, without ``pixel_values``. ``prompts=True`` (rows to
        generate from or score) pads each body on its left instead, after the slots, so that
        every row's last column is its last token.

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
            start = prefix_len + len(head)
            end = total if prompts else start + len(row.body)
            for first, tokens in ((pad, row.prefix + head), (end - len(row.body), row.body)):
                input_ids[index, first:first + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                attention_mask[index, first:first + len(tokens)] = 1
            labels[index, end - len(row.body):end] = torch.tensor(row.body_labels, dtype=torch.long)
            if row.image_start is not None:
                image_start[index] = pad + row.image_start
        has_image = (image_start >= 0)[:, None]
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
        image_pos = image_start[:, None] + torch.arange(self.num_image_tokens)
        slot_pos = prefix_len + torch.arange(self.num_requests).expand(batch, -1)
        request_column = prefix_len - 1 if self.template.request_token else prefix_len
        return LMEyeBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_pos=torch.where(has_image, image_pos, -1),
            request_pos=torch.full((batch,), request_column, dtype=torch.long),
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
                request_pos[index] = len(prefix) - (1 if self.template.request_token else 0)
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


def read_processor_config(directory) -> Optional[dict]:
    """The settings ``LMEyeProcessor.save_pretrained`` wrote to ``directory``, or None when it wrote none."""
    path = Path(directory) / PROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != PROCESSOR_FORMAT_VERSION \
            or not isinstance(payload.get("processor"), dict):
        raise ValueError(f"{path}: expected an LMEye processor config with format_version {PROCESSOR_FORMAT_VERSION}")
    return payload["processor"]


def _shown(value) -> str:
    return f"the template {value.name!r} ({value.to_dict()})" if isinstance(value, PromptTemplate) else repr(value)


def _right_padded(rows: Sequence[List[int]], fill: int) -> torch.Tensor:
    """``rows`` of token ids as one (B, L) tensor, each left-aligned and followed by ``fill``; L is the
    longest row's length, at least 1."""
    out = torch.full((len(rows), max(1, max(len(row) for row in rows))), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out
