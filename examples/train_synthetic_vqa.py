"""LMEye learns to look: a synthetic visual-question task trained on the CPU in a few minutes.

Each image is a 32x32 canvas on a 4x4 grid with two shapes (a circle and a
square) of two different colours in two different cells. Questions ask for the
colour of one shape or the side (left/right) it is on, so the answer depends on
the instruction, not on the image alone.

1. A tiny Llama-shaped LLM is trained on the task's text alone — scene
   descriptions, questions about them, descriptions of the image — standing in
   for a pretrained LLM, and frozen.
2. A tiny CLIP vision tower (random, frozen) gives 17 tokens per image.
3. Stage 1 trains the static mapping on captioning (the image -> its
   description): the static-only model.
4. Baseline: a copy of the static-only model whose static mapping (and
   special-token embeddings) go on training on the questions, as long as
   stage 2 does.
5. Stage 2 trains the IPN on the questions (static mapping frozen), with the
   single-pass schedule.

Held-out accuracy (greedy decoding of the answer word) is printed for the
static-only models and for LMEye with its IPN.

    python examples/train_synthetic_vqa.py            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from lmeye_fast.models import LMEyeModel, LMEyeProcessor, train
from lmeye_fast.models.tiny import tiny_clip, tiny_llm, word_tokenizer

SHAPES = ("circle", "square")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.25, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIDES = ("left", "right")
WORDS = list(SHAPES) + list(COLOURS) + list(SIDES) + "what colour is the where describe image ? answer :".split()
GRID, CELL = 4, 8
REQUESTS = 3


def random_scene(rng: random.Random):
    cells = rng.sample(range(GRID * GRID), 2)
    colours = rng.sample(sorted(COLOURS), 2)
    return {shape: (colour, cell) for shape, colour, cell in zip(SHAPES, colours, cells)}


def side(cell: int) -> str:
    return SIDES[int(cell % GRID >= GRID // 2)]


def describe(scene, rng: random.Random) -> str:
    order = list(SHAPES)
    rng.shuffle(order)
    return " ".join(f"{shape} {scene[shape][0]} {side(scene[shape][1])}" for shape in order)


def question(scene, rng: random.Random):
    shape = rng.choice(SHAPES)
    if rng.random() < 0.5:
        return shape, f"what colour is the {shape} ?", scene[shape][0]
    return shape, f"where is the {shape} ?", side(scene[shape][1])


def draw(scene, rng: random.Random) -> torch.Tensor:
    image = torch.rand(3, GRID * CELL, GRID * CELL) * 0.1
    yy, xx = torch.meshgrid(torch.arange(CELL), torch.arange(CELL), indexing="ij")
    circle = ((yy - 3.5) ** 2 + (xx - 3.5) ** 2) <= 3.6 ** 2
    square = (yy >= 1) & (yy <= 6) & (xx >= 1) & (xx <= 6)
    for shape, (colour, cell) in scene.items():
        mask = circle if shape == "circle" else square
        top, left = (cell // GRID) * CELL, (cell % GRID) * CELL
        jitter = 0.85 + 0.15 * rng.random()
        patch = image[:, top:top + CELL, left:left + CELL]
        for channel, value in enumerate(COLOURS[colour]):
            patch[channel][mask] = value * jitter
    return image


def text_corpus(count: int, rng: random.Random):
    """(prompt, answer) pairs of plain text: what the stand-in LLM learns before it gets eyes."""
    pairs = []
    for _ in range(count):
        scene = random_scene(rng)
        shape, ask, answer = question(scene, rng)
        fact = f"{shape} {scene[shape][0]} {side(scene[shape][1])}"
        kind = rng.random()
        if kind < 0.4:
            pairs.append((f"{describe(scene, rng)} {ask} answer :", answer))
        elif kind < 0.8:
            pairs.append((f"{ask} {fact} answer :", answer))
        else:
            pairs.append((f"{describe(scene, rng)} describe the image ? answer :", describe(scene, rng)))
    return pairs


def pretrain_llm(llm, tok, steps: int, batch_size: int, rng: random.Random, lr: float = 3e-3):
    """Teach the LLM the task's language (loss on the answers only), then freeze it."""
    optimizer = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    llm.train()
    for step in range(steps):
        pairs = text_corpus(batch_size, rng)
        rows = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
        answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in pairs]
        width = max(len(r) + len(a) for r, a in zip(rows, answers))
        ids = torch.full((batch_size, width), tok.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (r, a) in enumerate(zip(rows, answers)):
            ids[i, :len(r) + len(a)] = torch.tensor(r + a)
            labels[i, len(r):len(r) + len(a)] = torch.tensor(a)
            mask[i, :len(r) + len(a)] = 1
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 200 == 0:
            print(f"  text pre-training step {step + 1}/{steps}: loss {loss.item():.3f}")
    return llm.eval().requires_grad_(False)


def make_split(count: int, rng: random.Random):
    scenes = [random_scene(rng) for _ in range(count)]
    images = torch.stack([draw(s, rng) for s in scenes])
    return scenes, images


def batches(processor, scenes, features, batch_size, rng: random.Random, task: str):
    """Shuffled training batches: captions (stage 1) or questions (stage 2), with precomputed image features."""
    order = list(range(len(scenes)))
    rng.shuffle(order)
    out = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        if task == "caption":
            prompts = ["<img> describe the image ?"] * len(idx)
            answers = [describe(scenes[i], rng) for i in idx]
        else:
            asked = [question(scenes[i], rng) for i in idx]
            prompts = [f"<img> {q}" for _, q, _ in asked]
            answers = [a for _, _, a in asked]
        batch = processor(prompts, answers)
        batch["image_features"] = features[idx]
        out.append(batch)
    return out


@torch.no_grad()
def accuracy(model, processor, scenes, features, schedule, rng: random.Random, batch_size=256):
    """Greedy accuracy of the answer word; per question kind."""
    hits = {"colour": [0, 0], "side": [0, 0]}
    for start in range(0, len(scenes), batch_size):
        chunk = range(start, min(start + batch_size, len(scenes)))
        asked = [question(scenes[i], rng) for i in chunk]
        batch = processor([f"<img> {q}" for _, q, _ in asked])
        tokens = model.generate(**batch, image_features=features[list(chunk)], schedule=schedule,
                                max_new_tokens=1, do_sample=False)
        for (_, q, answer), word in zip(asked, processor.decode(tokens)):
            kind = "colour" if q.startswith("what colour") else "side"
            hits[kind][0] += int(word.strip() == answer)
            hits[kind][1] += 1
    total = sum(h[0] for h in hits.values()) / sum(h[1] for h in hits.values())
    return total, {k: h[0] / max(1, h[1]) for k, h in hits.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=3072)
    parser.add_argument("--test-images", type=int, default=1024)
    parser.add_argument("--text-steps", type=int, default=800)
    parser.add_argument("--stage1-steps", type=int, default=400)
    parser.add_argument("--stage2-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    began = time.time()

    tok = word_tokenizer(WORDS)
    processor = LMEyeProcessor(tok, num_image_tokens=(GRID * GRID) + 1, num_requests=REQUESTS,
                               response_prefix="answer :")
    print(f"1/4 pre-training the stand-in LLM on the task's text ({args.text_steps} steps)")
    llm = tiny_llm("llama", len(tok), hidden=96, layers=3, heads=4)
    llm = pretrain_llm(llm, tok, args.text_steps, args.batch_size, rng)

    vision = tiny_clip(image_size=GRID * CELL, patch_size=CELL, hidden=64, layers=2, heads=4).eval()
    config = processor.make_config(interaction_dim=64, num_heads=4, sub_features=1)
    model = LMEyeModel(llm, config, vision=vision)

    train_scenes, train_images = make_split(args.train_images, rng)
    test_scenes, test_images = make_split(args.test_images, rng)
    with torch.no_grad():  # the vision tower is frozen: its features are computed once
        train_features = model.image_features(train_images)
        test_features = model.image_features(test_images)

    print(f"2/4 stage 1: static mapping on captions ({args.stage1_steps} steps)")
    model.set_stage(1)
    model.special_embed.requires_grad_(True)
    caption_batches = batches(processor, train_scenes, train_features, args.batch_size, rng, "caption")
    train(model, caption_batches, args.stage1_steps, lr=3e-3, warmup_steps=50, schedule="static",
          description="stage 1")
    model.eval()
    caption_acc, caption_kinds = accuracy(model, processor, test_scenes, test_features, "static", rng)

    question_batches = batches(processor, train_scenes, train_features, args.batch_size, rng, "question")
    print(f"3/4 baseline: the static-only model trained on the questions as well ({args.stage2_steps} steps)")
    static_model = copy.deepcopy(model).set_stage(1)
    static_model.special_embed.requires_grad_(True)
    train(static_model, question_batches, args.stage2_steps, lr=3e-3, warmup_steps=50, schedule="static",
          description="static-only")
    static_model.eval()
    static_acc, static_kinds = accuracy(static_model, processor, test_scenes, test_features, "static", rng)

    print(f"4/4 stage 2: IPN on the questions, single-pass schedule ({args.stage2_steps} steps)")
    model.set_stage(2, train_special_tokens=True)
    train(model, question_batches, args.stage2_steps, lr=3e-3, warmup_steps=50, schedule="single_pass",
          description="stage 2")
    model.eval()
    ipn_acc, ipn_kinds = accuracy(model, processor, test_scenes, test_features, "single_pass", rng)

    print("held-out accuracy (greedy answer word)")
    chance = 0.5 * (1 / len(COLOURS)) + 0.5 * (1 / len(SIDES))
    print(f"  chance                     {chance:6.1%}   (colour 25.0%, side 50.0%)")
    for name, (acc, kinds) in (("static only, stage 1", (caption_acc, caption_kinds)),
                               ("static only, + questions", (static_acc, static_kinds)),
                               ("LMEye (static + IPN)", (ipn_acc, ipn_kinds))):
        print(f"  {name:26s} {acc:6.1%}   (colour {kinds['colour']:.1%}, side {kinds['side']:.1%})")
    print(f"  total time {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
