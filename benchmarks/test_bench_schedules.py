"""End to end: the static-only model, LMEye on one pass over a KV cache, and LMEye's two passes.

Cases, each for the providers ``static-only``, ``lmeye-two-pass`` and ``lmeye-single-pass``:

- ``prefill``: the forward of a prompt batch (inference, suffix logits);
- ``train-step``: forward + backward with a trainable prefix (static mapping
  and special-token embeddings) and the IPN; in its rounds also ``ipn-share``,
  the IPN's own forward + backward, as a share of the single-pass step;
- ``train-step-frozen-prefix``: forward + backward with only the IPN trainable
  (no static-only row: nothing of it would train);
- ``generate``: greedy generation of a fixed number of new tokens, reported
  as tokens per second.

And the released v1 layout (``lmeye_fast.models.released``) on each LLM shape: one ``<img>`` vector,
five ``<img-d>`` slots each transmitted by its own map, one request read at the first slot (no
``<img-q>``: the single pass runs the prefix, probes the first slot on its cache and drops the probe),
special rows as word row plus learned vector; ``prefill`` and ``generate``. Its IPN is the built-in
attention over the five sub-features of the one image vector (the release's frozen CLIP text pass
costs about as little beside the LLM).

And for an encoder-decoder LLM (``LMEyeSeq2SeqModel``, a T5 of its own shape),
``prefill`` and ``train-step`` (static mapping, special-token embeddings and
IPN trainable) for the providers ``seq2seq-two-encoder-passes`` (the
library's schedule: two encoder passes, the decoder once) and
``seq2seq-two-full-passes`` (the naive port of the two-pass original: the
whole encoder-decoder twice, the first decoder pass thrown away). Generation is
not timed: the naive port would differ there by one decoder step.

On a GPU the shape is Llama-3.2-1B-like (2048 wide, 16 layers, 32 heads, 8 KV
heads, vocabulary 128256), bfloat16, B=8, T=1024, 256 image tokens (1024 wide),
prefix 801 (the request at column 800), R=5 slots, random weights. On the CPU a
512-wide, 8-layer float32 Llama (8 heads, 4 KV heads, vocabulary 4096), B=2,
T=384, 64 image tokens, prefix 300: the LLM's work dominates there as on a GPU. The T5 is
FlanT5-XL-like on a GPU (2048 wide, 24 + 24 layers, 32 heads of 64, gated-GELU 5120, vocabulary
32128), bfloat16, B=8, an encoder input of 512 tokens with 256 image tokens (1024 wide), R=5,
answers of 32 tokens; on the CPU 512 wide, 4 + 4 layers (8 heads of 64, 1024 feed-forward,
vocabulary 4096), float32, B=2, 320 input tokens with 64 image tokens (256 wide), answers of 32.

Each test times its case's providers together, in interleaved rounds
(``harness.time_interleaved``: 7 rounds after a warm-up, each running every
provider once in rotating order; on the CPU on one thread, with the process
CPU time beside the wall time), so that a ratio between providers is taken
within a round; the end-of-run summary puts these cases first
(``harness.format_schedules``). ``benchmarks/schedules_under_load.py`` runs
this file idle and beside a competing process and compares the two.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Tuple

import harness
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

from lmeye_fast.models import IGNORE_INDEX, LMEyeConfig, LMEyeModel, LMEyeSeq2SeqModel

SUITE = "schedules"
PROVIDERS = {harness.STATIC_ONLY: "static", harness.TWO_PASS: "two_pass", harness.SINGLE_PASS: "single_pass"}


@dataclasses.dataclass(frozen=True)
class Case:
    """A decoder-only case; the sizes are keywords (``Seq2SeqCase`` has the same ones but the prefix and
    the generated tokens)."""

    label: str
    dtype: torch.dtype
    _: dataclasses.KW_ONLY
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
    rounds: int = 7  # interleaved rounds after ``warmup`` untimed ones (harness.time_interleaved)
    warmup: int = 2
    released_v1: bool = False  # the released v1 layout: the request at the first of ``slots`` slots
    slots: int = 0  # K, when it differs from the requests
    RECORDED: ClassVar[Tuple[str, ...]] = ("T", "prefix", "image_tokens", "requests")  # in each summary row

    @property
    def num_slots(self) -> int:
        return self.slots or self.requests

GPU = Case("llama-2048x16 B=8 T=1024 P=801", torch.bfloat16, B=8, T=1024, prefix=801, image_tokens=256,
           vision_dim=1024, requests=5, answer=64, new_tokens=32,
           llm=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                    tie_word_embeddings=True))
# On the CPU, a Llama large enough that its layers, not the fixed cost of a call, take the time,
# as they do on a GPU: at a 64-wide, 2-layer toy size the overheads hid the single pass's saving.
CPU = Case("llama-512x8 B=2 T=384 P=300", torch.float32, B=2, T=384, prefix=300, image_tokens=64,
           vision_dim=256, requests=5, answer=32, new_tokens=16, interaction_dim=128, heads=4, warmup=1,
           llm=dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512))


def v1_case(case: Case) -> Case:
    """``case``'s LLM and lengths in the released v1 layout."""
    return dataclasses.replace(case, label=case.label.replace(" B=", " v1-layout B="), released_v1=True,
                               image_tokens=1, requests=1, slots=5)


