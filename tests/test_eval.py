"""lmeye_fast.eval (VQAv2's accuracy: tests/test_vqa_accuracy.py): the LLaVA-style
reader, circular evaluation with stub scorers whose answers are known, and the command line
end to end on tiny random models saved to disk with their own images and questions: a causal LLM's
adapter and a T5 one."""

import json
import random

import pytest
import torch

from lmeye_fast.eval import (EvalModel, Example, evaluate_choice, load_eval_model, main, read_examples, rotations,
                             vqa_accuracy)
from lmeye_fast.models import LMEyeSeq2SeqModel
from lmeye_fast.models.scoring import OptionScores, score_options
from saved_tiny_model import RESPONSE_PREFIX, random_image, save_tiny_model


def test_reader_takes_llava_conversations_vqa_answers_and_options(tmp_path):
    records = [
        {"id": "q1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour ?"},
                                                         {"from": "gpt", "value": "red"}]},
        {"question_id": 7, "image": "b.png", "question": "how many ?",
         "answers": [{"answer": "two"}, {"answer": "2"}]},
        {"image": "c.png", "text": "which ?", "options": ["red", "blue", "green"], "answer": "C"},
        {"image": "d.png", "question": "which ?", "choices": ["red", "blue"], "answer": "blue"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    a, b, c, d = read_examples(path, image_folder=tmp_path / "images")
    assert (a.id, a.question, a.answers, a.is_choice) == ("q1", "<image>\nwhat colour ?", ["red"], False)
    assert a.image == tmp_path / "images" / "a.png"
    assert (b.id, b.answers) == ("7", ["two", "2"])
    assert (c.options, c.answer, c.is_choice) == (["red", "blue", "green"], 2, True)
    assert d.answer == 1
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "options": ["x", "y"], "answer": "Z"}]))
    with pytest.raises(ValueError, match="record 0: 'answer' 'Z' is neither"):
        read_examples(tmp_path / "bad.json")


def test_rotations_move_the_answer_with_its_option():
    example = Example(id="q", question="?", options=["a", "b", "c", "d"], answer=1)
    for variant in rotations(example):
        assert variant.options[variant.answer] == "b"
    assert [v.options[0] for v in rotations(example)] == ["a", "b", "c", "d"]


class StubScorer(EvalModel):
    """Scores options without a model: ``prefer(options) -> index`` gets the highest score."""

    def __init__(self, prefer):
        self.prefer = prefer

    def seen_prompts(self, prompts):
        return [turns[-1].question for turns in prompts]

    def score(self, prompts, images, options):
        summed = []
        for choices in options:
            scores = torch.full((len(choices),), -5.0)
            scores[self.prefer(choices)] = -1.0
            summed.append(scores)
        ones = [torch.ones(len(s)) for s in summed]
        return OptionScores(summed=summed, num_tokens=ones, greedy=[o.bool() for o in ones])


