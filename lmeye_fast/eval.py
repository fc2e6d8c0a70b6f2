"""Evaluate an LMEye adapter as the benchmarks do: open-ended VQA and multiple choice.

    python -m lmeye_fast.eval --adapter ADAPTER_DIR --data questions.jsonl --image-folder images/ \\
        --output results.json

The adapter directory (written by the training CLI, or by ``LMEyeModel.save_pretrained``
and ``LMEyeProcessor.save_pretrained``) records the LLM, the vision model, the CLIP
interaction and the processor with its prompt template (``lmeye_fast.models.sources``);
``--llm``, ``--vision``, ``--tokenizer``, ``--image-processor`` read them from elsewhere,
and ``--response-prefix`` / ``--prompt-template`` must agree with the saved processor (one
that contradicts it is refused). Every prompt is built by the processor's ``row``, the
function training builds its rows with, and the results JSON holds each one as the model
read it (``prompt``, decoded).

Data is LLaVA-style JSON (a list), JSONL or CSV, one record per question (read by
``lmeye_fast.data.parse_record``, as training reads its records):

- ``image``: a path, relative to ``--image-folder``;
- the question: ``question`` or ``text``, or the last human turn of
  ``conversations`` (LLaVA's training format), the turns before it its history;
  ``<image>`` in the first question is the image's tag (the template places the image);
- open-ended: ``answers``, the annotators' answers (VQAv2 gives ten); else the
  single ``answer``, or the last ``gpt`` turn of ``conversations`` (when it ends with one);
- multiple choice: ``options`` (or ``choices``), a list of answer texts, and
  ``answer``: the right option's index, its letter (``"B"``) or its text.

Open-ended questions are answered by batched greedy generation and scored
with VQAv2's accuracy, as the released VQA evaluation computes it
(``lmeye_fast.vqa``), and exact match after the same normalisation.
Multiple-choice questions are answered by likelihood: every option's answer
text is scored on one shared prefix, or for an encoder-decoder LLM on one
encoding of the question (``lmeye_fast.models.scoring.score_options``), and
the argmax of the summed and of the per-token log-likelihood are the two
predictions. ``--circular`` is MMBench's circular evaluation: the question is
asked once per rotation of its options and counts as right only if every
rotation is answered right.

The command line checks the whole data file (every record, every image path,
the task and the template), the adapter folder and ``--output`` before any
model loads; with ``--output`` the answers are kept as they come
(``ResultsFile``), and ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .atomic import write_atomic
from .data import parse_record, read_record_file
from .models import LMEyeBaseModel, LMEyeProcessor, Turn
from .models.adapter_files import check_adapter
from .models.scoring import score_options
from .models.sources import load_pretrained
from .models.vision import read_image
from .vqa import exact_match, normalize_answer, vqa_accuracy

__all__ = ["normalize_answer", "vqa_accuracy", "exact_match", "Example", "read_examples", "EvalModel",
           "load_eval_model", "add_model_arguments", "rotations", "evaluate_open", "evaluate_choice", "resolve_task",
           "check_examples", "ResultsFile", "format_table", "main"]

# ---------------------------------------------------------------- data

LETTERS = string.ascii_uppercase


@dataclass
class Example:
    """One evaluation question. ``image`` is a path, a PIL image, a pixel tensor (C, H, W) or a
    dict of precomputed features (see ``EvalModel.image_inputs``); ``answer`` is the right
    option's index for multiple choice; ``history``: the conversation's earlier turns."""

    id: str
    question: str
    image: object = None
    answers: List[str] = field(default_factory=list)
    options: List[str] = field(default_factory=list)
    answer: Optional[int] = None
    history: Tuple[Turn, ...] = ()

    @property
    def is_choice(self) -> bool:
        return bool(self.options)

    def prompt(self, question: str) -> List[Turn]:
        """The conversation to answer: the history, then ``question`` (this one's, as formatted)."""
        return list(self.history) + [Turn(question)]


def _choice_index(answer, options: List[str], where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str):
        if answer in options:
            return options.index(answer)
        letter = answer.strip().rstrip(".").upper()
        if len(letter) == 1 and letter in LETTERS[:len(options)]:
            return LETTERS.index(letter)
    raise ValueError(f"{where}: 'answer' {answer!r} is neither an option's index, letter nor text "
                     f"(options: {options})")


def _options(record: dict, where: str) -> List[str]:
    """A multiple-choice record's options: a list of distinct texts (``options`` or ``choices``), or []."""
    key = "options" if "options" in record else "choices"
    options = record.get(key)
    if options is None:
        return []
    if not isinstance(options, list):
        raise ValueError(f"{where}: {key!r} must be a list of option texts in order, got {type(options).__name__}"
                         + (" (a mapping: give its values as a list, in order)" if isinstance(options, dict) else ""))
    for index, option in enumerate(options):
        if not isinstance(option, str):
            raise ValueError(f"{where}: {key}[{index}] must be a string, got {type(option).__name__} ({option!r})")
    repeated = sorted({option for option in options if options.count(option) > 1})
    if repeated:
        raise ValueError(f"{where}: {key!r} repeats {repeated[0]!r}, so the right option is ambiguous")
    return options


def _reference_answers(answers, where: str) -> List[str]:
    """An open-ended record's reference answers: texts, or VQAv2's annotation dicts ``{"answer": text}``."""
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        raise ValueError(f"{where}: 'answers' must be a list of answer texts, got {type(answers).__name__}")
    texts = []
    for index, answer in enumerate(answers):
        text = answer.get("answer") if isinstance(answer, dict) else answer
        if not isinstance(text, str):
            raise ValueError(f"{where}: answers[{index}] must be a string or {{'answer': string}}, got {answer!r}")
        texts.append(text)
    return texts


def read_examples(path, image_folder=None) -> List[Example]:
    """Read LLaVA-style evaluation records (JSON list, JSONL or CSV; see the module's docstring)."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    examples = []
    for index, entry in enumerate(read_record_file(path)):
        record, where = entry.record, entry.where
        conversation = parse_record(record, where=where, open_question=True)
        *history, last = conversation.turns
        options = _options(record, where)
        if options:
            if "answer" not in record:
                raise ValueError(f"{where}: a multiple-choice record needs 'answer'")
            answers, answer = [], _choice_index(record["answer"], options, where)
        else:
            answers = record.get("answers") or [a for a in (record.get("answer"), last.answer) if a is not None][:1]
            answers = _reference_answers(answers, where)
            if not answers:
                raise ValueError(f"{where}: an open-ended record needs 'answers', 'answer' or a last gpt turn")
            answer = None
        examples.append(Example(id=str(record.get("question_id", record.get("id", index))), question=last.question,
                                image=None if conversation.image is None else folder / conversation.image,
                                answers=answers, options=options, answer=answer, history=tuple(history)))
    return examples


def rotations(example: Example) -> List[Example]:
    """MMBench's circular evaluation: the question once per rotation of its options, the right
    answer's index moving with them (the first rotation is the question as given)."""
    count = len(example.options)
    if count == 0:
        raise ValueError(f"example {example.id}: has no options to rotate")
    return [dataclasses.replace(example, options=example.options[shift:] + example.options[:shift],
                                answer=(example.answer - shift) % count) for shift in range(count)]


# ---------------------------------------------------------------- the model

@dataclass
class EvalModel:
    """A model, its processor and how images become pixel values (``image_processor``: a Hugging
    Face image processor, or None when the images are pixel tensors already)."""

    model: LMEyeBaseModel
    processor: LMEyeProcessor
    image_processor: Optional[Callable] = None
    schedule: Optional[str] = None

    def image_inputs(self, images: Sequence) -> Dict[str, torch.Tensor]:
        """The model's image inputs: precomputed features for images given as dicts of them (one
        image's ``model.encode_images`` output, e.g. ``image_features`` and ``static_features``),
        else ``pixel_values``."""
        if images and all(isinstance(image, dict) for image in images):
            device = self.model.special_embed.device
            return {name: torch.stack([image[name] for image in images]).to(device) for name in images[0]}
        return {"pixel_values": self.pixels(images)}

    def pixels(self, images: Sequence) -> torch.Tensor:
        """Pixel values (B, C, H, W) for paths, PIL images or (C, H, W) tensors, on the vision
        tower's device and in its dtype."""
        if any(image is None for image in images):
            raise ValueError("images: every question needs an image")
        if all(isinstance(image, torch.Tensor) for image in images):
            pixels = torch.stack(list(images))
        elif self.image_processor is None:
            raise ValueError("images: image files or PIL images need an image_processor to become pixel values")
        else:
            pixels = self.image_processor(images=[read_image(image) for image in images],
                                          return_tensors="pt")["pixel_values"]
        tower = next(self.model.vision.parameters(), None) if self.model.vision is not None else None
        return pixels if tower is None else pixels.to(tower.device, tower.dtype)

    def seen_prompts(self, prompts: Sequence[Sequence[Turn]]) -> List[str]:
        """Each prompt as the model reads it: its tokens, LMEye's and the BOS included, decoded."""
        batch = self.processor(prompts)
        return [self.processor.prompt_text(ids[mask.bool()].tolist())
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Union[str, Sequence[Turn]]], images: Sequence, max_new_tokens: int,
                 **generate_kwargs) -> List[str]:
        """Answers to ``prompts`` (questions, or conversations ending in one): greedy unless ``generate_kwargs``
        (for ``model.generate``) ask otherwise."""
        batch = self.processor(prompts).to(self.model.special_embed.device)
        generate_kwargs.setdefault("do_sample", False)
        tokens = self.model.generate(**batch, **self.image_inputs(images), schedule=self.schedule,
                                     max_new_tokens=max_new_tokens, **generate_kwargs)
        return [text.strip() for text in self.processor.decode(tokens)]

    def score(self, prompts: Sequence[Union[str, Sequence[Turn]]], images: Sequence,
              options: Sequence[Sequence[str]]):
        return score_options(self.model, self.processor, prompts, options, **self.image_inputs(images),
                             schedule=self.schedule)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_eval_model(adapter, llm=None, vision=None, tokenizer=None, image_processor=None,
                    response_prefix: Optional[str] = None, device: Union[str, torch.device] = "cpu",
                    dtype: str = "float32", schedule: Optional[str] = None, template=None,
                    llm_revision: Optional[str] = None, vision_revision: Optional[str] = None) -> EvalModel:
    """Load an adapter directory with the models and processor it records (``models.sources.load_pretrained``).

    ``llm``, ``vision`` (names or directories, with revisions), ``tokenizer`` and ``image_processor``
    read those from elsewhere; ``response_prefix`` and ``template`` (a ``PromptTemplate`` or its name)
    must agree with the saved processor, and are needed only for an adapter saved without one.
    ``schedule``: the adapter's by default.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    loaded = load_pretrained(adapter, llm=llm, vision=vision, llm_revision=llm_revision,
                             vision_revision=vision_revision, tokenizer=tokenizer, image_processor=image_processor,
                             dtype=DTYPES[dtype], response_prefix=response_prefix, template=template)
    return EvalModel(loaded.model.to(device).eval(), loaded.processor, loaded.image_processor, schedule)


# ---------------------------------------------------------------- evaluation

def _batches(items: Sequence, batch_size: int, description: str, progress: bool):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    with tqdm(total=len(items), desc=description, disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            yield chunk
            bar.update(len(chunk))


def evaluate_open(runner: EvalModel, examples: Sequence[Example], batch_size: int = 8, max_new_tokens: int = 16,
                  question_format: str = "{question}", progress: bool = True,
                  answered: Optional[Dict[int, dict]] = None,
                  on_answers: Optional[Callable[[List[Tuple[int, dict]]], None]] = None):
    """Answer open-ended questions by greedy generation: (records, metrics). ``question_format`` formats
    the question from ``{question}``; each record holds the ``prompt`` the model read.

    ``answered`` maps the indices of questions answered already (a resumed run) to their records;
    ``on_answers`` gets every batch's new ``(index, record)`` pairs as soon as they are scored."""
    answered = dict(answered or {})
    asked = [(index, example) for index, example in enumerate(examples) if index not in answered]
    for chunk in _batches(asked, batch_size, "vqa", progress):
        prompts = [e.prompt(question_format.format(question=e.question)) for _, e in chunk]
        predictions = runner.generate(prompts, [e.image for _, e in chunk], max_new_tokens)
        new = [(index, {"id": example.id, "question": example.question, "prompt": seen, "prediction": prediction,
                        "answers": example.answers, "vqa_accuracy": vqa_accuracy(prediction, example.answers),
                        "exact_match": exact_match(prediction, example.answers)})
               for (index, example), prediction, seen in zip(chunk, predictions, runner.seen_prompts(prompts))]
        answered.update(new)
        if on_answers is not None:
            on_answers(new)
    records = [answered[index] for index in range(len(examples))]
    return records, _means(records, ("vqa_accuracy", "exact_match"))