GPU_V1, CPU_V1 = v1_case(GPU), v1_case(CPU)


def build(case: Case, dev: torch.device):
    config = LlamaConfig(**case.llm, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(dev):
        llm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=case.dtype)
    vocab = case.llm["vocab_size"]
    layout = dict(num_slots=case.num_slots, transmission="per_slot", sub_features=case.num_slots,
                  request_position="first_slot", special_rows="add") if case.released_v1 else {}
    lmeye = LMEyeConfig(num_image_tokens=case.image_tokens, num_requests=case.requests,
                        interaction_dim=case.interaction_dim, num_heads=case.heads, vision_dim=case.vision_dim,
                        image_token_id=vocab - 3, request_token_id=vocab - 2, slot_token_id=vocab - 1,
                        pad_token_id=0, vocab_size=vocab, **layout)
    model = LMEyeModel(llm, lmeye).to(dtype=case.dtype).eval()
    return model


def make_batch(case: Case, dev: torch.device) -> dict:
    """The processor's layout without a tokenizer: rows of different lengths, left-padded prefix, right-padded suffix."""
    vocab = case.llm["vocab_size"]
    B, T, P, N, R = case.B, case.T, case.prefix, case.image_tokens, case.num_slots
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
    if not case.released_v1:  # v1 has no <img-q>: the request is read at the first slot
        ids[:, P - 1] = vocab - 2
    ids[:, P:P + R] = vocab - 1
    answer = (cols >= T - right[:, None] - case.answer) & (mask == 1)
    labels[answer] = ids[answer]
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                image_pos=image_pos, request_pos=torch.full((B,), P if case.released_v1 else P - 1, device=dev),
                slot_pos=P + torch.arange(R, device=dev).expand(B, -1), prefix_len=P, labels=labels,
                image_features=torch.randn(B, N, case.vision_dim, device=dev, dtype=case.dtype))


def prepared(gpu_case, cpu_case, build_model, build_batch, check=None):
    """Yield (case, device, model, batch) for this machine's case, then free them: the body of a
    module fixture. ``check(model, batch)`` runs before any timing."""
    dev = harness.device()
    case = gpu_case if dev.type == "cuda" else cpu_case
    torch.manual_seed(0)
    model, batch = build_model(case, dev), build_batch(case, dev)
    if check is not None:
        check(model, batch)
    yield case, dev, model, batch
    del model, batch
    harness.release(dev)


@pytest.fixture(scope="module")
def setup():
    yield from prepared(GPU, CPU, build, make_batch)


def timed(benchmark, calls, case: Case, dev: torch.device) -> harness.RoundTimes:
    """``calls`` (``harness.ProviderCall``) timed in ``case.rounds`` interleaved rounds."""
    return harness.time_interleaved(benchmark, calls, dev, rounds=case.rounds, warmup=case.warmup)