def test_circular_evaluation_needs_every_rotation_right():
    colours = ["red", "blue", "green", "yellow"]
    examples = []
    for index in range(40):
        options = ["red"] + random.sample(colours[1:], random.randint(1, 3))
        random.shuffle(options)
        examples.append(Example(id=str(index), question="?", image=torch.zeros(1), options=options,
                                answer=random.randrange(len(options))))
    # Picks "red" wherever it stands: right under every rotation exactly when red is right.
    knows = StubScorer(lambda choices: choices.index("red"))
    _, metrics = evaluate_choice(knows, examples, batch_size=7, circular=True, progress=False)
    red_right = sum(e.options[e.answer] == "red" for e in examples) / len(examples)
    assert metrics["accuracy"] == pytest.approx(red_right)
    assert metrics["circular_accuracy"] == pytest.approx(red_right)
    # Always picks the first option: right in one rotation only, so never circularly right.
    first = StubScorer(lambda choices: 0)
    records, metrics = evaluate_choice(first, examples, batch_size=5, circular=True, progress=False)
    assert metrics["accuracy"] == pytest.approx(sum(e.answer == 0 for e in examples) / len(examples))
    assert metrics["circular_accuracy"] == 0.0
    assert [len(r["rotations"]) for r in records] == [len(e.options) for e in examples]
    _, plain = evaluate_choice(first, examples, batch_size=5, progress=False)
    assert "circular_accuracy" not in plain and plain["accuracy"] == metrics["accuracy"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    model, processor = save_tiny_model(root)
    return root, model, processor


def write_images(folder, count):
    folder.mkdir()
    for index in range(count):
        random_image().save(folder / f"{index}.png")


def test_command_line_vqa_and_circular_choice(saved_model, tmp_path, capsys):
    root, model, processor = saved_model
    write_images(tmp_path / "images", 5)
    colours = ["red", "blue", "green", "yellow"]
    vqa = [{"question_id": i, "image": f"{i}.png", "question": "what colour is the circle ?",
            "answers": random.choices(colours, k=10)} for i in range(5)]
    choice = [{"id": i, "image": f"{i}.png", "question": "what colour is the square ?",
               "options": random.sample(colours, 3), "answer": random.randrange(3)} for i in range(5)]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in vqa))
    (tmp_path / "choice.json").write_text(json.dumps(choice))
    common = ["--adapter", str(root / "adapter"), "--llm", str(root / "llm"), "--vision", str(root / "vision"),
              "--response-prefix", RESPONSE_PREFIX, "--image-folder", str(tmp_path / "images"), "--batch-size", "2",
              "--no-progress"]

    results = main(common + ["--data", str(tmp_path / "vqa.jsonl"), "--max-new-tokens", "2",
                             "--output", str(tmp_path / "vqa.json")])
    assert results["task"] == "vqa" and results["num_examples"] == 5
    saved = json.loads((tmp_path / "vqa.json").read_text())
    assert saved["metrics"] == results["metrics"] and len(saved["records"]) == 5
    for record in saved["records"]:
        assert record["vqa_accuracy"] == pytest.approx(vqa_accuracy(record["prediction"], record["answers"]))
    assert "| vqa_accuracy |" in capsys.readouterr().out

    results = main(common + ["--data", str(tmp_path / "choice.json"), "--circular"])
    assert results["task"] == "choice"
    metrics = results["metrics"]
    assert 0.0 <= metrics["circular_accuracy"] <= metrics["accuracy"] <= 1.0
    for record in results["records"]:
        assert len(record["rotations"]) == 3 and len(record["log_likelihood"]) == 3
        assert record["prediction"] == max(range(3), key=lambda k: record["log_likelihood"][k])
        assert record["circular_accuracy"] == float(all(r["prediction"] == r["answer"]
                                                        for r in record["rotations"]))


def test_precomputed_features_stand_in_for_images(saved_model):
    _, model, processor = saved_model
    features = torch.randn(3, model.config.num_image_tokens, model.config.vision_dim)
    runner = EvalModel(model, processor)
    prompts, options = ["what colour ?", "what is the circle ?", "?"], [["red", "blue"], ["green"], ["A. red", "C."]]
    scores = runner.score(prompts, [{"image_features": f} for f in features], options)
    expected = score_options(model, processor, prompts, options, image_features=features)
    for got, want in zip(scores.summed, expected.summed):
        torch.testing.assert_close(got, want)
    texts = runner.generate(prompts, [{"image_features": f} for f in features], max_new_tokens=2)
    tokens = model.generate(**processor(prompts), image_features=features, max_new_tokens=2, do_sample=False)
    assert texts == [t.strip() for t in processor.decode(tokens)]