def _options_text(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


def evaluate_choice(runner: EvalModel, examples: Sequence[Example], batch_size: int = 8,
                    question_format: str = "{question}\n{options}", circular: bool = False, progress: bool = True,
                    answered: Optional[Dict[int, dict]] = None,
                    on_answers: Optional[Callable[[List[Tuple[int, dict]]], None]] = None):
    """Answer multiple-choice questions by the likelihood of each option's text: (records, metrics).

    ``question_format`` formats the question from ``{question}`` and ``{options}`` (one ``A. text``
    line per option, in the order of the rotation asked); each record holds the ``prompt`` the model
    read (of each rotation, with ``circular``). With ``circular`` every rotation of the
    options is asked, and ``circular_accuracy`` counts a question only if all are right.
    ``answered`` and ``on_answers`` are those of ``evaluate_open``: a question is reported once all
    its rotations are scored.
    """
    for example in examples:
        if not example.is_choice or example.answer is None:
            raise ValueError(f"examples: {example.id} is not a multiple-choice question (options and answer)")
    answered = dict(answered or {})
    asked = [(index, variant) for index, example in enumerate(examples) if index not in answered
             for variant in (rotations(example) if circular else [example])]
    results: Dict[int, List[dict]] = {index: [] for index, _ in asked}
    for chunk in _batches(asked, batch_size, "choice", progress):
        variants = [variant for _, variant in chunk]
        prompts = [v.prompt(question_format.format(question=v.question, options=_options_text(v.options)))
                   for v in variants]
        scores = runner.score(prompts, [v.image for v in variants], [v.options for v in variants])
        for (index, variant), summed, normalised, seen in zip(chunk, scores.summed, scores.normalised,
                                                              runner.seen_prompts(prompts)):
            results[index].append({"prompt": seen, "options": variant.options, "answer": variant.answer,
                                   "prediction": int(summed.argmax()), "prediction_norm": int(normalised.argmax()),
                                   "log_likelihood": summed.tolist()})
        done = sorted({index for index, _ in chunk if len(results[index]) == (len(examples[index].options)
                                                                                if circular else 1)})
        new = [(index, _choice_record(examples[index], results.pop(index), circular)) for index in done]
        answered.update(new)
        if on_answers is not None:
            on_answers(new)
    records = [answered[index] for index in range(len(examples))]
    keys = ("accuracy", "accuracy_norm") + (("circular_accuracy", "circular_accuracy_norm") if circular else ())
    return records, _means(records, keys)


def _choice_record(example: Example, asks: List[dict], circular: bool) -> dict:
    first = asks[0]
    record = {"id": example.id, "question": example.question, "prompt": first["prompt"],
              "options": example.options, "answer": example.answer, "prediction": first["prediction"],
              "prediction_norm": first["prediction_norm"], "log_likelihood": first["log_likelihood"],
              "accuracy": float(first["prediction"] == example.answer),
              "accuracy_norm": float(first["prediction_norm"] == example.answer)}
    if circular:
        record["rotations"] = asks
        record["circular_accuracy"] = float(all(a["prediction"] == a["answer"] for a in asks))
        record["circular_accuracy_norm"] = float(all(a["prediction_norm"] == a["answer"] for a in asks))
    return record


def _means(records: Sequence[dict], keys: Sequence[str]) -> Dict[str, float]:
    return {key: sum(r[key] for r in records) / max(1, len(records)) for key in keys}


def format_table(metrics: Dict[str, float], count: int) -> str:
    """A Markdown table of the metrics (in percent) over ``count`` questions."""
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {name} | {100 * value:.1f}% |" for name, value in metrics.items()]
    lines.append(f"| questions | {count} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which adapter to load and where its models come from (``load_eval_model``'s
    arguments); the evaluation and demo command lines share them."""
    parser.add_argument("--adapter", required=True, help="directory written by the training CLI (or by "
                                                         "LMEyeModel and LMEyeProcessor.save_pretrained)")
    parser.add_argument("--llm", help="read the LLM from here (name or directory); default: the adapter's record")
    parser.add_argument("--llm-revision", help="the --llm hub repository's branch, tag or commit")
    parser.add_argument("--vision", help="read the vision model from here; default: the adapter's record")
    parser.add_argument("--vision-revision", help="the --vision hub repository's branch, tag or commit")
    parser.add_argument("--tokenizer", help="default: the adapter's")
    parser.add_argument("--image-processor", help="default: the vision model's")
    parser.add_argument("--response-prefix", help="text between the <img-d> slots and the answer; default: the "
                                                  "adapter's (given, it must agree)")
    parser.add_argument("--prompt-template", help="a prompt template's name; default: the adapter's (given, it "
                                                  "must agree)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmeye_fast.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="LLaVA-style JSON or JSONL questions")
    parser.add_argument("--image-folder", help="where the records' image paths start (default: the data's folder)")
    parser.add_argument("--task", choices=("auto", "vqa", "choice"), default="auto",
                        help="auto: multiple choice when the records have options")
    parser.add_argument("--circular", action="store_true", help="MMBench's circular evaluation (multiple choice)")
    parser.add_argument("--question-format", help="how the question is asked; default '{question}' (vqa), "
                                                  "'{question}\\n{options}' (choice)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=_positive_int, default=16)
    parser.add_argument("--limit", type=_positive_int, help="evaluate the first LIMIT questions only")
    parser.add_argument("--schedule", choices=("single_pass", "two_pass", "static"),
                        help="default: the adapter's; an encoder-decoder LLM has two_pass and static only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--output", help="results JSON (metrics, settings and every answer); its folder is created. "
                                         "Answers are kept as they come in OUTPUT.answers.jsonl until the run ends")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run of --output (same data and settings)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def resolve_task(examples: Sequence[Example], task: str = "auto", circular: bool = False) -> str:
    """The task of ``examples`` ("vqa" or "choice"), every example checked to be of it."""
    if not examples:
        raise ValueError("examples: nothing to evaluate")
    if task not in ("auto", "vqa", "choice"):
        raise ValueError(f"task: expected 'auto', 'vqa' or 'choice', got {task!r}")
    given = task != "auto"
    if not given:
        task = "choice" if examples[0].is_choice else "vqa"
    for example in examples:
        if example.is_choice != (task == "choice"):
            kind = "multiple-choice" if example.is_choice else "open-ended"
            raise ValueError(f"examples: question {example.id} is {kind}, but the task is {task!r} "
                             f"(from {'--task' if given else 'the first question'}); one task per data file")
    if circular and task != "choice":
        raise ValueError("circular: applies to multiple-choice questions only")
    return task


def check_examples(examples: Sequence[Example], task: str, question_format: Optional[str]) -> None:
    """What the evaluation will need, checked for every question before any model loads: an image
    that exists (a path) and a question format whose placeholders are the task's."""
    for example in examples:
        if example.image is None:
            raise ValueError(f"examples: question {example.id} has no 'image' (every question needs one)")
        if isinstance(example.image, (str, Path)) and not Path(example.image).is_file():
            raise FileNotFoundError(f"examples: question {example.id}: no image file {example.image}")
    if question_format is not None:
        try:
            question_format.format(question="", options="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"question_format: {question_format!r} is not a format of {{question}}"
                             f"{' and {options}' if task == 'choice' else ''} ({error!r})") from None


def run(runner: EvalModel, examples: Sequence[Example], task: str = "auto", circular: bool = False,
        question_format: Optional[str] = None, batch_size: int = 8, max_new_tokens: int = 16,
        progress: bool = True, answered: Optional[Dict[int, dict]] = None,
        on_answers: Optional[Callable[[List[Tuple[int, dict]]], None]] = None):
    """Evaluate ``examples`` with ``runner``: ``{"task", "circular", "num_examples", "metrics",
    "prompt_template", "records"}`` (``answered`` and ``on_answers`` as in ``evaluate_open``)."""
    task = resolve_task(examples, task, circular)
    if task == "choice":
        records, metrics = evaluate_choice(runner, examples, batch_size,
                                           question_format or "{question}\n{options}", circular, progress,
                                           answered, on_answers)
    else:
        records, metrics = evaluate_open(runner, examples, batch_size, max_new_tokens,
                                         question_format or "{question}", progress, answered, on_answers)
    return {"task": task, "circular": circular, "num_examples": len(examples), "metrics": metrics,
            "prompt_template": runner.processor.template.to_dict(), "records": records}


class ResultsFile:
    """Where a command-line run keeps its answers: ``OUTPUT.answers.jsonl`` as they come, then ``OUTPUT``.

    The answers file starts with a line of the run's settings; every batch then appends one line
    per answered question (``{"index", "record"}``), flushed and ``fsync``-ed. A kill can only cut
    the last line short, and a line without its newline is not read back, so what was answered
    before is kept. At the end ``OUTPUT`` is written whole (``lmeye_fast.atomic``) and the answers
    file removed. ``--resume`` reads the answers back, after checking that the settings are the same.
    """

    # Settings that change the answers: a resumed run must have the same.
    SAME_ON_RESUME = ("adapter", "llm", "vision", "tokenizer", "image_processor", "response_prefix", "data",
                      "image_folder", "task", "circular", "question_format", "prompt_template", "max_new_tokens", "limit",
                      "schedule", "dtype", "llm_revision", "vision_revision")

    def __init__(self, output: Union[str, Path]):
        self.output = Path(output)
        self.answers = self.output.with_name(self.output.name + ".answers.jsonl")

    def check(self, resume: bool) -> None:
        """Refuse an output that cannot be written, before any model loads; create its folder."""
        if self.output.is_dir():
            raise IsADirectoryError(f"--output: {self.output} is a folder, expected a results file path")
        folder = self.output.parent
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--output: {folder} is a file, expected the folder of {self.output.name}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"--output: cannot create the folder {folder} ({error.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"--output: the folder {folder} is not writable")
        if self.answers.exists() and not resume:
            raise FileExistsError(f"--output: {self.answers} holds the answers of an interrupted run; pass "
                                  "--resume to continue it, or remove it to start again")
        if resume and not self.answers.exists():
            raise FileNotFoundError(f"--resume: no interrupted run to continue ({self.answers} does not exist)")

    def resume(self, settings: dict, examples: Sequence[Example]) -> Dict[int, dict]:
        """The answers of the interrupted run, checked against this run's ``settings`` and questions."""
        lines = self.answers.read_text(encoding="utf-8").split("\n")[:-1]  # the last is cut short or empty
        if not lines:
            return {}
        saved = json.loads(lines[0])["settings"]
        for key in self.SAME_ON_RESUME:
            if saved.get(key) != settings.get(key):
                raise ValueError(f"--resume: --{key.replace('_', '-')} is {settings.get(key)!r}, but the "
                                 f"interrupted run in {self.answers} used {saved.get(key)!r}")
        answered = {}
        for number, line in enumerate(lines[1:], start=2):
            entry = json.loads(line)
            index, record = entry["index"], entry["record"]
            if not 0 <= index < len(examples) or record["id"] != examples[index].id:
                raise ValueError(f"--resume: {self.answers} line {number}: question {record['id']} is not question "
                                 f"{index} of --data any more")
            answered[index] = record
        return answered

    def start(self, settings: dict) -> None:
        if not self.answers.exists():
            self._append([{"settings": settings}])

    def write(self, answers: List[Tuple[int, dict]]) -> None:
        self._append([{"index": index, "record": record} for index, record in answers])

    def _append(self, entries: List[dict]) -> None:
        with open(self.answers, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(entry) + "\n" for entry in entries))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, results: dict) -> None:
        write_atomic(self.output, json.dumps(results, indent=2) + "\n")
        self.answers.unlink()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the command line; every value, the data file and the adapter folder are checked before any
    model loads."""
    args = _parser().parse_args(argv)
    if args.resume and not args.output:
        raise ValueError("--resume: continues the run of --output; pass --output")
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "no_progress", "resume")}
    examples = read_examples(args.data, args.image_folder)[:args.limit]
    task = resolve_task(examples, args.task, args.circular)
    check_examples(examples, task, args.question_format)
    check_adapter(args.adapter, "--adapter")
    results_file = answered = None
    if args.output:
        results_file = ResultsFile(args.output)
        results_file.check(args.resume)
        answered = results_file.resume(settings, examples) if args.resume else {}
    runner = load_eval_model(args.adapter, args.llm, args.vision, args.tokenizer, args.image_processor,
                             args.response_prefix, args.device, args.dtype, args.schedule, args.prompt_template,
                             args.llm_revision, args.vision_revision)
    if results_file is not None:
        results_file.start(settings)
    results = run(runner, examples, task, args.circular, args.question_format, args.batch_size,
                  args.max_new_tokens, not args.no_progress, answered,
                  None if results_file is None else results_file.write)
    results["settings"] = settings
    if results_file is not None:
        results_file.finish(results)
    print(format_table(results["metrics"], results["num_examples"]))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
