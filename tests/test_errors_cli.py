"""Both command lines check every value before any model loads (the loaders are replaced by a failure):
each case asserts the exception type and that the message names the flag or key and the place."""

import json
import re

import pytest
import yaml
from crash_worker import build_model
from training_helpers import save_tiny_models, write_llava

from lmeye_fast import eval as evaluation
from lmeye_fast.train import cli
from lmeye_fast.train.checkpoints import COMPLETE_MARK


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    llm, vision = save_tiny_models(root / "models")
    data = write_llava(root / "data", count=4)
    base = dict(llm=str(llm), vision=str(vision), data=str(data), image_folder=str(root / "data" / "images"),
                output_dir=str(root / "out"), num_requests=2, interaction_dim=16, num_heads=2, num_workers=0,
                progress=False)
    adapter = root / "adapter"
    build_model().save_pretrained(adapter)  # num_requests=2, interaction_dim=16, num_heads=2
    return root, base, adapter


def _train(root, values):
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return cli.main(["--config", str(path)])


def _no_models(monkeypatch):
    monkeypatch.setattr(cli, "_build", lambda config: pytest.fail("a model was loaded"))
    monkeypatch.setattr(evaluation, "load_eval_model", lambda *a, **k: pytest.fail("a model was loaded"))


def test_train_numbers_must_be_finite(train_setup, monkeypatch):
    root, base, _ = train_setup
    _no_models(monkeypatch)
    for key, value in (("learning_rate", float("inf")), ("learning_rate", float("nan")), ("epochs", float("inf")),
                       ("weight_decay", float("nan")), ("max_grad_norm", float("inf"))):
        with pytest.raises(ValueError, match=rf"^{key}: expected a finite number"):
            _train(root, {**base, key: value})
    with pytest.raises(ValueError, match=r"^learning_rate: expected a finite number, got inf"):
        cli.main([f"--{k}={v}" for k, v in base.items()] + ["--learning_rate", "1e999"])


def test_train_output_dir_must_be_a_writable_folder(train_setup, monkeypatch):
    root, base, _ = train_setup
    _no_models(monkeypatch)
    file = root / "a-file"
    file.write_text("")
    with pytest.raises(ValueError, match=f"^output_dir: {re.escape(str(file))} is a file"):
        _train(root, {**base, "output_dir": str(file)})
    with pytest.raises(ValueError, match=f"^output_dir: cannot write in {re.escape(str(file))}"):
        _train(root, {**base, "output_dir": str(file / "out")})


def test_train_fsdp_needs_several_processes_and_no_deepspeed(train_setup, monkeypatch):
    root, base, _ = train_setup
    _no_models(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"^fsdp: shards the LLM across the processes of torchrun, and this run has 1"):
        _train(root, {**base, "fsdp": True})
    deepspeed = root / "ds.json"
    deepspeed.write_text("{}")
    with pytest.raises(ValueError, match=r"^fsdp: .* cannot run under deepspeed="):
        _train(root, {**base, "fsdp": True, "deepspeed": str(deepspeed)})
    with pytest.raises(ValueError, match=r"^fsdp: expected bool, got 'yes'"):
        _train(root, {**base, "fsdp": "yes"})


def test_train_adapter_folder_must_hold_an_adapter(train_setup, monkeypatch):
    root, base, _ = train_setup
    _no_models(monkeypatch)
    empty = root / "empty-adapter"
    empty.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match=f"^adapter: {re.escape(str(empty))} holds no lmeye_adapter"):
        _train(root, {**base, "adapter": str(empty)})


def test_train_flags_that_contradict_the_adapter_are_refused_naming_both(train_setup, monkeypatch):
    root, base, adapter = train_setup
    _no_models(monkeypatch)
    for key, value, saved in (("num_requests", 3, 2), ("interaction_dim", 32, 16), ("num_heads", 4, 2)):
        with pytest.raises(ValueError, match=rf"^{key}: {value} contradicts the adapter .*saved with {key}={saved}"):
            _train(root, {**base, "adapter": str(adapter), key: value})
    built = {}

    class Built(Exception):
        pass

    def build(config):
        built["config"] = config
        raise Built

    monkeypatch.setattr(cli, "_build", build)
    values = {k: v for k, v in base.items() if k not in ("num_requests", "interaction_dim", "num_heads")}
    with pytest.raises(Built):
        _train(root, {**values, "adapter": str(adapter)})
    # flags left at their defaults take the adapter's values
    assert (built["config"].num_requests, built["config"].interaction_dim, built["config"].num_heads) == (2, 16, 2)


