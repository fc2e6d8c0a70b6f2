"""DeepSpeed ZeRO-2 through LMEyeTrainer(deepspeed=...) on 2 CPU processes: the 1-process run's losses and
adapter, and checkpoints without the frozen LLM. Runs where DeepSpeed is installed (the `deepspeed` extra)."""

import importlib.util
import os

import pytest
from test_train_distributed import launch, train
from training_helpers import relative_difference

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="DeepSpeed is not installed (pip install 'lmeye_fast[deepspeed]')")]


def test_zero2_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    single_losses, single = train("trainer", tmp_path / "one", 1)
    losses, adapter = train("zero2", tmp_path / "two", 2)
    assert losses == pytest.approx(single_losses, rel=1e-5)
    assert max(relative_difference(adapter[k], single[k]) for k in single) <= 1e-5
    # DeepSpeed's model states hold the adapter only: far smaller than the tiny LLM itself.
    states = tmp_path / "two" / "run" / "checkpoint-3" / "global_step3" / "mp_rank_00_model_states.pt"
    adapter_bytes = sum(v.numel() * v.element_size() for v in single.values())
    assert states.is_file() and states.stat().st_size < 2 * adapter_bytes


def test_zero3_is_refused_naming_deepspeed(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    result = launch("zero3", tmp_path / "zero3", 2)
    assert result.returncode != 0 and "deepspeed: ZeRO stage 3 is not supported" in result.stderr
