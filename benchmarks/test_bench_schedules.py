"""End to end: the static-only model, LMEye on one pass over a KV cache, and LMEye's two passes.

Cases, each for the providers ``static-only``, ``lmeye-two-pass`` and ``lmeye-single-pass``:

- ``prefill``: the forward of a prompt batch (inference, suffix logits);
- ``train-step``: forward + backward with a trainable prefix (static mapping
  and special-token embeddings) and the IPN;
- ``train-step-frozen-prefix``: forward + backward with only the IPN trainable
  (no static-only row: nothing of it would train);
- ``generate``: greedy generation of a fixed number of new tokens, reported
  as tokens per second;
- ``ipn-share``: the IPN's own forward + backward, as a share of the
  single-pass training step.

On a GPU the shape is Llama-3.2-1B-like (2048 wide, 16 layers, 32 heads, 8 KV
heads, vocabulary 128256), bfloat16, B=8, T=1024, 256 image tokens (1024 wide),
prefix 801 (the request at column 800), R=5 slots, random weights. On the CPU a
512-wide, 8-layer float32 Llama (8 heads, 4 KV heads, vocabulary 4096), B=2,
T=384, 64 image tokens, prefix 300: the LLM's work dominates there as on a GPU,
and the suite takes about a minute and a half on 2 cores. Wall time per call,
synchronised inside the timed function; the end-of-run summary puts these
cases first (``harness.format_schedules``).
"""

from __future__ import annotations

import dataclasses

import harness
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmeye_fast.models import LMEyeConfig, LMEyeModel

SUITE = "schedules"
PROVIDERS = {harness.STATIC_ONLY: "static", harness.TWO_PASS: "two_pass", harness.SINGLE_PASS: "single_pass"}


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    dtype: torch.dtype
    B: int
    T: int
    prefix: int
    image_tokens: int
    vision_dim: int
    requests: int
    answer: int
    new_tokens: int
    llm: dict
    interaction_dim: int = 768
    heads: int = 12
    rounds: int = 7
    warmup: int = 2


GPU = Case("llama-2048x16 B=8 T=1024 P=801", torch.bfloat16, B=8, T=1024, prefix=801, image_tokens=256,
           vision_dim=1024, requests=5, answer=64, new_tokens=32,
           llm=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                    tie_word_embeddings=True))
# On the CPU, a Llama large enough that its layers, not the fixed cost of a call, take the time,
# as they do on a GPU: at a 64-wide, 2-layer toy size the overheads hid the single pass's saving.
CPU = Case("llama-512x8 B=2 T=384 P=300", torch.float32, B=2, T=384, prefix=300, image_tokens=64,
           vision_dim=256, requests=5, answer=32, new_tokens=16, interaction_dim=128, heads=4, rounds=3, warmup=1,
           llm=dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512))


def build(case: Case, dev: torch.device):
    config = LlamaConfig(**case.llm, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(dev):
        llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=case.dtype)
    vocab = case.llm["vocab_size"]
    lmeye = LMEyeConfig(num_image_tokens=case.image_tokens, num_requests=case.requests,
                        interaction_dim=case.interaction_dim, num_heads=case.heads, vision_dim=case.vision_dim,
                        image_token_id=vocab - 3, request_token_id=vocab - 2, slot_token_id=vocab - 1,
                        pad_token_id=0, vocab_size=vocab)
    model = LMEyeModel(llm, lmeye).to(dtype=case.dtype).eval()
    return model