def peak_memory(calls, dev: torch.device) -> dict:
    """{provider: {"peak_mem_mb": ...}} of one call each (nothing on the CPU)."""
    peaks = {}
    for call in calls:
        if call.prepare is not None:
            call.prepare()
        peaks[call.provider] = {"peak_mem_mb": harness.peak_memory_mb(call.run, dev)}
    return peaks


def report(benchmark, case, dev, test_case, times: harness.RoundTimes, keys=None):
    """Record a summary row per provider timed; the summary adds the ratios between schedules
    (``harness.add_schedule_ratios``). ``keys[provider]``: more keys of its row (``case`` among them
    overrides ``test_case``). The decoder-only case records its prefix, the encoder-decoder one its
    answer length."""
    sizes = {name: getattr(case, name) for name in case.RECORDED}
    rows = []
    for provider in times.wall_s:
        extra = dict(times.keys(provider), **(keys or {}).get(provider, {}))
        rows.append(harness.row_info(suite=SUITE, case=extra.pop("case", test_case), provider=provider,
                                     shape=case.label, config=case.label.split(" B=")[0], batch=case.B,
                                     dtype=harness.DTYPE_NAMES[case.dtype], device=harness.device_name(dev),
                                     **sizes, **extra))
    harness.record_rows(benchmark, rows)


def merged(*per_provider: dict) -> dict:
    """{provider: keys} dicts merged provider by provider."""
    out: dict = {}
    for keys in per_provider:
        for provider, values in keys.items():
            out.setdefault(provider, {}).update(values)
    return out


def train_step(model, batch, schedule):
    def step():
        loss = model(**batch, schedule=schedule).loss
        loss.backward()
        for p in model.trainable_parameters():
            p.grad = None
        return loss
    return step


@pytest.fixture(scope="module")
def v1_setup():
    yield from prepared(GPU_V1, CPU_V1, build, make_batch)


@pytest.fixture(params=["default", "released-v1"])
def any_setup(request):
    """The default layout's model and batch, or the released v1 layout's."""
    return request.getfixturevalue("setup" if request.param == "default" else "v1_setup")


def test_prefill(benchmark, any_setup):
    case, dev, model, batch = any_setup

    def prefill(schedule):
        def run():
            with torch.inference_mode():
                return model(**batch, schedule=schedule).logits
        return run

    calls = [harness.ProviderCall(provider, prefill(schedule)) for provider, schedule in PROVIDERS.items()]
    report(benchmark, case, dev, "prefill", timed(benchmark, calls, case, dev))


def test_train_step(benchmark, setup):
    """The three schedules' steps with the prefix trainable, and in the same rounds the IPN's own
    forward + backward (its share of the single-pass step is a ratio within a round too)."""
    case, dev, model, batch = setup

    def stage(schedule):
        def prepare():
            model.set_stage(1 if schedule == "static" else 2, train_special_tokens=True)
            model.static.requires_grad_(True)  # the static mapping trains too: the prefix is in the graph
        return prepare

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

    ipn_case, ipn_provider = harness.IPN_SHARE
    calls = [harness.ProviderCall(provider, train_step(model, batch, schedule), stage(schedule))
             for provider, schedule in PROVIDERS.items()]
    calls.append(harness.ProviderCall(ipn_provider, ipn_step, lambda: model.set_stage(2)))
    times = timed(benchmark, calls, case, dev)
    notes = {provider: {"note": "static mapping + special embeddings trainable"
                        + ("" if schedule == "static" else " + IPN")} for provider, schedule in PROVIDERS.items()}
    notes[ipn_provider] = {"case": ipn_case, "note": "IPN forward + backward alone"}
    report(benchmark, case, dev, "train-step", times, merged(notes, peak_memory(calls[:-1], dev)))


