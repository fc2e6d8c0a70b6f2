"""Evaluate LMEye on the synthetic visual-question task as the benchmarks do.

Trains the model of ``train_synthetic_vqa.py`` (the stand-in LLM on the task's
text, stage 1 on captions, stage 2 on questions; a few minutes on the CPU),
then evaluates it on held-out images with ``lmeye_fast.eval``:

- open-ended: batched greedy generation, VQAv2 accuracy and exact match;
- multiple choice by likelihood (the four colours, or left/right), each
  question's options scored on one shared prefix, with the options unlisted
  and, MMBench-style, listed in the prompt (``A. red`` ...) under circular
  evaluation: right only if right under every rotation of the options.

    python examples/evaluate_synthetic_vqa.py            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from train_synthetic_vqa import (CELL, COLOURS, GRID, SIDES, WORDS, batches, make_split, pretrain_llm, question,
                                 standardise)

from lmeye_fast.eval import EvalModel, Example, evaluate_choice, evaluate_open, format_table
from lmeye_fast.models import patch_tokens, train
from lmeye_fast.models.tiny import tiny_clip_model, tiny_llm, word_tokenizer


def held_out(scenes, images, rng: random.Random):
    """One open-ended and one multiple-choice example per held-out image."""
    open_ended, choice = [], []
    for index, (scene, image) in enumerate(zip(scenes, images)):
        _, ask, answer = question(scene, rng)
        options = sorted(COLOURS) if ask.startswith("what colour") else list(SIDES)
        # The answer is certain: as if all ten VQAv2 annotators gave it.
        open_ended.append(Example(id=str(index), question=ask, image=image, answers=[answer] * 10))
        choice.append(Example(id=str(index), question=ask, image=image, options=options,
                              answer=options.index(answer)))
    return open_ended, choice


def trained_model(steps, splits, batch_size: int, rng: random.Random):
    """The synthetic-VQA model (the training example's ``patch_tokens`` setting) after the stand-in
    LLM's text training, stage 1 and stage 2; and the held-out images' standardised features."""
    text_steps, stage1_steps, stage2_steps = steps
    tok = word_tokenizer(WORDS)
    print(f"training: stand-in LLM ({text_steps} steps), stage 1 ({stage1_steps}), stage 2 ({stage2_steps})")
    llm = pretrain_llm(tiny_llm("llama", len(tok), hidden=64, layers=2, heads=4), tok, text_steps, batch_size, rng)
    clip = tiny_clip_model(image_size=GRID * CELL, patch_size=CELL, hidden=64, text_hidden=64, heads=4).eval()
    processor, model = patch_tokens(tok, llm, clip, response_prefix="answer :", num_requests=5, interaction_dim=64,
                                    num_heads=4)
    (scenes, images), (_, test_images) = splits
    with torch.no_grad():
        features, test_features = standardise(model.encode_images(images), model.encode_images(test_images))
    common = dict(lr=3e-3, warmup_steps=min(50, stage2_steps // 5))
    model.set_stage(1)
    model.special_embed.requires_grad_(True)
    train(model, batches(processor, scenes, features, batch_size, rng, "caption"), stage1_steps, schedule="static",
          description="stage 1", **common)
    model.set_stage(2, train_special_tokens=True)
    train(model, batches(processor, scenes, features, batch_size, rng, "question"), stage2_steps,
          schedule="single_pass", description="stage 2", **common)
    return model.eval(), processor, test_features


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="600,200,300",
                        help="training steps: stand-in LLM, stage 1, stage 2 (comma-separated)")
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != 3:
        parser.error(f"--steps: expected three comma-separated counts, got {args.steps!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    began = time.time()
    splits = make_split(args.train_images, rng), make_split(args.test_images, rng)
    model, processor, test_features = trained_model(steps, splits, 32, rng)
    trained = time.time()

    # Each held-out image as its precomputed, standardised features, as the model was trained.
    images = [{name: value[i] for name, value in test_features.items()} for i in range(args.test_images)]
    open_ended, choice = held_out(splits[1][0], images, rng)
    runner = EvalModel(model, processor)
    _, vqa = evaluate_open(runner, open_ended, batch_size=64, max_new_tokens=1)
    _, plain = evaluate_choice(runner, choice, batch_size=64, question_format="{question}")
    _, listed = evaluate_choice(runner, choice, batch_size=64, question_format="{options} {question}", circular=True)
    metrics = {"open-ended VQA accuracy": vqa["vqa_accuracy"], "open-ended exact match": vqa["exact_match"],
               "choice, summed log-likelihood": plain["accuracy"],
               "choice, per-token log-likelihood": plain["accuracy_norm"],
               "choice, options listed": listed["accuracy"],
               "choice, options listed, circular": listed["circular_accuracy"]}
    print(format_table(metrics, len(choice)))
    print(f"training {trained - began:.0f} s, evaluation {time.time() - trained:.0f} s")


if __name__ == "__main__":
    main()
