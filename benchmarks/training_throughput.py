"""Training-path throughput on the CPU: the data loader against the training step, the Trainer against the
plain loop, and a checkpoint's size against the adapter's parameter bytes.

    python benchmarks/training_throughput.py                 # a 512-wide, 8-layer Llama, 2 loader workers
    python benchmarks/training_throughput.py --steps 10 --json

1. ``LMEyeDataset`` + ``LMEyeCollator`` through a ``DataLoader`` with ``--workers``
   workers (PNG decoding, CLIP preprocessing, tokenization), in samples/s, beside
   the training step's samples/s: the loader must be the faster.
2. ``LMEyeTrainer`` steps/s (fed by that loader) against ``lmeye_fast.models.train``
   (same model, AdamW, no accumulation, a loss read every 10 steps) fed by the same
   loader, which is the Trainer's own cost, and on batches already in memory, which
   also leaves out what the loader's workers take from the step on a small
   machine; the first two steps of each are not timed.
3. The Trainer's ``checkpoint-N``: the adapter file and the optimizer state,
   each against the adapter's parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import CLIPImageProcessor, TrainerCallback, TrainingArguments

from lmeye_fast.data import LMEyeCollator, LMEyeDataset
from lmeye_fast.models import LMEyeModel, LMEyeProcessor, train
from lmeye_fast.models.modeling import ADAPTER_FILE
from lmeye_fast.models.tiny import tiny_clip, tiny_llm, word_tokenizer
from lmeye_fast.train import LMEyeTrainer

WORDS = "what colour is it red green blue a picture of USER: ASSISTANT: describe".split()


def write_dataset(directory: Path, count: int, image_size: int, images: int = 64) -> Path:
    """``count`` records over ``images`` random PNGs (each record's image is decoded on its own)."""
    rng = random.Random(0)
    (directory / "images").mkdir(parents=True)
    for index in range(images):
        pixels = bytes(rng.randrange(256) for _ in range(image_size * image_size * 3))
        Image.frombytes("RGB", (image_size, image_size), pixels).save(directory / "images" / f"{index}.png")
    records = []
    for index in range(count):
        colour = rng.choice(["red", "green", "blue"])
        records.append({"image": f"{index % images}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is it"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "describe it"}, {"from": "gpt", "value": f"a picture of {colour}"}]})
    path = directory / "llava.json"
    path.write_text(json.dumps(records))
    return path


def build(hidden: int, layers: int, image_size: int):
    processor = LMEyeProcessor(word_tokenizer(WORDS), num_image_tokens=(image_size // 16) ** 2 + 1)
    llm = tiny_llm("llama", len(processor), hidden=hidden, layers=layers, heads=8)
    vision = tiny_clip(image_size=image_size, patch_size=16, hidden=256, layers=4, heads=4)
    model = LMEyeModel(llm, processor.make_config(interaction_dim=256, num_heads=4), vision=vision)
    return processor, model.set_stage(2, train_special_tokens=True)


class StepTimer(TrainerCallback):
    """When each optimizer step ended (before the Trainer logs or saves after it)."""

    def __init__(self):
        self.times = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter()


def make_loader(dataset, collate, batch_size: int, workers: int) -> DataLoader:
    """The loader the Trainer builds for these arguments."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                      persistent_workers=workers > 0)


def loop_rate(model, batches, steps: int) -> float:
    """Steps/s of ``lmeye_fast.models.train`` over ``batches``, after two untimed steps."""
    train(model, batches, steps=2, progress=False)
    start = time.perf_counter()
    train(model, batches, steps=steps, progress=False, log_every=10)
    return steps / (time.perf_counter() - start)


def loader_rate(dataset, collate, batch_size: int, workers: int, batches: int) -> float:
    loader = make_loader(dataset, collate, batch_size, workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        # One epoch covers the loader's timed batches (and its first) without a restart.
        data = write_dataset(root / "data", (args.steps + 1) * args.batch_size, args.image_size)
        processor, model = build(args.hidden, args.layers, args.image_size)
        image_processor = CLIPImageProcessor(size={"shortest_edge": args.image_size},
                                             crop_size={"height": args.image_size, "width": args.image_size})
        dataset = LMEyeDataset(data, processor, image_processor, image_folder=root / "data" / "images")
        collate = LMEyeCollator(processor)
        results["loader_samples_per_s"] = loader_rate(dataset, collate, args.batch_size, args.workers, args.steps)

        in_memory = [collate([dataset[(k * args.batch_size + i) % len(dataset)] for i in range(args.batch_size)])
                     for k in range(4)]
        in_memory_steps = loop_rate(model, in_memory, args.steps)
        results["plain_loop_in_memory_steps_per_s"] = in_memory_steps
        results["step_samples_per_s"] = in_memory_steps * args.batch_size
        loop_steps = loop_rate(model, make_loader(dataset, collate, args.batch_size, args.workers), args.steps)
        results["plain_loop_steps_per_s"] = loop_steps

        trainer_args = TrainingArguments(output_dir=str(root / "out"), use_cpu=True, report_to=[], disable_tqdm=True,
                                         per_device_train_batch_size=args.batch_size, max_steps=args.steps + 2,
                                         logging_steps=10, save_steps=args.steps + 2,
                                         dataloader_num_workers=args.workers, lr_scheduler_type="constant")
        trainer = LMEyeTrainer(model=model, args=trainer_args, train_dataset=dataset, data_collator=collate)
        trainer.add_callback(StepTimer())
        trainer.train()
        times = trainer.callback_handler.callbacks[-1].times
        results["trainer_steps_per_s"] = args.steps / (times[args.steps + 2] - times[2])
        results["trainer_vs_plain_loop"] = results["trainer_steps_per_s"] / loop_steps
        results["trainer_vs_in_memory_loop"] = results["trainer_steps_per_s"] / in_memory_steps

        checkpoint = root / "out" / f"checkpoint-{args.steps + 2}"
        adapter_bytes = sum(p.numel() * p.element_size() for p in model.adapter_state_dict().values())
        results["adapter_parameter_bytes"] = adapter_bytes
        results["checkpoint_adapter_file_vs_parameters"] = os.path.getsize(checkpoint / ADAPTER_FILE) / adapter_bytes
        results["checkpoint_total_vs_parameters"] = sum(
            f.stat().st_size for f in checkpoint.iterdir() if f.is_file()) / adapter_bytes
        results["llm_parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:40s} {value:,.3f}" if isinstance(value, float) else f"{key:40s} {value:,}")


if __name__ == "__main__":
    main()
