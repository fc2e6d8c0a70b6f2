"""Saves survive SIGKILL: real processes (tests/crash_worker.py) are killed at each step of a save and at
random moments, and what they leave must load as the old complete state or the new one, never a mix;
leftovers are never read and the next save removes them."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crash_worker import ADAPTER_SCHEDULES, build_model, set_state

from lmeye_fast.atomic import is_temporary, replace_files, write_atomic
from lmeye_fast.models import LMEyeConfig, LMEyeModel
from lmeye_fast.models.adapter_files import ADAPTER_FILE, CONFIG_FILE
from lmeye_fast.models.sources import SOURCES_FILE
from lmeye_fast.train.checkpoints import (COMPLETE_MARK, checkpoint_to_resume, complete_checkpoints,
                                          latest_complete_checkpoint)

WORKER = Path(__file__).parent / "crash_worker.py"
REPO = Path(__file__).parent.parent


def worker(*args, timeout=300):
    """Run the worker to its end (or its self-inflicted SIGKILL); returns its exit code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return done.returncode


def save_state(directory, state: int) -> None:
    """Save adapter state ``state`` in this process (the worker's model, no kill)."""
    model = build_model()
    set_state(model, state)
    model.save_pretrained(directory)


def loaded_state(directory) -> int:
    """The adapter state saved in ``directory``; fails unless tensors and config are one save's."""
    model = LMEyeModel.from_pretrained(directory, build_model().llm)
    tensors = list(model.adapter_state_dict().values())
    state = int(tensors[0].flatten()[0])
    assert all(torch.all(v == state) for v in tensors), "tensors of several saves"
    assert model.config.schedule == ADAPTER_SCHEDULES[state % 2], "the config of another save than the tensors"
    return state


# Each step of save_pretrained (adapter_files.write_adapter): K-th fsync / os.replace, and which state loads.
# The pending copies are written (replaces 1 and 2: config, sources), then the tensors renamed (3),
# then the config (4) and the sources (5).
ADAPTER_KILLS = {
    "fsync:1": 0,      # the tensors are written under a temporary name, the pending config is being written
    "replace:2": 0,    # the pending config is complete, the pending sources are not yet
    "replace:3": 0,    # both pending copies are complete, the tensors not yet renamed
    "replaced:3": 1,   # new tensors beside the old JSON files: their pending copies settle it
    "replaced:4": 1,   # the config renamed, the sources still pending
    "replaced:5": 1,   # every file renamed, the leftovers not yet removed
}


@pytest.mark.parametrize("kill", list(ADAPTER_KILLS))
def test_an_adapter_save_killed_at_each_step_loads_old_or_new(tmp_path, kill):
    save_state(tmp_path, 2)
    assert worker("adapter", tmp_path, 3, kill) == -signal.SIGKILL
    assert loaded_state(tmp_path) == 2 + ADAPTER_KILLS[kill]
    if kill != "replaced:5":
        assert any(p.name.startswith(".") for p in tmp_path.iterdir())  # what the killed save left
    save_state(tmp_path, 4)  # the next save removes it
    assert loaded_state(tmp_path) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_FILE, CONFIG_FILE, SOURCES_FILE])


def test_a_first_save_killed_before_its_config_loads_the_new_adapter(tmp_path):
    assert worker("adapter", tmp_path, 1, "replaced:3") == -signal.SIGKILL
    assert not (tmp_path / CONFIG_FILE).exists()
    assert loaded_state(tmp_path) == 1


def test_a_first_save_killed_before_its_tensors_leaves_no_adapter(tmp_path):
    assert worker("adapter", tmp_path, 1, "replace:3") == -signal.SIGKILL
    with pytest.raises(FileNotFoundError, match=f"directory: no {CONFIG_FILE} in {tmp_path}"):
        LMEyeConfig.load(tmp_path)


def test_adapter_saves_killed_at_random_moments_load_old_or_new(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(int(os.environ.get("LMEYE_FAST_SEED", "0")))
    for _ in range(2):
        process = subprocess.Popen([sys.executable, str(WORKER), "loop", str(tmp_path)], env=env,
                                   stdout=subprocess.PIPE, text=True)
        first = process.stdout.readline()  # one save done: the folder holds an adapter from here on
        assert first.startswith("saved"), first
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        saved = [int(line.split()[1]) for line in [first] + process.stdout.read().splitlines()]
        process.wait()
        assert loaded_state(tmp_path) in (saved[-1], saved[-1] + 1)


def test_a_mismatched_save_id_is_refused_naming_both_files(tmp_path):
    save_state(tmp_path / "a", 0)
    save_state(tmp_path / "b", 1)
    (tmp_path / "a" / CONFIG_FILE).write_bytes((tmp_path / "b" / CONFIG_FILE).read_bytes())
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}: belongs to the save .*{ADAPTER_FILE} to the save"):
        LMEyeConfig.load(tmp_path / "a")


