"""Multiple choice by likelihood: K options on one shared prefix against K full runs.

    python benchmarks/choice_scoring.py                 # CPU, 512-wide 8-layer Llama, K=4
    python benchmarks/choice_scoring.py --device cuda --hidden 2048 --layers 16

Providers, each scoring the same B questions of K options (random weights,
float32 on the CPU):

- ``shared``: ``score_options``: the prefix, the IPN and the slots once per
  question, the K answers as short continuations on the cache;
- ``single-pass xK``: K forwards of the single-pass schedule, one per option
  (B rows each), as a harness that scores (context, continuation) pairs would;
- ``single-pass B*K rows``: the same K x B rows in one batched forward;
- ``two-pass xK``: K forwards of the published two-pass schedule.

Wall time per call, median over rounds (the machine may be shared: medians,
and the thread count is printed).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmeye_fast.models import LMEyeModel, LMEyeProcessor
from lmeye_fast.models.scoring import answer_log_likelihood, score_options
from lmeye_fast.models.tiny import word_tokenizer


def build(args, device):
    words = [f"w{i}" for i in range(args.vocab - 8)]
    processor = LMEyeProcessor(word_tokenizer(words), num_image_tokens=args.image_tokens,
                               num_requests=args.requests, response_prefix="w0 w1")
    config = LlamaConfig(vocab_size=len(processor), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    lmeye = processor.make_config(interaction_dim=256, num_heads=4, vision_dim=args.vision_dim)
    return processor, LMEyeModel(llm, lmeye).to(device).eval(), words


def questions(args, words, rng):
    prompts = [" ".join(rng.choices(words, k=args.prompt_words)) for _ in range(args.batch)]
    options = [[" ".join(rng.choices(words, k=rng.randint(1, args.answer_words))) for _ in range(args.options)]
               for _ in range(args.batch)]
    return prompts, options


def median_seconds(call, rounds, warmup, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4, help="questions per call")
    parser.add_argument("--options", type=int, default=4, help="K")
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--vision-dim", type=int, default=256)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--answer-words", type=int, default=3, help="each option has 1..this many tokens")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    processor, model, words = build(args, device)
    prompts, options = questions(args, words, rng)
    image = torch.randn(args.batch, args.image_tokens, args.vision_dim, device=device)
    per_option = [processor(prompts, [choices[k] for choices in options]).to(device) for k in range(args.options)]
    rows = processor([p for p in prompts for _ in range(args.options)],
                     [o for choices in options for o in choices]).to(device)
    image_rows = image.repeat_interleave(args.options, dim=0)

    def separate(schedule):
        return lambda: [answer_log_likelihood(model, {**batch, "image_features": image}, schedule)
                        for batch in per_option]

    providers = {
        "shared": lambda: score_options(model, processor, prompts, options, image_features=image),
        f"single-pass x{args.options}": separate("single_pass"),
        f"single-pass B*{args.options} rows": lambda: answer_log_likelihood(
            model, {**rows, "image_features": image_rows}, "single_pass"),
        f"two-pass x{args.options}": separate("two_pass"),
    }
    prefix = per_option[0]["prefix_len"]
    print(f"llama {args.hidden}x{args.layers}, vocab {len(processor)}, B={args.batch} questions x K={args.options} "
          f"options, prefix {prefix} tokens, {args.requests} slots, answers 1-{args.answer_words} tokens, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.rounds}")
    with torch.no_grad():
        timings = {name: median_seconds(call, args.rounds, args.warmup, device) for name, call in providers.items()}
    shared = timings["shared"]
    print("| provider | ms per call | shared is faster by |")
    print("|---|---:|---:|")
    for name, seconds in timings.items():
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / shared:.2f}x |")


if __name__ == "__main__":
    main()
