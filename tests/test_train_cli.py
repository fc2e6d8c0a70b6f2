"""python -m lmeye_fast.train: configs and flags, bad values refused before any model loads, both stages,
JSON-lines logs, checkpoints, resume, the final adapter, an encoder-decoder LLM (T5), and the same command
under torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from training_helpers import save_tiny_models, write_llava

pytest.importorskip("accelerate")

from lmeye_fast.models import LMEyeConfig, LMEyeModel, LMEyeSeq2SeqModel  # noqa: E402
from lmeye_fast.train import cli  # noqa: E402
from lmeye_fast.train.config import load_config  # noqa: E402

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    llm, vision = save_tiny_models(root / "models")
    data = write_llava(root / "data", count=8, text_only=2)
    captions = root / "data" / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"a {c} image"}) + "\n"
                                for i, c in enumerate(["red", "green", "blue", "white"] * 2)))
    base = dict(llm=str(llm), vision=str(vision), image_folder=str(root / "data" / "images"), num_requests=2,
                interaction_dim=16, num_heads=2, batch_size=2, num_workers=0, learning_rate=0.01, logging_steps=1,
                progress=False)
    return root, base, data, captions


@pytest.fixture(scope="module")
def t5(setup):
    """The base settings with a tiny T5, an encoder-decoder LLM, for the LLM."""
    root, base, _, _ = setup
    return {**base, "llm": str(save_tiny_models(root / "t5-models", arch="t5")[0])}


def test_bad_values_are_refused_naming_the_key(setup, monkeypatch):
    root, base, data, _ = setup
    # No model may load while the configuration is checked.
    monkeypatch.setattr(cli, "_build", lambda config: pytest.fail("a model was loaded"))
    good = {**base, "data": str(data), "output_dir": str(root / "x")}
    bad = [({"stage": 3}, "stage"), ({"learning_rate": -1}, "learning_rate"), ({"batch_size": 0}, "batch_size"),
           ({"batch_size": "eight"}, "batch_size"), ({"schedule": "fast"}, "schedule"),
           ({"data": str(root / "missing.json")}, "data"), ({"lerning_rate": 1}, "lerning_rate"),
           ({"interaction_dim": 15}, "interaction_dim"), ({"deepspeed": "ds.json"}, "deepspeed"),
           ({"stage": 2, "schedule": "static"}, "schedule"), ({"on_bad_image": "ignore"}, "on_bad_image"),
           ({"resume": str(root / "nowhere")}, "resume"), ({"llm_dtype": "int8"}, "llm_dtype"),
           ({"streaming": True}, "max_steps")]
    for change, key in bad:
        with pytest.raises(ValueError, match=rf"^{key}:"):
            cli.main(["--config", _write(root / "bad.yaml", {**good, **change})])
    with pytest.raises(ValueError, match="^output_dir: required"):
        cli.main(["--llm", "x", "--vision", "y", "--data", str(data)])
    with pytest.raises(ValueError, match="^max_steps:"):
        cli.main(["--config", _write(root / "good.json", good), "--max_steps", "0"])


def test_flags_override_the_config_file(setup):
    root, base, data, _ = setup
    path = _write(root / "c.yaml", {**base, "data": str(data), "output_dir": str(root / "x"), "max_steps": 3})
    config = load_config(path, {"max_steps": 7, "learning_rate": 1e-3})
    assert (config.max_steps, config.learning_rate, config.batch_size) == (7, 1e-3, 2)
    assert cli.parse_args(["--config", path, "--bf16", "true", "--resume", "true"]).bf16 is True


def _write(path, values):
    path.write_text(yaml.safe_dump(values) if path.suffix == ".yaml" else json.dumps(values))
    return str(path)


def _adapter(directory):
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "lmeye_adapter.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_stage_1_then_stage_2_with_checkpoints_logs_and_resume(setup, t5, arch):
    root, base, data, captions = setup
    if arch == "t5":
        base = t5
    root = root / arch
    root.mkdir()
    stage1 = root / "stage1"
    cli.main(["--config", _write(root / "s1.json", {**base, "stage": 1, "data": str(captions),
                                                   "output_dir": str(stage1), "max_steps": 4, "save_steps": 2})])
    assert {"lmeye_adapter.safetensors", "lmeye_config.json", "tokenizer.json"} <= set(os.listdir(stage1))
    assert (stage1 / "checkpoint-2" / "optimizer.pt").is_file() and (stage1 / "checkpoint-4").is_dir()
    logs = [json.loads(line) for line in (stage1 / "log.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(losses) == 4 and all(isinstance(v, float) for v in losses)

    stage2 = dict(base, stage=2, data=str(data), adapter=str(stage1), max_steps=4, save_steps=2)
    whole = root / "stage2"
    cli.main(["--config", _write(root / "s2.yaml", {**stage2, "output_dir": str(whole)})])
    # Stage 2's default schedule: an encoder has no single pass.
    assert LMEyeConfig.load(whole).schedule == ("two_pass" if arch == "t5" else "single_pass")
    first, second = _adapter(stage1), _adapter(whole)
    assert torch.equal(first["static.proj.weight"], second["static.proj.weight"])  # stage 2 keeps stage 1's
    assert not torch.equal(first["ipn.request_proj.weight"], second["ipn.request_proj.weight"])

    # Resuming from checkpoint-2 (into another directory) ends with the uninterrupted run's adapter.
    resumed = root / "resumed"
    cli.main(["--config", _write(root / "s2.yaml", {**stage2, "output_dir": str(resumed)}),
              "--resume", str(whole / "checkpoint-2")])
    resumed = _adapter(resumed)
    for key, value in second.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-7)
    # --resume true picks the latest checkpoint in output_dir: a run that stopped after checkpoint-2.
    stopped = root / "stopped"
    shutil.copytree(whole / "checkpoint-2", stopped / "checkpoint-2")
    cli.main(["--config", _write(root / "s2.yaml", {**stage2, "output_dir": str(stopped)}), "--resume", "true"])
    assert json.loads((stopped / "train_result.json").read_text())["global_step"] == 4
    for key, value in _adapter(stopped).items():
        torch.testing.assert_close(value, second[key], rtol=1e-5, atol=1e-7)

    # The final adapter loads with from_pretrained around the same LLM and vision tower.
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    llm_class, model_class = ((AutoModelForSeq2SeqLM, LMEyeSeq2SeqModel) if arch == "t5"
                              else (AutoModelForCausalLM, LMEyeModel))
    model = model_class.from_pretrained(whole, llm_class.from_pretrained(base["llm"]),
                                        vision=AutoModel.from_pretrained(base["vision"]))
    assert torch.equal(model.adapter_state_dict()["ipn.request_proj.weight"], second["ipn.request_proj.weight"])


def test_a_schedule_the_llm_lacks_is_refused_before_it_loads(setup, t5, monkeypatch):
    root, _, data, _ = setup
    import transformers

    monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the LLM was loaded"))
    with pytest.raises(ValueError, match=r"^schedule: expected one of \('two_pass', 'static'\) for the "
                                         "encoder-decoder LLM"):
        cli.main(["--config", _write(root / "t5-bad.json", {**t5, "data": str(data), "schedule": "single_pass",
                                                           "output_dir": str(root / "t5-bad")})])


def test_streaming_reads_the_file_as_it_goes(setup, monkeypatch):
    root, base, data, _ = setup
    from lmeye_fast import data as lmeye_data

    # Map-style loading reads the whole file at once; a streamed run must never call it.
    monkeypatch.setattr(lmeye_data, "load_records", lambda source: pytest.fail("the data file was read whole"))
    output = root / "streamed"
    cli.main(["--config", _write(root / "s.yaml", {**base, "data": str(data), "output_dir": str(output),
                                                  "max_steps": 3, "save_steps": 3, "streaming": True})])
    assert json.loads((output / "train_result.json").read_text())["global_step"] == 3
    losses = [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_the_same_command_runs_under_torchrun(setup, streaming):
    root, base, data, _ = setup
    output = root / f"torchrun-{streaming}"
    config = _write(root / "t.yaml", {**base, "data": str(data), "output_dir": str(output), "max_steps": 2,
                                      "save_steps": 2, "progress": True, "streaming": streaming})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "lmeye_fast.train", "--config", config],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tokens_per_s" in result.stderr and "loss=" in result.stderr  # the progress bar, rank 0 only
    assert (output / "lmeye_adapter.safetensors").is_file() and (output / "checkpoint-2").is_dir()
    summary = json.loads((output / "train_result.json").read_text())
    assert summary["global_step"] == 2


def test_console_script_points_at_main():
    import tomllib
    from importlib import import_module

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["lmeye-train"]
    module, name = target.split(":")
    assert getattr(import_module(module), name) is cli.main
