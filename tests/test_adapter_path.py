"""The path a user takes, with every preset: a tiny LLM, CLIP model and vision tower saved to disk, trained by
``python -m lmeye_fast.train --preset ...``, then evaluated by ``python -m lmeye_fast.eval`` and lmms-eval's
model from the adapter directory and the data alone. What training saw is what evaluation asks (token for
token, on multi-turn records), a reload reproduces the model under any random state, and an override that
contradicts the adapter is refused, naming both values."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_helpers import image_processor, save_tiny_models, write_llava

pytest.importorskip("accelerate")

from lmeye_fast.data import LMEyeCollator, LMEyeDataset  # noqa: E402
from lmeye_fast.eval import load_eval_model, main, read_examples  # noqa: E402
from lmeye_fast.models import load_pretrained  # noqa: E402
from lmeye_fast.models.presets import PRESETS  # noqa: E402
from lmeye_fast.models.tiny import tiny_clip_model  # noqa: E402
from lmeye_fast.models.vision import read_image  # noqa: E402
from lmeye_fast.train import cli  # noqa: E402

COLOURS = ["red", "green", "blue", "white"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{preset: adapter directory} trained by the CLI, plus the data folder and the saved models."""
    root = tmp_path_factory.mktemp("path")
    llm, tower = save_tiny_models(root / "models")
    clip = root / "models" / "clip"
    tiny_clip_model(image_size=16, patch_size=8, hidden=24, text_hidden=16, text_positions=16).save_pretrained(clip)
    image_processor().save_pretrained(clip)
    data = write_llava(root / "data", count=6, text_only=1)
    adapters = {}
    for preset in sorted(PRESETS):
        flags = dict(llm=llm, vision=clip, preset=preset, data=data, image_folder=root / "data" / "images",
                     output_dir=root / preset, stage=2, max_steps=2, batch_size=2, num_workers=0,
                     learning_rate=0.01, interaction_dim=16, num_heads=2, progress="false", save_steps=100)
        argv = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
        adapters[preset] = cli.main(argv)
    return root, adapters, data, llm, tower, clip


