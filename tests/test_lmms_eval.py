"""The lmms-eval model ``lmeye`` end to end: lmms-eval's own evaluator runs two tasks defined here
over a small local dataset (saved with ``datasets``, no download): an open-ended one
(``generate_until``) and a multiple-choice one (``multiple_choice``, scored by loglikelihood).
Its answers must be those of ``lmeye_fast.eval`` on the same prompts and images: the same
generated text, and per option the same log-likelihood (rel 1e-4, fp32) with the sign lmms-eval's
multiple-choice scorer expects. Once for a causal LLM's adapter and once for a T5 one. Skipped
without the ``eval`` extra (``pip install -e ".[eval]"``)."""

import random
import textwrap

import pytest
import torch

pytest.importorskip("lmms_eval")
pytest.importorskip("datasets")

from saved_tiny_model import RESPONSE_PREFIX, random_image, save_tiny_model  # noqa: E402

from lmeye_fast.eval import load_eval_model  # noqa: E402

COLOURS = ["red", "blue", "green", "yellow"]
UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answers"][0])}
'''


def task_files(folder, data):
    common = f"""\
        dataset_path: {data}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        metadata:
          version: 0
        """
    (folder / "utils.py").write_text(UTILS)
    (folder / "toy_vqa.yaml").write_text(textwrap.dedent("""\
        task: lmeye_toy_vqa
        output_type: generate_until
        doc_to_target: answer
        generation_kwargs:
          until: ["?"]
          max_new_tokens: 3
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """) + textwrap.dedent(common))
    (folder / "toy_choice.yaml").write_text(textwrap.dedent("""\
        task: lmeye_toy_choice
        output_type: multiple_choice
        doc_to_choice: options
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """) + textwrap.dedent(common))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_lmms_eval_runs_lmeye_on_a_local_task(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets
    from lmms_eval import evaluator
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from lmeye_fast.lmms_eval_model import register

    save_tiny_model(tmp_path, arch)
    count = 6
    rows = {"image": [random_image() for _ in range(count)],
            "question": [random.choice(["what colour is the circle ?", "what colour is the square ?"])
                         for _ in range(count)],
            "options": [random.sample(COLOURS, random.randint(2, 4)) for _ in range(count)]}
    rows["answer"] = [random.randrange(len(o)) for o in rows["options"]]
    rows["answers"] = [[random.choice(COLOURS)] for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "options": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("int64"),
                                  "answers": datasets.Sequence(datasets.Value("string"))})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "data"))
    (tmp_path / "tasks").mkdir()
    task_files(tmp_path / "tasks", tmp_path / "data")

    # lmms-eval 0.7.3 turns every model output that is not text into its str(), the (loglikelihood,
    # is_greedy) pairs of its own loglikelihood interface included, which its multiple-choice scorer
    # then cannot unpack; pass those pairs through as the interface documents them.
    unwrap = evaluator.unwrap_generation_output
    monkeypatch.setattr(evaluator, "unwrap_generation_output",
                        lambda out: (out, None) if isinstance(out, tuple) and isinstance(out[0], float) else unwrap(out))
    register()
    model_args = (f"adapter={tmp_path / 'adapter'},llm={tmp_path / 'llm'},vision={tmp_path / 'vision'},"
                  f"response_prefix={RESPONSE_PREFIX}")
    results = simple_evaluate(model="lmeye", model_args=model_args, tasks=["lmeye_toy_vqa", "lmeye_toy_choice"],
                              batch_size=4, device="cpu", log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))

    runner = load_eval_model(tmp_path / "adapter", tmp_path / "llm", tmp_path / "vision",
                             response_prefix=RESPONSE_PREFIX)
    images = [image.convert("RGB") for image in rows["image"]]
    expected_text = runner.generate(rows["question"], images, max_new_tokens=3)
    samples = sorted(results["samples"]["lmeye_toy_vqa"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == [t.split("?")[0] for t in expected_text]
    expected_match = sum(t.split("?")[0].strip() == a[0] for t, a in zip(expected_text, rows["answers"])) / count
    assert results["results"]["lmeye_toy_vqa"]["exact_match,none"] == pytest.approx(expected_match)

    # Scored in the batches lmms-eval's requests came in (4 documents, then the rest): a tiny T5 with
    # weights this large is sensitive to the float32 rounding of other batch shapes.
    summed_scores = [summed for start in range(0, count, 4)
                     for summed in runner.score(rows["question"][start:start + 4], images[start:start + 4],
                                                rows["options"][start:start + 4]).summed]
    samples = sorted(results["samples"]["lmeye_toy_choice"], key=lambda s: s["doc_id"])
    for sample, summed in zip(samples, summed_scores):
        losses = torch.tensor([float(r[0][0]) for r in sample["resps"]])
        torch.testing.assert_close(losses, -summed, rtol=1e-4, atol=1e-5)
    expected_acc = sum(int(s.argmax()) == a for s, a in zip(summed_scores, rows["answer"])) / count
    assert results["results"]["lmeye_toy_choice"]["acc,none"] == pytest.approx(expected_acc)