def test_train_step_frozen_prefix(benchmark, setup):
    case, dev, model, batch = setup
    model.set_stage(2)
    calls = [harness.ProviderCall(provider, train_step(model, batch, PROVIDERS[provider]))
             for provider in (harness.TWO_PASS, harness.SINGLE_PASS)]
    times = timed(benchmark, calls, case, dev)
    notes = {call.provider: {"note": "IPN trainable only"} for call in calls}
    report(benchmark, case, dev, "train-step-frozen-prefix", times, merged(notes, peak_memory(calls, dev)))


def test_generate(benchmark, any_setup):
    case, dev, model, batch = any_setup
    # The prompt ends with the slots: every row's last column is a real token.
    prompt = {k: (v[:, :case.prefix + case.num_slots] if k in ("input_ids", "attention_mask", "position_ids")
                  else v) for k, v in batch.items() if k != "labels"}

    def generate(schedule):
        def run():
            return model.generate(**prompt, schedule=schedule, max_new_tokens=case.new_tokens,
                                  min_new_tokens=case.new_tokens, do_sample=False)
        return run

    calls = [harness.ProviderCall(provider, generate(schedule)) for provider, schedule in PROVIDERS.items()]
    times = timed(benchmark, calls, case, dev)
    tokens = case.B * case.new_tokens
    report(benchmark, case, dev, "generate", times,
           {p: dict(throughput=tokens / (times.keys(p)["wall_us"] * 1e-6), throughput_unit="tokens/s",
                    new_tokens=case.new_tokens) for p in PROVIDERS})


# ---- encoder-decoder: two encoder passes + one decoder against two full encoder-decoder passes ----

SEQ2SEQ_SCHEDULES = {harness.SEQ2SEQ_NAIVE: "naive", harness.SEQ2SEQ: "two_pass"}


@dataclasses.dataclass(frozen=True)
class Seq2SeqCase(Case):
    """An encoder-decoder case: T is the encoder's input, ``answer`` the decoder's length."""

    prefix: int = 0
    new_tokens: int = 0
    RECORDED: ClassVar[Tuple[str, ...]] = ("T", "answer", "image_tokens", "requests")

T5_SHAPE = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
GPU_SEQ2SEQ = Seq2SeqCase("t5-2048x24+24 B=8 T=512 L=32", torch.bfloat16, B=8, T=512, image_tokens=256,
                          vision_dim=1024, requests=5, answer=32,
                          llm=dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                                   num_decoder_layers=24, num_heads=32, **T5_SHAPE))
CPU_SEQ2SEQ = Seq2SeqCase("t5-512x4+4 B=2 T=320 L=32", torch.float32, B=2, T=320, image_tokens=64, vision_dim=256,
                          requests=5, answer=32, interaction_dim=128, heads=4, warmup=1,
                          llm=dict(vocab_size=4096, d_model=512, d_kv=64, d_ff=1024, num_layers=4,
                                   num_decoder_layers=4, num_heads=8, **T5_SHAPE))


