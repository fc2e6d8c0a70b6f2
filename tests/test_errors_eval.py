"""Evaluation records on the user's path: a bad field is refused naming the file, the record and the
field (never scored as something else); each case asserts the exception type and the place."""

import json
import re

import pytest

from lmeye_fast.eval import read_examples


def _read(tmp_path, records, suffix=".jsonl"):
    path = tmp_path / f"questions{suffix}"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else json.dumps(records))
    return path


GOOD = {"question_id": 1, "image": "0.png", "question": "which colour ?", "options": ["red", "blue"], "answer": 1}


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"question": \n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2, column") + ".*not valid JSON"):
        read_examples(path)


def test_options_as_a_mapping_are_refused(tmp_path):
    path = _read(tmp_path, [GOOD, {**GOOD, "options": {"A": "red", "B": "blue"}}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: 'options' must be a list") + ".*a mapping"):
        read_examples(path)


def test_repeated_options_are_refused_by_name(tmp_path):
    path = _read(tmp_path, [{**GOOD, "options": ["red", "blue", "red"]}], suffix=".json")
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 0: 'options' repeats 'red'")):
        read_examples(path)


def test_an_option_that_is_not_text_is_refused(tmp_path):
    record = {key: value for key, value in GOOD.items() if key != "options"}
    path = _read(tmp_path, [{**record, "choices": ["red", None]}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1: choices[1] must be a string, got NoneType")):
        read_examples(path)


def test_a_reference_answer_that_is_not_text_is_refused(tmp_path):
    record = {"question_id": 2, "image": "0.png", "question": "how many ?",
              "answers": [{"answer": "2"}, {"answer": None}]}
    path = _read(tmp_path, [record])
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1: answers[1] must be a string")):
        read_examples(path)
    path = _read(tmp_path, [{**record, "answers": {"answer": "2"}}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1: 'answers' must be a list")):
        read_examples(path)


def test_a_record_that_is_not_an_object_is_refused(tmp_path):
    path = _read(tmp_path, [GOOD, ["not", "a", "record"]])
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: expected a dict, got list")):
        read_examples(path)


def test_a_question_that_is_not_text_is_refused(tmp_path):
    record = {"id": "q", "image": "0.png", "conversations": [{"from": "human", "value": None},
                                                             {"from": "gpt", "value": "red"}]}
    path = _read(tmp_path, [record])
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1: conversations[0].value must be a string")):
        read_examples(path)
    path = _read(tmp_path, [{"id": "q", "image": "0.png", "question": ["what"], "answer": "red"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 1: 'question' must be a string, got list")):
        read_examples(path)