def make_batch(case: Case, dev: torch.device) -> dict:
    """The processor's layout without a tokenizer: rows of different lengths, left-padded prefix, right-padded suffix."""
    vocab = case.llm["vocab_size"]
    B, T, P, N, R = case.B, case.T, case.prefix, case.image_tokens, case.requests
    ids = torch.randint(3, vocab - 3, (B, T), device=dev)
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    labels = torch.full((B, T), -100, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)
    left = rows * max(1, (P - N - 2) // (4 * B))
    right = rows * max(1, (T - P - R - case.answer) // (2 * B))
    cols = torch.arange(T, device=dev)
    mask[(cols < left[:, None]) | (cols >= T - right[:, None])] = 0
    ids[mask == 0] = 0
    image_pos = left[:, None] + 1 + torch.arange(N, device=dev)
    ids[rows[:, None], image_pos] = vocab - 3
    ids[:, P - 1] = vocab - 2
    ids[:, P:P + R] = vocab - 1
    answer = (cols >= T - right[:, None] - case.answer) & (mask == 1)
    labels[answer] = ids[answer]
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                image_pos=image_pos, request_pos=torch.full((B,), P - 1, device=dev),
                slot_pos=P + torch.arange(R, device=dev).expand(B, -1), prefix_len=P, labels=labels,
                image_features=torch.randn(B, N, case.vision_dim, device=dev, dtype=case.dtype))


@pytest.fixture(scope="module")
def setup():
    dev = harness.device()
    case = GPU if dev.type == "cuda" else CPU
    torch.manual_seed(0)
    model = build(case, dev)
    batch = make_batch(case, dev)
    yield case, dev, model, batch
    del model, batch
    harness.release(dev)


def timed(benchmark, fn, case: Case, dev: torch.device) -> float:
    """Median wall seconds per call over ``case.rounds`` rounds, synchronised inside the timed function."""
    def target():
        out = fn()
        harness.sync(dev)
        return out

    benchmark.pedantic(target, rounds=case.rounds, iterations=1, warmup_rounds=case.warmup)
    if benchmark.disabled or benchmark.stats is None:
        pytest.skip("benchmarking is disabled (--benchmark-disable)")
    return benchmark.stats.stats.median


def report(benchmark, case, dev, test_case, provider, seconds, **keys):
    """Record a case; the summary adds the ratios between schedules (``harness.add_schedule_ratios``)."""
    harness.record(benchmark, suite=SUITE, case=test_case, provider=provider, shape=case.label,
                   config=case.label.split(" B=")[0], batch=case.B, dtype=harness.DTYPE_NAMES[case.dtype],
                   device=harness.device_name(dev), wall_us=seconds * 1e6, T=case.T, prefix=case.prefix,
                   image_tokens=case.image_tokens, requests=case.requests, **keys)


def train_step(model, batch, schedule):
    def step():
        loss = model(**batch, schedule=schedule).loss
        loss.backward()
        for p in model.trainable_parameters():
            p.grad = None
        return loss
    return step


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_prefill(benchmark, setup, provider):
    case, dev, model, batch = setup
    schedule = PROVIDERS[provider]

    def prefill():
        with torch.inference_mode():
            return model(**batch, schedule=schedule).logits

    report(benchmark, case, dev, "prefill", provider, timed(benchmark, prefill, case, dev))


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_train_step(benchmark, setup, provider):
    case, dev, model, batch = setup
    schedule = PROVIDERS[provider]
    model.set_stage(1 if schedule == "static" else 2, train_special_tokens=True)
    model.static.requires_grad_(True)  # the static mapping trains too: the prefix is in the graph
    step = train_step(model, batch, schedule)
    seconds = timed(benchmark, step, case, dev)
    report(benchmark, case, dev, "train-step", provider, seconds, peak_mem_mb=harness.peak_memory_mb(step, dev),
           note="static mapping + special embeddings trainable" + ("" if schedule == "static" else " + IPN"))


@pytest.mark.parametrize("provider", [harness.TWO_PASS, harness.SINGLE_PASS])
def test_train_step_frozen_prefix(benchmark, setup, provider):
    case, dev, model, batch = setup
    model.set_stage(2)
    step = train_step(model, batch, PROVIDERS[provider])
    seconds = timed(benchmark, step, case, dev)
    report(benchmark, case, dev, "train-step-frozen-prefix", provider, seconds,
           peak_mem_mb=harness.peak_memory_mb(step, dev), note="IPN trainable only")


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_generate(benchmark, setup, provider):
    case, dev, model, batch = setup
    # The prompt ends with the slots: every row's last column is a real token.
    prompt = {k: (v[:, :case.prefix + case.requests] if k in ("input_ids", "attention_mask", "position_ids")
                  else v) for k, v in batch.items() if k != "labels"}

    def generate():
        return model.generate(**prompt, schedule=PROVIDERS[provider], max_new_tokens=case.new_tokens,
                              min_new_tokens=case.new_tokens, do_sample=False)

    quick = dataclasses.replace(case, rounds=max(2, case.rounds // 2), warmup=1)
    seconds = timed(benchmark, generate, quick, dev)
    report(benchmark, case, dev, "generate", provider, seconds, throughput=case.B * case.new_tokens / seconds,
           throughput_unit="tokens/s", new_tokens=case.new_tokens)


def test_ipn_share(benchmark, setup):
    case, dev, model, batch = setup
    model.set_stage(2)
    P, B = case.prefix, case.B
    hidden = torch.randn(B, P, model.config.llm_dim, device=dev, dtype=case.dtype)
    suffix = torch.randn(B, case.T - P, model.config.llm_dim, device=dev, dtype=case.dtype)
    slots = batch["slot_pos"] - P

    def ipn_step():
        out = model.ipn(hidden, batch["image_features"], suffix, slots, request_pos=batch["request_pos"])
        out[:, :case.requests].float().sum().backward()
        for p in model.ipn.parameters():
            p.grad = None
        return out

    report(benchmark, case, dev, *harness.IPN_SHARE, timed(benchmark, ipn_step, case, dev))