def test_write_atomic_keeps_the_old_file_on_an_error_and_leaves_nothing(tmp_path):
    path = write_atomic(tmp_path / "results.json", "old")
    with pytest.raises(RuntimeError):
        from lmeye_fast.atomic import replacing

        with replacing(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    (tmp_path / ".results.json.0123456789ab.tmp").write_text("a killed write's leftover")
    write_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(IsADirectoryError, match=f"{tmp_path}: is a folder"):
        write_atomic(tmp_path, "x")


@pytest.mark.parametrize("kill, tags", [("fsync:2", ("0", "0")), ("replace:2", ("1", "0")),
                                        ("replaced:2", ("1", "1"))])
def test_a_tokenizer_style_save_killed_midway_leaves_each_file_whole(tmp_path, kill, tags):
    """atomic.replace_files, which saves the tokenizer and the processor's files: each file is old or new."""
    from crash_worker import atomic_module, write_tagged_files

    write_tagged_files(atomic_module(), tmp_path, "0")
    assert worker("files", tmp_path, "1", kill) == -signal.SIGKILL
    assert tuple(json.loads((tmp_path / name).read_text())["tag"] for name in ("a.json", "b.json")) == tags
    write_tagged_files(atomic_module(), tmp_path, "2")  # removes the killed save's temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_replace_files_writes_each_file_whole(tmp_path):
    def write(folder):
        (folder / "a.json").write_text("{}")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text("b")

    written = replace_files(tmp_path, write)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == ["a.json", "sub/b.txt"]
    assert not any(is_temporary(p.name) for p in tmp_path.iterdir())


# ---------------------------------------------------------------- training checkpoints

@pytest.fixture(scope="module")
def training(tmp_path_factory):
    pytest.importorskip("accelerate")
    from training_helpers import save_tiny_models, write_llava

    root = tmp_path_factory.mktemp("crash-train")
    llm, vision = save_tiny_models(root / "models")
    data = write_llava(root / "data", count=8, text_only=2)
    flags = ["--llm", llm, "--vision", vision, "--data", data, "--image_folder", root / "data" / "images",
             "--num_requests", 2, "--interaction_dim", 16, "--num_heads", 2, "--batch_size", 2, "--num_workers", 0,
             "--learning_rate", 0.01, "--logging_steps", 1, "--progress", "false", "--save_steps", 1]
    return root, [str(f) for f in flags]


def _checkpoint_loads(checkpoint: Path):
    """Every file of a complete checkpoint reads back: the adapter, optimizer, scheduler, RNG and trainer state."""
    LMEyeConfig.load(checkpoint)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.load(checkpoint / name, weights_only=False)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint.name == f"checkpoint-{state['global_step']}"


@pytest.mark.parametrize("kill, resume", [("optimizer:3", False), ("mark:3", True)])
def test_a_checkpoint_save_killed_midway_is_never_resumed(training, tmp_path, kill, resume):
    root, flags = training
    out = tmp_path / "out"
    code = worker("train", kill, "--", *flags, "--output_dir", out, "--max_steps", 5, "--save_total_limit", 1)
    assert code == -signal.SIGKILL
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-3" / COMPLETE_MARK).exists()
    # save_total_limit=1 removed checkpoint-1 only after checkpoint-2 was complete, and kept checkpoint-2
    assert complete_checkpoints(out) == [out / "checkpoint-2"]
    assert checkpoint_to_resume(True, out) == out / "checkpoint-2"
    _checkpoint_loads(out / "checkpoint-2")
    with pytest.raises(ValueError, match=f"resume: {out / 'checkpoint-3'} is not a complete checkpoint"):
        checkpoint_to_resume(str(out / "checkpoint-3"), out)
    if not resume:
        return
    assert worker("train", "--", *flags, "--output_dir", out, "--max_steps", 5, "--save_total_limit", 1,
                  "--resume", "true") == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resumed = [entry["step"] for entry in log if "loss" in entry]
    assert resumed[-3:] == [3, 4, 5]  # steps 3 to 5 after the resume from checkpoint-2
    assert complete_checkpoints(out) == [out / "checkpoint-5"]
    assert latest_complete_checkpoint(out) == out / "checkpoint-5"


def test_training_killed_at_a_random_moment_leaves_a_complete_checkpoint(training, tmp_path):
    root, flags = training
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(int(os.environ.get("LMEYE_FAST_SEED", "0")))
    process = subprocess.Popen([sys.executable, str(WORKER), "train", "--", *flags, "--output_dir", str(out),
                                "--max_steps", "1000", "--save_total_limit", "2"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(list(out.glob("checkpoint-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    latest = latest_complete_checkpoint(out)
    assert latest is not None
    _checkpoint_loads(latest)


# ---------------------------------------------------------------- evaluation results

def test_an_evaluation_killed_midway_keeps_its_answers_and_resumes(tmp_path):
    from saved_tiny_model import RESPONSE_PREFIX, random_image, save_tiny_model

    from lmeye_fast.eval import main

    save_tiny_model(tmp_path)
    (tmp_path / "images").mkdir()
    for index in range(5):
        random_image().save(tmp_path / "images" / f"{index}.png")
    data = tmp_path / "questions.jsonl"
    question = "what colour is the circle ?"
    data.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.png", "question": question,
                                        "answers": ["red"] * 10}) + "\n" for i in range(5)))
    flags = ["--adapter", tmp_path / "adapter", "--llm", tmp_path / "llm", "--vision", tmp_path / "vision",
             "--response-prefix", RESPONSE_PREFIX, "--image-folder", tmp_path / "images", "--data", data,
             "--batch-size", 2, "--max-new-tokens", 2, "--no-progress"]
    flags = [str(flag) for flag in flags]
    output = tmp_path / "out" / "results.json"  # its folder does not exist yet
    assert worker("eval", "answers:3", "--", *flags, "--output", output) == -signal.SIGKILL
    answers = output.with_name("results.json.answers.jsonl")
    lines = answers.read_text().splitlines()
    assert not output.exists() and len(lines) == 1 + 4  # the settings, then two batches of two
    with pytest.raises(ValueError, match=r"^--resume: --max-new-tokens is 3, but the interrupted run in .* used 2"):
        main(flags[:-3] + ["--max-new-tokens", "3", "--no-progress", "--output", str(output), "--resume"])
    resumed = main(flags + ["--output", str(output), "--resume"])
    assert not answers.exists() and json.loads(output.read_text())["records"] == resumed["records"]
    whole = main(flags + ["--output", str(tmp_path / "whole.json")])
    assert resumed["records"] == whole["records"] and resumed["metrics"] == whole["metrics"]
