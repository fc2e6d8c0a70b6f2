"""examples/train_synthetic_vqa.py in a reduced form (two seeds, a few steps), so that it cannot break unseen.

It checks that the example runs end to end in every setting, on the tiny Llama and on the tiny T5,
and that its output is well formed (every seed, setting, model and question kind; accuracies in
[0, 1]; mean and std consistent with the per-seed numbers); how well a few steps learn is not
asserted.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_synthetic_vqa.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_synthetic_vqa", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # --jobs pickles the module's functions for its worker processes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


SMALL = ["--train-images", "64", "--test-images", "32", "--text-steps", "4", "--stage1-steps", "2",
         "--stage2-steps", "2", "--batch-size", "16"]


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_example_runs_and_reports_every_setting(example, tmp_path, capsys, llm):
    out = tmp_path / "results.json"
    seeds = [0, 1]
    threads = torch.get_num_threads()
    try:
        per_seed, table = example.main(["--seeds", *map(str, seeds), *SMALL, "--llm", llm, "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # the example pins one thread; the rest of the session keeps its own
    settings = sorted(example.SETTINGS)
    kinds = ("overall", "colour", "side")
    assert len(per_seed) == len(seeds)
    for seed in per_seed:
        assert sorted(seed) == settings
        for results in seed.values():
            assert tuple(results) == example.MODELS
            assert all(0.0 <= acc[kind] <= 1.0 for acc in results.values() for kind in kinds)
    for setting in settings:
        for model in example.MODELS:
            for kind in kinds:
                mean, std = table[setting][model][kind]
                values = [seed[setting][model][kind] for seed in per_seed]
                assert math.isclose(mean, sum(values) / len(values), abs_tol=1e-12)
                assert std >= 0.0 and math.isfinite(std)

    saved = json.loads(out.read_text())
    assert saved["seeds"] == seeds and saved["threads"] == 1 and saved["llm"] == llm
    assert sorted(saved["summary"]) == settings
    assert math.isclose(saved["chance"]["overall"], 0.375)
    printed = capsys.readouterr().out
    assert "mean ± std" in printed and all(setting in printed for setting in settings)
    assert all(model in printed for model in example.MODELS)


def test_seeds_in_worker_processes_give_the_same_numbers(example):
    threads = torch.get_num_threads()
    try:
        runs = [example.main(["--seeds", "3", "4", *SMALL, "--settings", "global_token", "--jobs", jobs])
                for jobs in ("1", "2")]
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1]
    with pytest.raises(SystemExit):
        example.main(["--jobs", "0"])