def build_seq2seq(case: Seq2SeqCase, dev: torch.device) -> LMEyeSeq2SeqModel:
    config = T5Config(**case.llm, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.device(dev):
        llm = AutoModelForSeq2SeqLM.from_config(config, dtype=case.dtype)
    vocab = case.llm["vocab_size"]
    lmeye = LMEyeConfig(num_image_tokens=case.image_tokens, num_requests=case.requests,
                        interaction_dim=case.interaction_dim, num_heads=case.heads, vision_dim=case.vision_dim,
                        image_token_id=vocab - 3, request_token_id=vocab - 2, slot_token_id=vocab - 1,
                        pad_token_id=0, eos_token_id=1, vocab_size=vocab, schedule="two_pass", encoder_decoder=True)
    return LMEyeSeq2SeqModel(llm, lmeye).to(dtype=case.dtype).eval()


def make_seq2seq_batch(case: Seq2SeqCase, dev: torch.device) -> dict:
    """The encoder-decoder layout without a tokenizer: right-padded encoder rows of different lengths,
    the image after a word, <img-q> and the slots after the instruction; right-padded answers."""
    vocab = case.llm["vocab_size"]
    B, T, N, R, L = case.B, case.T, case.image_tokens, case.requests, case.answer
    rows, cols = torch.arange(B, device=dev), torch.arange(T, device=dev)
    length = T - rows * max(1, (T - N - R - 8) // (2 * B))
    ids = torch.randint(3, vocab - 3, (B, T), device=dev)
    mask = (cols < length[:, None]).long()
    ids[mask == 0] = 0
    image_pos = 1 + torch.arange(N, device=dev).expand(B, -1)
    ids[rows[:, None], image_pos] = vocab - 3
    request_pos = length - R - 4  # after the slots: two words of response prefix and EOS
    ids[rows, request_pos] = vocab - 2
    slot_pos = request_pos[:, None] + 1 + torch.arange(R, device=dev)
    ids[rows[:, None], slot_pos] = vocab - 1
    labels = torch.randint(3, vocab - 3, (B, L), device=dev)
    labels[(torch.arange(L, device=dev) >= L - rows[:, None] * (L // (2 * B)))] = IGNORE_INDEX
    return dict(input_ids=ids, attention_mask=mask, image_pos=image_pos, request_pos=request_pos, slot_pos=slot_pos,
                labels=labels, image_features=torch.randn(B, N, case.vision_dim, device=dev, dtype=case.dtype))


def two_full_passes(model: LMEyeSeq2SeqModel, batch: dict):
    """The naive port of the two-pass original: the whole encoder-decoder reads the request (its decoder
    output unused), then runs again on the filled sequence. Returns (logits, loss)."""
    embeds = model.mapped_embeds(batch["input_ids"], batch["image_features"], batch["image_pos"])
    decoder_ids = model.decoder_inputs(batch["labels"])
    common = dict(attention_mask=batch["attention_mask"], decoder_input_ids=decoder_ids, use_cache=False)
    hidden = model.llm(inputs_embeds=embeds, **common).encoder_last_hidden_state
    filled = model.ipn(hidden, batch["image_features"], embeds, batch["slot_pos"], request_pos=batch["request_pos"])
    logits = model.llm(inputs_embeds=filled, **common).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    return logits, loss


def run_seq2seq(model, batch, provider):
    if SEQ2SEQ_SCHEDULES[provider] == "naive":
        return two_full_passes(model, batch)
    out = model(**batch, schedule="two_pass")
    return out.logits, out.loss


@torch.no_grad()
def same_logits(model, batch):
    harness.check_close(run_seq2seq(model, batch, harness.SEQ2SEQ)[0],
                        run_seq2seq(model, batch, harness.SEQ2SEQ_NAIVE)[0], "two encoder passes vs two full passes")


@pytest.fixture(scope="module")
def seq2seq_setup():
    yield from prepared(GPU_SEQ2SEQ, CPU_SEQ2SEQ, build_seq2seq, make_seq2seq_batch, check=same_logits)


def test_seq2seq_prefill(benchmark, seq2seq_setup):
    case, dev, model, batch = seq2seq_setup

    def prefill(provider):
        def run():
            with torch.inference_mode():
                return run_seq2seq(model, batch, provider)[0]
        return run

    calls = [harness.ProviderCall(provider, prefill(provider)) for provider in harness.SEQ2SEQ_PROVIDERS]
    report(benchmark, case, dev, "prefill", timed(benchmark, calls, case, dev))


def test_seq2seq_train_step(benchmark, seq2seq_setup):
    case, dev, model, batch = seq2seq_setup
    model.set_stage(2, train_special_tokens=True)
    model.static.requires_grad_(True)

    def step(provider):
        def run():
            loss = run_seq2seq(model, batch, provider)[1]
            loss.backward()
            for p in model.trainable_parameters():
                p.grad = None
            return loss
        return run

    calls = [harness.ProviderCall(provider, step(provider)) for provider in harness.SEQ2SEQ_PROVIDERS]
    times = timed(benchmark, calls, case, dev)
    notes = {call.provider: {"note": "static mapping + special embeddings + IPN trainable"} for call in calls}
    report(benchmark, case, dev, "train-step", times, merged(notes, peak_memory(calls, dev)))
