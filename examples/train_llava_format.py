"""LMEye end to end on files: LLaVA-format data on disk, both stages with the training CLI, in one process
and under ``torchrun --nproc_per_node 2``, then held-out accuracy of each with the evaluation CLI, which
reads nothing but the adapter directory and the questions.

    python examples/train_llava_format.py                  # ~5 minutes on 2 CPU cores
    python examples/train_llava_format.py --steps 60 --processes 1

The data: PNGs of a coloured circle or square drawn with Pillow, stage-1
captions ("a red circle") as JSONL, stage-2 two-turn conversations ("what colour
is it" / "what shape is it") in LLaVA's JSON format, and held-out questions about
new images, one file per question kind (``held_out_colour.json``, ``held_out_shape.json``).
The models are a tiny random Llama and CLIP tower saved as Hugging Face
directories, so nothing is downloaded; with real ones only ``--llm``/``--vision``
of the CLI change (see the README, "Training on your data").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import CLIPImageProcessor

from lmeye_fast.models.tiny import tiny_clip, tiny_llm, word_tokenizer

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 210), "yellow": (220, 200, 40)}
SHAPES = ("circle", "square")
QUESTIONS = {"colour": "what colour is it", "shape": "what shape is it"}
IMAGE_SIZE = 32


def draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    size = rng.randint(10, 18)
    x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    shade = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(
        [x, y, x + size, y + size], fill=shade)
    return image


def write_data(directory: Path, count: int, held_out: int, seed: int) -> None:
    """images/*.png, captions.jsonl (stage 1), llava.json (stage 2) and held_out_{colour,shape}.json."""
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    captions, conversations, test = [], [], []
    for index in range(count + held_out):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        name = f"{index}.png"
        draw(colour, shape, rng).save(directory / "images" / name)
        answers = {"colour": colour, "shape": shape}
        if index >= count:
            test.append((name, answers))
            continue
        captions.append({"image": name, "caption": f"a {colour} {shape}"})
        first, second = rng.sample(list(QUESTIONS), 2)
        conversations.append({"id": str(index), "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTIONS[first]}"}, {"from": "gpt", "value": answers[first]},
            {"from": "human", "value": QUESTIONS[second]}, {"from": "gpt", "value": answers[second]}]})
    (directory / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    (directory / "llava.json").write_text(json.dumps(conversations))
    for kind, question in QUESTIONS.items():
        held_out = [{"image": f"images/{name}", "question": f"<image>\n{question}", "answers": [answers[kind]]}
                    for name, answers in test]
        (directory / f"held_out_{kind}.json").write_text(json.dumps(held_out))


def write_models(directory: Path) -> None:
    """A tiny Llama with its word tokenizer and a tiny CLIP tower with its image processor, on disk."""
    words = list(COLOURS) + list(SHAPES) + "a what colour shape is it USER: ASSISTANT:".split()
    tokenizer = word_tokenizer(words)
    # Room for LMEye's three special tokens, so the saved embeddings need no resize.
    tiny_llm("llama", len(tokenizer) + 3, hidden=64, initializer_range=0.2).save_pretrained(directory / "llm")
    tokenizer.save_pretrained(directory / "llm")
    tiny_clip(image_size=IMAGE_SIZE, patch_size=8, hidden=48).save_pretrained(directory / "vision")
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       do_normalize=True).save_pretrained(directory / "vision")


def train(root: Path, name: str, processes: int, steps: int, batch_size: int) -> Path:
    """Stage 1 then stage 2 with the CLI; the global batch is the same for any number of processes."""
    base = {"llm": str(root / "models" / "llm"), "vision": str(root / "models" / "vision"),
            "image_folder": str(root / "data" / "images"), "num_requests": 4, "interaction_dim": 64,
            "num_heads": 4, "batch_size": batch_size // processes, "num_workers": 1, "logging_steps": 20,
            "save_steps": steps, "warmup_steps": steps // 10}
    stages = [{"stage": 1, "data": str(root / "data" / "captions.jsonl"), "learning_rate": 3e-3,
               "output_dir": str(root / name / "stage1"), "max_steps": steps // 2},
              {"stage": 2, "data": str(root / "data" / "llava.json"), "learning_rate": 2e-3,
               "output_dir": str(root / name / "stage2"), "adapter": str(root / name / "stage1"), "max_steps": steps}]
    launcher = [sys.executable, "-m", "lmeye_fast.train"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        "-m", "lmeye_fast.train"]
    for stage in stages:
        config = root / name / f"stage{stage['stage']}.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({**base, **stage}, indent=2))
        print(f"$ {' '.join(launcher[1:])} --config {config}", flush=True)
        subprocess.run(launcher + ["--config", str(config)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return root / name / "stage2"


def accuracy(root: Path, adapter: Path) -> dict:
    """Greedy one-word answers to both questions about every held-out image, by the evaluation CLI from the
    adapter directory alone (it records the models and the prompt template); exact match per question kind."""
    scores = {}
    for kind in QUESTIONS:
        output = adapter / f"held_out_{kind}.json"
        command = [sys.executable, "-m", "lmeye_fast.eval", "--adapter", str(adapter),
                   "--data", str(root / "data" / f"held_out_{kind}.json"), "--max-new-tokens", "1",
                   "--batch-size", "64", "--device", "cpu", "--no-progress", "--output", str(output)]
        print(f"$ {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        scores[kind] = json.loads(output.read_text())["metrics"]["exact_match"]
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="stage-2 optimizer steps (stage 1: half)")
    parser.add_argument("--batch_size", type=int, default=16, help="global batch size")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--held_out", type=int, default=64)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep data, models and adapters here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.workdir or scratch)
        write_data(root / "data", args.samples, args.held_out, args.seed)
        write_models(root / "models")
        results = {}
        for processes in args.processes:
            adapter = train(root, f"{processes}proc", processes, args.steps, args.batch_size)
            results[f"{processes} process{'es' if processes > 1 else ''}"] = accuracy(root, adapter)
        print(json.dumps({"held_out_accuracy": results}, indent=2))


if __name__ == "__main__":
    main()