def test_command_line_on_an_encoder_decoder_adapter(tmp_path):
    """A T5 adapter loads as an LMEyeSeq2SeqModel with the encoder-decoder processor, and its answers are
    the saved model's own: generated text for open-ended questions, option scores for multiple choice."""
    model, processor = save_tiny_model(tmp_path, "t5")
    write_images(tmp_path / "images", 4)
    colours = ["red", "blue", "green", "yellow"]
    vqa = [{"question_id": i, "image": f"{i}.png", "question": "what colour is the circle ?",
            "answers": random.choices(colours, k=10)} for i in range(4)]
    choice = [{"id": i, "image": f"{i}.png", "question": "what colour is the <image> square ?",
               "options": random.sample(colours, 2) + ["red blue green"], "answer": random.randrange(3)}
              for i in range(4)]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in vqa))
    (tmp_path / "choice.json").write_text(json.dumps(choice))
    parts = dict(adapter=tmp_path / "adapter", llm=tmp_path / "llm", vision=tmp_path / "vision")
    common = ["--adapter", str(parts["adapter"]), "--llm", str(parts["llm"]), "--vision", str(parts["vision"]),
              "--response-prefix", RESPONSE_PREFIX, "--image-folder", str(tmp_path / "images"), "--batch-size", "3",
              "--no-progress"]

    runner = load_eval_model(**parts, response_prefix=RESPONSE_PREFIX)
    assert isinstance(runner.model, LMEyeSeq2SeqModel) and runner.processor.encoder_decoder
    saved = EvalModel(model, processor, runner.image_processor)
    images = [tmp_path / "images" / f"{i}.png" for i in range(4)]

    results = main(common + ["--data", str(tmp_path / "vqa.jsonl"), "--max-new-tokens", "3"])
    assert results["task"] == "vqa" and results["num_examples"] == 4
    expected = saved.generate([r["question"] for r in vqa], images, max_new_tokens=3)
    assert [r["prediction"] for r in results["records"]] == expected
    for record in results["records"]:
        assert record["vqa_accuracy"] == pytest.approx(vqa_accuracy(record["prediction"], record["answers"]))

    results = main(common + ["--data", str(tmp_path / "choice.json")])
    assert results["task"] == "choice"
    prompts = [f"{r['question']}\n" + "\n".join(f"{letter}. {option}" for letter, option in zip("ABC", r["options"]))
               for r in choice]
    # Scored in the CLI's batches of 3: a tiny T5 with weights this large is sensitive to the float32
    # rounding of other batch shapes.
    options = [r["options"] for r in choice]
    batches = [saved.score(prompts[start:start + 3], images[start:start + 3], options[start:start + 3])
               for start in range(0, 4, 3)]
    summed_all = [summed for scores in batches for summed in scores.summed]
    normalised_all = [normalised for scores in batches for normalised in scores.normalised]
    for record, summed, normalised in zip(results["records"], summed_all, normalised_all):
        torch.testing.assert_close(torch.tensor(record["log_likelihood"]), summed, rtol=1e-4, atol=1e-5)
        assert (record["prediction"], record["prediction_norm"]) == (int(summed.argmax()), int(normalised.argmax()))


def test_an_adapter_saved_without_its_records_needs_and_takes_the_flags(saved_model, tmp_path):
    """An adapter directory without lmeye_sources.json and lmeye_processor.json (written before them) names
    what it lacks, and loads with the models and the response prefix given."""
    import shutil

    root, model, processor = saved_model
    bare = tmp_path / "bare"
    shutil.copytree(root / "adapter", bare)
    for name in ("lmeye_sources.json", "lmeye_processor.json"):
        (bare / name).unlink()
    with pytest.raises(ValueError, match=r"^llm: the adapter in .* does not record its llm .*pass it \(--llm\)"):
        load_eval_model(bare)
    runner = load_eval_model(bare, root / "llm", root / "vision", response_prefix=RESPONSE_PREFIX)
    prompts = ["what colour is the circle ?"]
    pixels = torch.rand(1, 3, 32, 32)
    assert runner.generate(prompts, [pixels[0]], 2) == EvalModel(model, processor).generate(prompts, [pixels[0]], 2)
