"""A process for tests/test_crash_safety.py to kill with SIGKILL while it saves.

    python crash_worker.py adapter DIR STATE [KILL]   # save adapter state STATE into DIR
    python crash_worker.py loop DIR                   # save states 0, 1, 2, ... into DIR until killed
    python crash_worker.py files DIR TAG [KILL]       # atomic.replace_files: a.json and b.json holding TAG
    python crash_worker.py train [KILL] -- CLI ARGS   # python -m lmeye_fast.train with CLI ARGS
    python crash_worker.py eval [KILL] -- CLI ARGS    # python -m lmeye_fast.eval with CLI ARGS

KILL names the moment the process kills itself, so that a test can stop a save at each of its
steps: ``replace:K`` before the K-th ``os.replace``, ``replaced:K`` right after it, ``fsync:K``
before the K-th ``os.fsync``; for training also ``optimizer:K`` (checkpoint K's adapter is written,
its optimizer not yet) and ``mark:K`` (checkpoint K is written but not marked complete). These
hooks live here only: the library has none.

Adapter state i is every adapter tensor filled with i and the config's schedule
``ADAPTER_SCHEDULES[i % 2]``, so that a torn adapter (tensors of one save, config of another) shows.
"""

import os
import signal
import sys

ADAPTER_SCHEDULES = ("single_pass", "two_pass")


def build_model():
    from lmeye_fast.models import LMEyeModel, LMEyeProcessor
    from lmeye_fast.models.tiny import tiny_llm, word_tokenizer

    tokenizer = word_tokenizer("what colour is the circle red blue".split())
    processor = LMEyeProcessor(tokenizer, num_image_tokens=4, num_requests=2)
    llm = tiny_llm("llama", len(tokenizer), hidden=32)
    return LMEyeModel(llm, processor.make_config(interaction_dim=16, num_heads=2, vision_dim=11))


def set_state(model, state: int):
    import torch

    with torch.no_grad():
        for value in model.adapter_state_dict().values():
            value.fill_(state)
    model.config.schedule = ADAPTER_SCHEDULES[state % 2]


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(kill: str) -> None:
    """Kill this process at the moment ``kill`` names (see the module's docstring)."""
    point, count = kill.split(":")
    count = int(count)
    calls = {"n": 0}

    def at_call(original, after=False):
        def hooked(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == count and not after:
                _die()
            result = original(*args, **kwargs)
            if calls["n"] == count and after:
                _die()
            return result
        return hooked

    if point in ("replace", "replaced"):
        os.replace = at_call(os.replace, after=point == "replaced")
    elif point == "fsync":
        os.fsync = at_call(os.fsync)
    elif point == "optimizer":
        from lmeye_fast.train.trainer import LMEyeTrainer

        LMEyeTrainer._save_optimizer_and_scheduler = at_call(LMEyeTrainer._save_optimizer_and_scheduler)
    elif point == "mark":
        from lmeye_fast.train import trainer

        trainer.mark_complete = at_call(trainer.mark_complete)
    elif point == "answers":
        from lmeye_fast import eval as evaluation

        evaluation.ResultsFile.write = at_call(evaluation.ResultsFile.write)
    else:
        raise ValueError(f"kill: unknown point {point!r}")


def atomic_module():
    """lmeye_fast/atomic.py alone: it needs no torch, so this process starts in a moment."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "lmeye_fast" / "atomic.py"
    spec = importlib.util.spec_from_file_location("atomic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tagged_files(atomic, directory, tag: str) -> None:
    import json

    def write(folder):
        for name in ("a.json", "b.json"):
            (folder / name).write_text(json.dumps({"tag": tag, "padding": "x" * 100_000}))

    atomic.replace_files(directory, write)


def main(argv):
    mode = argv[0]
    if mode == "files":
        atomic = atomic_module()
        if len(argv) > 3:
            install_kill(argv[3])
        write_tagged_files(atomic, argv[1], argv[2])
    elif mode == "adapter":
        directory, state = argv[1], int(argv[2])
        model = build_model()
        set_state(model, state)
        if len(argv) > 3:
            install_kill(argv[3])
        model.save_pretrained(directory)
    elif mode == "loop":
        model = build_model()
        state = 0
        while True:
            set_state(model, state)
            model.save_pretrained(argv[1])
            print(f"saved {state}", flush=True)
            state += 1
    elif mode in ("train", "eval"):
        split = argv.index("--")
        if split > 1:
            install_kill(argv[1])
        if mode == "train":
            from lmeye_fast.train.cli import main as run
        else:
            from lmeye_fast.eval import main as run
        run(argv[split + 1:])
    else:
        raise ValueError(f"mode: unknown {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