def test_train_resume_needs_a_complete_checkpoint(train_setup, monkeypatch, tmp_path):
    root, base, adapter = train_setup
    _no_models(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"^resume: no complete checkpoint-N in {re.escape(str(out))}"):
        _train(root, {**base, "output_dir": str(out), "resume": True})
    partial = out / "checkpoint-4"
    partial.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^resume: no complete checkpoint-N .*incomplete.*checkpoint-4"):
        _train(root, {**base, "output_dir": str(out), "resume": True})
    with pytest.raises(ValueError, match=f"^resume: {re.escape(str(partial))} is not a complete checkpoint"):
        _train(root, {**base, "output_dir": str(out), "resume": str(partial)})
    build_model().save_pretrained(partial)
    (partial / COMPLETE_MARK).write_text(json.dumps({"global_step": 4}))
    with pytest.raises(ValueError, match=r"^num_requests: 3 contradicts the resume .*checkpoint-4, saved with "
                                         r"num_requests=2"):
        _train(root, {**base, "output_dir": str(out), "resume": True, "num_requests": 3})


# ---------------------------------------------------------------- evaluation command line

@pytest.fixture(scope="module")
def eval_setup(train_setup):
    root, base, adapter = train_setup
    images = root / "data" / "images"
    records = [{"question_id": i, "image": f"{i}.png", "question": "what colour is it ?", "answers": ["red"] * 10}
               for i in range(3)]
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = ["--adapter", str(adapter), "--llm", base["llm"], "--vision", base["vision"], "--data", str(data),
             "--image-folder", str(images), "--no-progress"]
    return root, flags, records


def _write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_eval_checks_every_record_before_the_model_loads(eval_setup, monkeypatch, tmp_path):
    root, flags, records = eval_setup
    _no_models(monkeypatch)
    data = flags.index("--data") + 1
    missing = [*records, {**records[0], "question_id": 9, "image": "nowhere.png"}]
    flags[data] = _write_records(tmp_path / "missing.jsonl", missing)
    with pytest.raises(FileNotFoundError, match=r"^examples: question 9: no image file .*nowhere\.png"):
        evaluation.main(flags)
    flags[data] = _write_records(tmp_path / "no-image.jsonl", [*records, {"id": "q7", "question": "what ?",
                                                                       "answer": "red"}])
    with pytest.raises(ValueError, match=r"^examples: question q7 has no 'image'"):
        evaluation.main(flags)
    mixed = [*records, {"id": "c1", "image": "0.png", "question": "which ?", "options": ["red", "blue"],
                        "answer": 0}]
    flags[data] = _write_records(tmp_path / "mixed.jsonl", mixed)
    with pytest.raises(ValueError, match=r"^examples: question c1 is multiple-choice, but the task is 'vqa'"):
        evaluation.main(flags)
    flags[data] = _write_records(tmp_path / "good.jsonl", records)
    with pytest.raises(ValueError, match=r"^question_format: '\{question\} \{answer\}' is not a format"):
        evaluation.main(flags + ["--question-format", "{question} {answer}"])
    with pytest.raises(ValueError, match="^circular: applies to multiple-choice questions only"):
        evaluation.main(flags + ["--circular"])


def test_eval_numbers_are_checked_by_the_parser(eval_setup, monkeypatch, capsys):
    _, flags, _ = eval_setup
    _no_models(monkeypatch)
    for flag, value in (("--batch-size", "0"), ("--max-new-tokens", "-1"), ("--limit", "x")):
        with pytest.raises(SystemExit):
            evaluation.main(flags + [flag, value])
        assert f"argument {flag}: expected a positive int" in capsys.readouterr().err


def test_eval_adapter_and_output_are_checked_before_the_model_loads(eval_setup, monkeypatch, tmp_path):
    root, flags, _ = eval_setup
    _no_models(monkeypatch)
    adapter = flags.index("--adapter") + 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"^--adapter: {re.escape(str(empty))} holds no lmeye_adapter"):
        evaluation.main(flags[:adapter] + [str(empty)] + flags[adapter + 1:])
    with pytest.raises(IsADirectoryError, match=f"^--output: {re.escape(str(tmp_path))} is a folder"):
        evaluation.main(flags + ["--output", str(tmp_path)])
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(NotADirectoryError, match=f"^--output: {re.escape(str(file))} is a file"):
        evaluation.main(flags + ["--output", str(file / "results.json")])
    with pytest.raises(FileNotFoundError, match=r"^--resume: no interrupted run to continue"):
        evaluation.main(flags + ["--output", str(tmp_path / "new" / "results.json"), "--resume"])
    assert (tmp_path / "new").is_dir()  # the output's folder is created before the model loads
    (tmp_path / "new" / "results.json.answers.jsonl").write_text("")
    with pytest.raises(FileExistsError, match=r"^--output: .*results\.json\.answers\.jsonl holds the answers of an "
                                              r"interrupted run; pass --resume"):
        evaluation.main(flags + ["--output", str(tmp_path / "new" / "results.json")])
    with pytest.raises(ValueError, match="^--resume: continues the run of --output"):
        evaluation.main(flags + ["--resume"])
