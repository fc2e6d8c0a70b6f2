"""Datasets of image files and texts for both LMEye stages, and the collator that batches them.

    records = load_records("llava_instruct.json")          # or captions.jsonl / .csv, or a datasets.Dataset
    dataset = LMEyeDataset(records, processor, image_processor, image_folder="images/")
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=LMEyeCollator(processor))
    stream = LMEyeStream(load_dataset("json", data_files="llava_instruct.json", streaming=True, split="train"),
                         processor, image_processor, image_folder="images/")    # read as it goes

A record is either a caption (stage 1: ``{"image": path, "caption": text}``) or a
conversation in LLaVA's format (stage 2)::

    {"id": "0", "image": "coco/1.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
                       {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Black."}]}

A conversation is laid out by the processor's prompt template
(``LMEyeProcessor.row``, the function evaluation builds its prompts with too): the
first human turn with the image's ``<img>`` block (where the template puts it;
LLaVA's ``<image>`` tag is taken care of) ends the prefix with ``<img-q>``; the
``<img-d>`` slots follow, then the response prefix, the first answer and every
later turn. The labels are the answers' tokens and the end-of-turn token after
each, nothing else. Images are read by ``lmeye_fast.models.vision.read_image``
(every Pillow mode, 16-bit included, to 8-bit RGB). A record without ``"image"`` is a
text-only sample: no ``<img>`` block, no slots, and the IPN writes nothing into
it. A caption is the one-turn conversation ``caption_prompt`` -> caption.

With an encoder-decoder processor (``LMEyeProcessor(..., encoder_decoder=True,
decoder_start_token_id=...)``) the same row is split in two: the prefix and the
slots are the encoder's input, the first answer and every later turn the
decoder's (docs/encoder_decoder.md).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .models.processor import IGNORE_INDEX, LMEyeBatch, LMEyeProcessor, TokenizedRow
from .models.prompts import LLAVA_IMAGE_TAG, Turn
from .models.vision import read_image

__all__ = ["Conversation", "LMEyeDataset", "LMEyeStream", "LMEyeCollator", "load_records", "read_record_file",
           "SourceRecord", "parse_record", "BAD_IMAGE_POLICIES", "SKIPPED_IMAGES"]

BAD_IMAGE_POLICIES = ("skip", "raise")
# The key of a dataset item that lists the images skipped to reach it (present only when there were any).
SKIPPED_IMAGES = "skipped_images"


@dataclass(frozen=True)
class Conversation:
    """A parsed record: the image path (None for text-only) and its turns; the last turn's answer is None
    for a question that asks for one (an evaluation record)."""

    image: Optional[str]
    turns: Tuple[Turn, ...]


@dataclass(frozen=True)
class SourceRecord:
    """A record as read from a file, with where it is: ``data.jsonl: line 3``, ``data.json: record 0``
    or ``data.csv: row 2`` (row 1 being the header)."""

    where: str
    record: Any


def read_record_file(path) -> List[SourceRecord]:
    """The records of a ``.json`` list, a ``.jsonl`` file or a ``.csv`` file with a header, each with its place.

    The file must be UTF-8 (a byte-order mark, as spreadsheets write it, is dropped); undecodable
    bytes, invalid JSON and CSV rows with more fields than the header raise ``ValueError`` naming
    the file and the line or row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no file {path}")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"data: expected a .json, .jsonl or .csv file, got {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({error.reason} at byte {error.start}); save the "
                         "file as UTF-8") from None
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") \
                from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return [SourceRecord(f"{path}: record {index}", record) for index, record in enumerate(records)]
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(SourceRecord(f"{path}: line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}, column {error.colno}: not valid JSON ({error.msg})") \
                    from None
        return records
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    for number, row in enumerate(reader, start=2):
        if None in row:
            raise ValueError(f"{path}: row {number}: more fields than the header's {reader.fieldnames}")
        records.append(SourceRecord(f"{path}: row {number}", row))
    return records


def load_records(source) -> Sequence[Dict[str, Any]]:
    """Records from a ``.json`` list (LLaVA's files), a ``.jsonl`` file, a ``.csv`` file with a header
    (``read_record_file``), or a sequence of dicts (a list, a ``datasets.Dataset``) passed through as it is."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    return [entry.record for entry in read_record_file(source)]


def _source_records(source) -> List[SourceRecord]:
    if isinstance(source, (str, os.PathLike)):
        return read_record_file(source)
    return [SourceRecord(f"records[{index}]", record) for index, record in enumerate(source)]


def parse_record(record: Dict[str, Any], caption_prompt: str = "", where: str = "record",
                 open_question: bool = False) -> Conversation:
    """A caption, LLaVA conversation or question record as a ``Conversation``; malformed ones raise, naming
    ``where``.

    ``conversations``: alternating ``human`` / ``gpt`` messages; ``caption``: the one turn
    ``caption_prompt`` -> caption. With ``open_question`` (evaluation records) a conversation may
    end with a ``human`` message, and a record may instead hold its question as ``question`` or
    ``text`` (LLaVA's evaluation files): the last turn then has no answer.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
    image = record.get("image") or None
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a path string, got {type(image).__name__}")
    if record.get("conversations") is not None:
        messages = record["conversations"]
        if not isinstance(messages, list) or not messages or (len(messages) % 2 and not open_question):
            raise ValueError(f"{where}: 'conversations' must be a non-empty list of human/gpt pairs")
        turns = []
        for k in range(0, len(messages), 2):
            pair = messages[k:k + 2]
            roles = tuple(m.get("from") if isinstance(m, dict) else None for m in pair)
            if roles != ("human", "gpt")[:len(pair)]:
                raise ValueError(f"{where}: conversations[{k}:{k + 2}] must be a 'human' then a 'gpt' message, "
                                 f"got {roles}")
            values = [m.get("value") for m in pair]
            for offset, value in enumerate(values):
                if not isinstance(value, str):
                    raise ValueError(f"{where}: conversations[{k + offset}].value must be a string, got "
                                     f"{type(value).__name__} ({value!r})")
            turns.append(Turn(values[0], values[1] if len(values) == 2 else None))
    elif record.get("caption") is not None:
        if not isinstance(record["caption"], str):
            raise ValueError(f"{where}: 'caption' must be a string, got {type(record['caption']).__name__} "
                             f"({record['caption']!r})")
        turns = [Turn(caption_prompt, record["caption"])]
    elif open_question and any(record.get(key) is not None for key in ("question", "text")):
        key = next(key for key in ("question", "text") if record.get(key) is not None)
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        turns = [Turn(record[key])]
    else:
        expected = "a 'conversations' list (LLaVA format) or a 'caption'" + \
            (", 'question' or 'text'" if open_question else "")
        raise ValueError(f"{where}: expected {expected}")
    if any(LLAVA_IMAGE_TAG in turn.question for turn in turns[1:]):
        raise ValueError(f"{where}: only the first human turn may hold {LLAVA_IMAGE_TAG!r}")
    if image is None and LLAVA_IMAGE_TAG in turns[0].question:
        raise ValueError(f"{where}: {LLAVA_IMAGE_TAG!r} in a record without 'image'")
    return Conversation(image, tuple(turns))


class _RecordItems:
    """What both datasets share: a parsed record into its tokenized row and preprocessed pixels."""

    def __init__(self, processor: LMEyeProcessor, image_processor, image_folder, caption_prompt: str,
                 on_bad_image: str, max_length: Optional[int]):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image: expected one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length: expected a positive int or None, got {max_length!r}")
        self.processor, self.image_processor = processor, image_processor
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.caption_prompt = caption_prompt
        self.on_bad_image, self.max_length = on_bad_image, max_length
        self.skipped_images: List[str] = []
        self.warn_skipped = True  # LMEyeTrainer turns it off and warns once per run itself
        self._blank_pixels: Optional[torch.Tensor] = None

    def image_path(self, image: str) -> Path:
        return self.image_folder / image if self.image_folder is not None else Path(image)

    def pixels(self, image: str) -> torch.Tensor:
        """The preprocessed image (C, H, W); raises ``OSError`` naming it when it cannot be read."""
        return self.image_processor(images=read_image(self.image_path(image)), return_tensors="pt")["pixel_values"][0]

    def blank_pixels(self) -> torch.Tensor:
        """Zeros shaped like a preprocessed image: the pixels of a text-only sample, which nothing reads."""
        if self._blank_pixels is None:
            from PIL import Image

            processed = self.image_processor(images=Image.new("RGB", (8, 8)), return_tensors="pt")["pixel_values"]
            self._blank_pixels = torch.zeros_like(processed[0])
        return self._blank_pixels

    def tokenize(self, conversation: Conversation, where: str = "record") -> TokenizedRow:
        """The conversation as one row (``LMEyeProcessor.row``: the processor's template), cut to ``max_length``.
        Raises ``ValueError`` naming ``where`` when no answer token is left to learn."""
        proc = self.processor
        has_image = conversation.image is not None
        prefix, image_start, body, labels = proc.row(conversation.turns, image=has_image)
        if self.max_length is not None:
            # The prefix is never cut. A decoder-only LLM reads prefix, slots and body as one sequence; an
            # encoder-decoder LLM reads the body alone in its decoder, the prefix and slots in its encoder.
            taken = 0 if proc.encoder_decoder else len(prefix) + (proc.num_requests if has_image else 0)
            room = max(1, self.max_length - taken)
            body, labels = body[:room], labels[:room]
            if all(label == IGNORE_INDEX for label in labels):
                raise ValueError(f"{where}: max_length={self.max_length} cuts every answer token (the prefix and "
                                 f"slots take {taken} of them); raise max_length or shorten the question")
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{where}: no answer token to train on (its answers are empty and the tokenizer has no "
                             "EOS token to end them)")
        return TokenizedRow(prefix, image_start, body, labels)

    def item(self, conversation: Conversation, where: str = "record") -> Optional[Dict[str, Any]]:
        """The dataset item of ``conversation``; None when its image is unreadable and the policy skips it."""
        if conversation.image is None:
            pixels = self.blank_pixels()
        else:
            try:
                pixels = self.pixels(conversation.image)
            except OSError as error:  # read_image raises OSError, naming the file, for every unreadable one
                path = self.image_path(conversation.image)
                if self.on_bad_image == "raise":
                    raise
                if not self.skipped_images and self.warn_skipped:
                    warnings.warn(f"skipping unreadable {error}; later ones are counted in "
                                  f"{type(self).__name__}.skipped_images", stacklevel=3)
                self.skipped_images.append(str(path))
                return None
        return {"row": self.tokenize(conversation, where), "pixel_values": pixels}

    def with_skipped(self, item: Dict[str, Any], before: int) -> Dict[str, Any]:
        """``item`` with the images skipped since ``skipped_images`` held ``before`` names, if any."""
        if len(self.skipped_images) > before:
            item[SKIPPED_IMAGES] = self.skipped_images[before:]
        return item


class LMEyeDataset(_RecordItems, Dataset):
    """Caption or conversation records with their images, tokenized and preprocessed per item.

    Args:
        records: a sequence of dicts (see ``load_records``); every record is
            parsed here, so a malformed one raises now, not hours into an epoch.
        processor: the ``LMEyeProcessor`` (tokenizer and slot layout).
        image_processor: the vision tower's image processor (e.g.
            ``AutoImageProcessor.from_pretrained(vision_name)``), called on a PIL image.
        image_folder: the directory record image paths are relative to.
        caption_prompt: the question of a caption record.
        on_bad_image: ``"skip"``: an image that is missing or cannot be decoded
            is skipped and the item is the next readable record (so batches keep
            their size); the first is warned about, all are counted in
            ``skipped_images`` (per process: each DataLoader worker counts its
            own), and the item names those skipped to reach it (its
            ``"skipped_images"``), which ``LMEyeTrainer`` sums over workers and
            ranks. ``"raise"``: raise ``OSError`` naming the file.
        max_length: cut a sample's suffix so that it holds at most this many
            tokens in all (later turns are lost first, the prefix never); None
            keeps everything. A sample left with no labelled token (a first
            question that fills ``max_length`` alone) is refused with a
            ``ValueError`` naming the record, never trained on with no loss.
            For an encoder-decoder processor it bounds the decoder's sequence
            (the answers and later turns); the encoder's input, the first
            question with the image and the slots, is never cut, as the
            decoder-only prefix is not.
    """

    def __init__(self, records, processor: LMEyeProcessor, image_processor, image_folder=None,
                 caption_prompt: str = "", on_bad_image: str = "skip",
                 max_length: Optional[int] = None):
        super().__init__(processor, image_processor, image_folder, caption_prompt, on_bad_image, max_length)
        entries = _source_records(records)
        self.places = [entry.where for entry in entries]
        self.conversations = [parse_record(entry.record, caption_prompt, where=entry.where) for entry in entries]
        if not self.conversations:
            raise ValueError("records: no record to train on")

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -len(self) <= index < len(self):
            # Also ends iteration: ``for item in dataset`` stops at the first IndexError.
            raise IndexError(f"index: expected an int in [-{len(self)}, {len(self)}), got {index}")
        index %= len(self)
        before = len(self.skipped_images)
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            item = self.item(self.conversations[position], where=self.places[position])
            if item is not None:
                return self.with_skipped(item, before)
        raise OSError("images: no record of the dataset has a readable image")


class LMEyeStream(_RecordItems, IterableDataset):
    """The items of ``LMEyeDataset`` from records read as they come: a streaming ``datasets.IterableDataset``
    (``load_dataset("json", data_files=..., streaming=True, split="train")``, and its ``map``), or any
    re-iterable of dicts. Nothing is read ahead, so a data set larger than memory trains.

    A record is parsed when it is reached (a malformed one raises then, naming its position in the
    stream), and a record whose image is unreadable is left out under ``on_bad_image="skip"``. The
    same arguments as ``LMEyeDataset`` otherwise.

    DataLoader workers share the stream out: a ``datasets.IterableDataset`` gives each worker its own
    shards (its files), any other iterable every ``num_workers``-th record to each. Across ranks the
    ``Trainer`` (through Accelerate) hands each rank its own batches; a plain ``torchrun`` loop splits
    a ``datasets`` stream with ``datasets.distributed.split_dataset_by_node``.
    """

    def __init__(self, records: Iterable[Dict[str, Any]], processor: LMEyeProcessor, image_processor,
                 image_folder=None, caption_prompt: str = "",
                 on_bad_image: str = "skip", max_length: Optional[int] = None):
        super().__init__(processor, image_processor, image_folder, caption_prompt, on_bad_image, max_length)
        if isinstance(records, (str, os.PathLike, Mapping)) or not isinstance(records, Iterable):
            raise TypeError(f"records: expected an iterable of record dicts (e.g. a streaming datasets."
                            f"IterableDataset), got {type(records).__name__}")
        self.records = records

    def _own_records(self):
        """The records of this DataLoader worker: a datasets stream shards itself by worker."""
        worker = get_worker_info()
        if worker is None or _is_datasets_stream(self.records):
            return enumerate(self.records)
        return itertools.islice(enumerate(self.records), worker.id, None, worker.num_workers)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        read = kept = 0
        before = len(self.skipped_images)
        for index, record in self._own_records():
            read += 1
            where = f"records[{index}]"
            item = self.item(parse_record(record, self.caption_prompt, where=where), where)
            if item is not None:
                kept += 1
                yield self.with_skipped(item, before)
                before = len(self.skipped_images)
        if read and not kept:  # a pass that trains on nothing must not end as if it had trained
            raise OSError(f"records: none of the {read} records read has a readable image "
                          f"({len(self.skipped_images)} skipped, the first {self.skipped_images[0]})")


def _is_datasets_stream(records) -> bool:
    try:
        from datasets import IterableDataset as DatasetsStream
    except ImportError:
        return False
    return isinstance(records, DatasetsStream)


class LMEyeCollator:
    """Batches ``LMEyeDataset`` items: ``processor.pad`` for the text, the images stacked as ``pixel_values``.

    An encoder-decoder processor gives the encoder-decoder layout, with ``decoder_input_ids``
    (``LMEyeProcessor.pad``). Picklable, so it runs in ``DataLoader`` workers.
    """

    def __init__(self, processor: LMEyeProcessor):
        if processor.encoder_decoder and processor.decoder_start_token_id is None:
            # Refused here rather than at the first batch, inside a DataLoader worker.
            raise ValueError("processor: an encoder-decoder processor needs decoder_start_token_id to build the "
                             "decoder's input; pass LMEyeProcessor(..., encoder_decoder=True, "
                             "decoder_start_token_id=llm.config.decoder_start_token_id)")
        self.processor = processor

    def __call__(self, items: Sequence[Dict[str, Any]]) -> LMEyeBatch:
        if not items:
            raise ValueError("items: expected at least one dataset item")
        batch = self.processor.pad([TokenizedRow(*item["row"]) for item in items])
        batch["pixel_values"] = torch.stack([torch.as_tensor(item["pixel_values"]) for item in items])
        return batch
