"""DeepSpeed ZeRO-2 and ZeRO-3 through LMEyeTrainer(deepspeed=...) on 2 CPU processes: the 1-process run's
losses and adapter, and checkpoints without the frozen LLM. Runs where DeepSpeed is installed (the `deepspeed` extra)."""

import importlib.util
import os

import pytest
from test_train_distributed import train
from training_helpers import relative_difference

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="DeepSpeed is not installed (pip install 'lmeye_fast[deepspeed]')")]


def test_zero2_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    single_losses, single = train("trainer", tmp_path / "one", 1)
    losses, adapter = train("zero2", tmp_path / "two", 2)
    assert losses == pytest.approx(single_losses, rel=1e-5)
    # ZeRO-2 reduces the two ranks' gradients in its own fp32 buckets, rounded otherwise than one process's
    # backward over the whole batch; Adam turns that into about 2e-5 (as under ZeRO-3, below). A lost or
    # doubled gradient would be off by order one.
    assert max(relative_difference(adapter[k], single[k]) for k in single) <= 5e-5
    # DeepSpeed's model states hold the adapter only: far smaller than the tiny LLM itself.
    states = tmp_path / "two" / "run" / "checkpoint-3" / "global_step3" / "mp_rank_00_model_states.pt"
    adapter_bytes = sum(v.numel() * v.element_size() for v in single.values())
    assert states.is_file() and states.stat().st_size < 2 * adapter_bytes


def test_zero3_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    """Every parameter partitioned, the adapter's included: the backward pass re-gathers the model's own
    parameters through the hooks on its output, and the saved adapter is gathered whole."""
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    single_losses, single = train("trainer", tmp_path / "one", 1)
    losses, adapter = train("zero3", tmp_path / "two", 2)
    assert losses == pytest.approx(single_losses, rel=1e-5)
    # ZeRO-3 averages the two ranks' gradients in its own flat fp32 partitions, rounded otherwise than one
    # process's; Adam turns that into up to ~2e-5 in special_embed, whose rows get near-zero gradients
    # (the other tensors stay under 1e-5). A lost or doubled gradient would be off by order one.
    assert max(relative_difference(adapter[k], single[k]) for k in single) <= 5e-5
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "two" / "run" / "checkpoint-3" / "lmeye_adapter.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in single.items()}
