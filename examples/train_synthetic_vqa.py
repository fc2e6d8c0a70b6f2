"""LMEye learns to look: a synthetic visual-question task, trained on the CPU over several seeds.

Each image is a 32x32 canvas on a 4x4 grid with two shapes (a circle and a
square) of two different colours in two different cells. Questions ask for the
colour of one shape or the side (left/right) it is on, so the answer depends on
the instruction, not on the image alone.

Per seed:

1. A tiny Llama-shaped LLM (or, with ``--llm t5``, a tiny FlanT5-shaped
   encoder-decoder: the prompt in the encoder, the answer from the decoder) is
   trained on the task's text alone — scene descriptions, questions about
   them, descriptions of the image — standing in for a pretrained LLM, and
   frozen.
2. A tiny random CLIP model (frozen) gives the image features.
3. Stage 1 trains the static mapping on captioning (the image -> its
   description): the static-only model.
4. Baseline: a copy of the static-only model whose static mapping (and
   special-token embeddings) go on training on the questions, as long as
   stage 2 does.
5. Stage 2 trains the IPN (and the <img-q>/<img-d> embeddings) on the
   questions, static mapping frozen, with the single-pass schedule (the
   two-pass one on T5: two encoder passes, one decoder pass).

in three settings (``lmeye_fast.models.published``, ``global_token`` and ``patch_tokens``):

``published``
    LMEye as released: the LLM sees one <img> token (CLIP's projected image
    embedding); the IPN decomposes that embedding into 5 sub-features and its
    5 requests meet them in the frozen CLIP text encoder.
``global_token``
    The LLM sees the same one <img> token as published; the IPN's 5 requests
    attend over all 17 CLIP tokens (patches and class token), so whatever the
    one global vector leaves out reaches the LLM only through the IPN.
``patch_tokens``
    The static mapping and the IPN both read all 17 CLIP tokens; the requests
    attend over them.

Held-out accuracy (greedy decoding of the answer word) is printed per seed and
as mean ± sample std over the seeds.

    python examples/train_synthetic_vqa.py                 # 5 seeds, every setting, one process
    python examples/train_synthetic_vqa.py --jobs 2        # the same numbers, two seeds at a time
    python examples/train_synthetic_vqa.py --json out.json # also write every number
    python examples/train_synthetic_vqa.py --llm t5        # the same on a tiny T5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import random
import time

import torch

from lmeye_fast.models import global_token, patch_tokens, published, train
from lmeye_fast.models.tiny import tiny_clip_model, tiny_llm, tiny_seq2seq, word_tokenizer

SHAPES = ("circle", "square")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.25, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIDES = ("left", "right")
WORDS = list(SHAPES) + list(COLOURS) + list(SIDES) + "what colour is the where describe image ? answer :".split()
GRID, CELL = 4, 8


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


def padded(rows, value):
    """Token-id rows right-padded with ``value`` into one tensor, and their mask."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), value)
    mask = torch.zeros(ids.shape, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def text_batch(llm, tok, pairs):
    """A plain-text training batch: a causal LM reads prompt and answer as one row and is scored on the
    answer; an encoder-decoder reads the prompt and decodes the answer."""
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in pairs]
    if llm.config.is_encoder_decoder:
        ids, mask = padded([r + [tok.eos_token_id] for r in rows], tok.pad_token_id)
        return dict(input_ids=ids, attention_mask=mask, labels=padded(answers, -100)[0])
    ids, mask = padded([r + a for r, a in zip(rows, answers)], tok.pad_token_id)
    labels = padded([[-100] * len(r) + a for r, a in zip(rows, answers)], -100)[0]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def pretrain_llm(llm, tok, steps: int, batch_size: int, rng: random.Random, lr: float = 3e-3):
    """Teach the LLM the task's language (loss on the answers only), then freeze it."""
    optimizer = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    llm.train()
    for step in range(steps):
        loss = llm(**text_batch(llm, tok, text_corpus(batch_size, rng))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
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
        batch.update({name: value[idx] for name, value in features.items()})
        out.append(batch)
    return out


@torch.no_grad()
def accuracy(model, processor, scenes, features, schedule, rng: random.Random, batch_size=256):
    """Greedy accuracy of the answer word: {"overall", "colour", "side"}."""
    hits = {"colour": [0, 0], "side": [0, 0]}
    for start in range(0, len(scenes), batch_size):
        chunk = list(range(start, min(start + batch_size, len(scenes))))
        asked = [question(scenes[i], rng) for i in chunk]
        batch = processor([f"<img> {q}" for _, q, _ in asked])
        tokens = model.generate(**batch, **{name: value[chunk] for name, value in features.items()},
                                schedule=schedule, max_new_tokens=1, do_sample=False)
        for (_, q, answer), word in zip(asked, processor.decode(tokens)):
            kind = "colour" if q.startswith("what colour") else "side"
            hits[kind][0] += int(word.strip() == answer)
            hits[kind][1] += 1
    result = {kind: h[0] / max(1, h[1]) for kind, h in hits.items()}
    result["overall"] = sum(h[0] for h in hits.values()) / sum(h[1] for h in hits.values())
    return result


SETTINGS = {
    "published": lambda tok, llm, clip, args: published(tok, llm, clip, response_prefix="answer :"),
    "patch_tokens": lambda tok, llm, clip, args: patch_tokens(
        tok, llm, clip, response_prefix="answer :", num_requests=5, interaction_dim=args.interaction_dim,
        num_heads=4),
    "global_token": lambda tok, llm, clip, args: global_token(
        tok, llm, clip, response_prefix="answer :", num_requests=5, interaction_dim=args.interaction_dim,
        num_heads=4),
}
MODELS = ("static only, stage 1", "static only, + questions", "LMEye (static + IPN)")
CHANCE = {"colour": 1 / len(COLOURS), "side": 1 / len(SIDES)}
CHANCE["overall"] = (CHANCE["colour"] + CHANCE["side"]) / 2


def standardise(train_features, test_features):
    """Every feature dimension (per token) to zero mean and unit variance over the training images.

    A pretrained CLIP's embeddings differ from image to image; this random tower's barely do (its
    projected embedding varies by about 6% of its norm between images, a shared component carries
    the rest), which leaves the adapters almost nothing to learn from. The same scaling goes to
    every model compared.
    """
    scaled_train, scaled_test = {}, {}
    for name, features in train_features.items():
        mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
        scaled_train[name], scaled_test[name] = (features - mean) / std, (test_features[name] - mean) / std
    return scaled_train, scaled_test


def run_setting(name, tok, llm, clip, splits, args, rng: random.Random):
    """Stage 1, the static-only baseline and stage 2 in one setting: {model name: accuracies}."""
    processor, model = SETTINGS[name](tok, llm, clip, args)
    (train_scenes, train_images), (test_scenes, test_images) = splits
    with torch.no_grad():  # the vision tower is frozen: its features are computed once
        train_features = model.encode_images(train_images)
        test_features = model.encode_images(test_images)
    train_features, test_features = standardise(train_features, test_features)
    common = dict(lr=args.lr, warmup_steps=min(50, args.stage2_steps // 5), progress=False)

    model.set_stage(1)
    model.special_embed.requires_grad_(True)
    caption_batches = batches(processor, train_scenes, train_features, args.batch_size, rng, "caption")
    train(model, caption_batches, args.stage1_steps, schedule="static", **common)
    model.eval()
    results = {MODELS[0]: accuracy(model, processor, test_scenes, test_features, "static", rng)}

    question_batches = batches(processor, train_scenes, train_features, args.batch_size, rng, "question")
    static_model = copy.deepcopy(model).set_stage(1)
    static_model.special_embed.requires_grad_(True)
    train(static_model, question_batches, args.stage2_steps, schedule="static", **common)
    static_model.eval()
    results[MODELS[1]] = accuracy(static_model, processor, test_scenes, test_features, "static", rng)

    # An encoder-decoder LLM has no single pass (docs/encoder_decoder.md).
    schedule = model.ipn_schedule
    model.set_stage(2, train_special_tokens=True)
    train(model, question_batches, args.stage2_steps, schedule=schedule, **common)
    model.eval()
    results[MODELS[2]] = accuracy(model, processor, test_scenes, test_features, schedule, rng)
    return results


def run_seed(seed, args):
    """Every setting at one seed: {setting: {model: accuracies}}."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = word_tokenizer(WORDS)
    build_llm = tiny_seq2seq if args.llm == "t5" else tiny_llm
    llm = build_llm(args.llm, len(tok), hidden=args.llm_width, layers=2, heads=4)
    llm = pretrain_llm(llm, tok, args.text_steps, args.batch_size, rng)
    clip = tiny_clip_model(image_size=GRID * CELL, patch_size=CELL, hidden=args.vision_width,
                           text_hidden=args.interaction_dim, heads=4).eval()
    splits = make_split(args.train_images, rng), make_split(args.test_images, rng)
    return {name: run_setting(name, tok, llm, clip, splits, args, rng) for name in args.settings}


def run_seed_alone(seed, args):
    """``run_seed`` in a worker process, with the thread count the numbers depend on."""
    torch.set_num_threads(args.threads)
    return run_seed(seed, args)


def each_seed(args):
    """(seed, run_seed's results) in seed order, ``args.jobs`` seeds at a time. Every seed seeds its own
    generators, so the numbers do not depend on ``--jobs``."""
    if args.jobs == 1:
        for seed in args.seeds:
            yield seed, run_seed(seed, args)
        return
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        yield from zip(args.seeds, pool.map(run_seed_alone, args.seeds, [args] * len(args.seeds)))


def mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0)


def summary(per_seed, settings):
    """{setting: {model: {kind: (mean, std)}}} over the seeds."""
    return {setting: {model: {kind: mean_std([seed[setting][model][kind] for seed in per_seed])
                              for kind in ("overall", "colour", "side")} for model in MODELS}
            for setting in settings}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--llm", choices=("llama", "t5"), default="llama",
                        help="the stand-in LLM: a decoder-only Llama or an encoder-decoder (FlanT5-shaped) T5")
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=512)
    parser.add_argument("--text-steps", type=int, default=600)
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--llm-width", type=int, default=64)
    parser.add_argument("--vision-width", type=int, default=64)
    parser.add_argument("--interaction-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: these tiny models run fastest on one, and the numbers depend on it)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run in this many processes at once (give each a core; same numbers)")
    parser.add_argument("--json", default=None, help="write the per-seed results and the summary here")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive number of processes, got {args.jobs}")
    torch.set_num_threads(args.threads)
    began = time.time()
    per_seed = []
    for seed, results in each_seed(args):
        per_seed.append(results)
        for setting, results in per_seed[-1].items():
            line = ", ".join(f"{model} {acc['overall']:.1%}" for model, acc in results.items())
            print(f"seed {seed} {setting}: {line}  ({time.time() - began:.0f} s)", flush=True)
    table = summary(per_seed, args.settings)
    print(f"held-out accuracy over seeds {args.seeds} (mean ± std), {args.llm}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.time() - began:.0f} s")
    for setting, rows in table.items():
        print(f"  {setting}")
        print(f"    {'chance':26s} {CHANCE['overall']:6.1%}          (colour {CHANCE['colour']:.1%}, "
              f"side {CHANCE['side']:.1%})")
        for model, kinds in rows.items():
            cells = {kind: f"{m:.1%} ± {s:.1%}" for kind, (m, s) in kinds.items()}
            print(f"    {model:26s} {cells['overall']:>15s}   (colour {cells['colour']}, side {cells['side']})")
        ipn, static = rows[MODELS[2]]["overall"], rows[MODELS[1]]["overall"]
        print(f"    IPN - static-only on questions: {ipn[0] - static[0]:+.1%} (the larger std is "
              f"{max(ipn[1], static[1]):.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "llm": args.llm, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "chance": CHANCE, "per_seed": per_seed, "summary": table}, f, indent=2)
    return per_seed, table


if __name__ == "__main__":
    main()