def write_questions(folder: Path, count: int = 4) -> Path:
    """Open-ended and multiple-choice questions, some multi-turn, over new images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        colour = random.choice(COLOURS)
        Image.new("RGB", (20, 20), (40 * index, 200, 10)).save(folder / "images" / f"{index}.png")
        history = [{"from": "human", "value": "<image>\nwhat colour is it"}, {"from": "gpt", "value": colour}]
        last = [{"from": "human", "value": "what colour is the image"}]
        records.append({"id": f"q{index}", "image": f"{index}.png", "answers": [colour],
                        "conversations": (history if index % 2 else []) + last})
    path = folder / "questions.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_trains_and_evaluates_from_the_adapter_alone(trained, preset, tmp_path):
    root, adapters, *_ = trained
    adapter = adapters[preset]
    files = {p.name for p in adapter.iterdir()}
    assert {"lmeye_adapter.safetensors", "lmeye_config.json", "lmeye_sources.json", "lmeye_processor.json",
            "tokenizer.json"} <= files
    questions = write_questions(tmp_path)
    output = tmp_path / "results.json"
    results = main(["--adapter", str(adapter), "--data", str(questions), "--image-folder", str(tmp_path / "images"),
                    "--max-new-tokens", "2", "--no-progress", "--output", str(output)])
    assert results["num_examples"] == 4 and json.loads(output.read_text())["records"] == results["records"]
    assert results["prompt_template"]["name"] == "vicuna"
    for record in results["records"]:
        assert record["prompt"].startswith("<bos> USER: <img>") and record["prompt"].endswith("ASSISTANT:")
        assert ("<img-q> <img-d>" in record["prompt"]) and record["prompt"].count("USER:") in (1, 2)

    choice = tmp_path / "choice.jsonl"
    choice.write_text("".join(json.dumps({"image": f"{i}.png", "question": "what colour is the image",
                                          "options": random.sample(COLOURS, 3), "answer": 0}) + "\n"
                              for i in range(4)))
    results = main(["--adapter", str(adapter), "--data", str(choice), "--image-folder", str(tmp_path / "images"),
                    "--no-progress"])
    assert results["task"] == "choice" and len(results["records"]) == 4

    # lmms-eval's model takes the adapter alone too, and answers as lmeye_fast.eval's runner does.
    pytest.importorskip("lmms_eval")
    from lmeye_fast.lmms_eval_model import LMEye

    model = LMEye(adapter=str(adapter), batch_size=2, device="cpu")
    runner = load_eval_model(adapter)
    images = [read_image(tmp_path / "images" / f"{i}.png") for i in range(2)]
    prompts = ["<image>\nwhat colour is it", "what colour is the image"]
    assert model.runner.generate(prompts, images, 2) == runner.generate(prompts, images, 2)


def test_training_and_evaluation_prompts_agree_token_for_token(trained, tmp_path):
    """For every turn k of multi-turn records, the evaluation prompt (the record cut before answer k) is the
    training row up to answer k: the same ids, image and slot positions."""
    root, adapters, data, *_ = trained
    loaded = load_pretrained(adapters["patch_tokens"])
    processor = loaded.processor
    records = json.loads(Path(data).read_text())
    dataset = LMEyeDataset(records, processor, loaded.image_processor, image_folder=root / "data" / "images")
    checked = 0
    for index, record in enumerate(records):
        if "image" not in record:
            continue  # evaluation asks about images only
        trained_row = LMEyeCollator(processor)([dataset[index]])
        messages = record["conversations"]
        for cut in range(1, len(messages), 2):
            cut_record = dict(record, conversations=messages[:cut], answers=["x"])
            (tmp_path / "one.json").write_text(json.dumps([cut_record]))
            example = read_examples(tmp_path / "one.json")[0]
            asked = processor([example.prompt(example.question)])
            length = asked["input_ids"].shape[1]
            assert asked["prefix_len"] == trained_row["prefix_len"]
            for key in ("image_pos", "request_pos", "slot_pos"):
                assert torch.equal(asked[key], trained_row[key])
            assert torch.equal(asked["input_ids"], trained_row["input_ids"][:, :length])
            answer = processor.encode(messages[cut]["value"])
            assert trained_row["input_ids"][0, length:length + len(answer)].tolist() == answer
            checked += 1
    assert checked >= 12


def test_a_reload_under_two_seeds_gives_the_same_loss(trained):
    """The LLM's vocabulary lacks LMEye's tokens, so the model resizes it; what the resize adds does not
    depend on the random state, and LMEye's tokens are never generated."""
    root, adapters, data, *_ = trained
    losses, generated = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        processor, model, images = load_pretrained(adapters["published"])
        dataset = LMEyeDataset(data, processor, images, image_folder=root / "data" / "images")
        batch = LMEyeCollator(processor)([dataset[i] for i in range(3)])
        with torch.no_grad():
            losses.append(model.eval()(**batch).loss)
            tokens = model.generate(**processor(["what colour is it"] * 2), pixel_values=batch["pixel_values"][:2],
                                    max_new_tokens=4, do_sample=False)
        generated.append(tokens)
        assert not torch.isin(tokens, torch.tensor(model.config.token_ids())).any()
    assert torch.equal(losses[0], losses[1]) and torch.equal(generated[0], generated[1])


def test_overrides_that_contradict_the_adapter_are_refused_naming_both(trained, tmp_path):
    root, adapters, data, llm, tower, clip = trained
    questions = write_questions(tmp_path)
    adapter = str(adapters["global_token"])
    with pytest.raises(ValueError, match=r"^response_prefix: .* saved with ' ASSISTANT: ', but ' Answer:' was"):
        load_eval_model(adapter, response_prefix=" Answer:")
    with pytest.raises(ValueError, match=r"^template: .* saved with the template 'vicuna'.*but the template 'plain'"):
        main(["--adapter", adapter, "--data", str(questions), "--image-folder", str(tmp_path / "images"),
              "--prompt-template", "plain", "--no-progress"])
    with pytest.raises(ValueError, match=rf"^vision: the adapter was trained on {clip} \(a 'clip' model\), but "):
        load_pretrained(adapter, vision=str(llm))
    # Agreeing overrides and other copies of the same models are taken.
    runner = load_eval_model(adapter, llm=str(llm), vision=str(clip), response_prefix=" ASSISTANT: ",
                             template="vicuna")
    assert runner.processor.template.name == "vicuna"
    # A vision tower without the projection global_token reads is refused, not filled with random weights.
    with pytest.raises(ValueError, match="lacks visual_projection"):
        load_pretrained(adapter, vision=str(tower))
