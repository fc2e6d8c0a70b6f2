"""The chat demo for real: ``python -m lmeye_fast.demo`` serving a tiny random LMEye saved to disk on a
free loopback port, driven through ``gradio_client`` (answers equal to ``model.generate``'s, streamed
token by token, the static-only switch, a second turn, bad input answered in words while the server
keeps serving) and through a headless Chromium (upload, ask, the streamed answer and the attention
maps on the page, a screenshot). The engine alone: an encoder-decoder adapter, and interactions
without an attention map.

The server runs under ``timeout``, so it stops by itself even if the test process dies; every wait
is bounded. ``LMEYE_DEMO_SCREENSHOT=PATH`` also writes the browser's screenshot there (the README's
``docs/demo.png``).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

gradio_client = pytest.importorskip("gradio_client", reason="the demo extra: pip install -e '.[demo]'")
pytest.importorskip("gradio", reason="the demo extra: pip install -e '.[demo]'")

from lmeye_fast.demo import ChatEngine, GenerationSettings, chat_turns  # noqa: E402
from lmeye_fast.eval import EvalModel, load_eval_model  # noqa: E402
from saved_tiny_model import save_tiny_model  # noqa: E402

QUESTION = "what colour is the circle ?"
NEW_TOKENS = 8
SERVER_LIFETIME_S = 900  # the server's own limit: longer than this module's tests, so only a dead run meets it
STARTUP_S = 180
# /ask's inputs after the image, question and the two chats: beams, sampling, temperature, top-p,
# max new tokens, the static-only switch.
GREEDY = (1, False, 1.0, 1.0, NEW_TOKENS)


def circle_image(path):
    """A red circle on a blue ground: the picture the page is asked about."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 80), (40, 70, 160))
    ImageDraw.Draw(image).ellipse((24, 16, 72, 64), fill=(220, 30, 30))
    image.save(path)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import GenerationConfig

    root = tmp_path_factory.mktemp("demo")
    _, processor = save_tiny_model(root)
    # Every answer NEW_TOKENS words long, whatever the random weights (some would end at once, with an
    # empty answer): the LLM's own generation defaults, saved with it, as the server and the tests load it.
    settings = GenerationConfig.from_pretrained(root / "llm")
    settings.min_new_tokens = NEW_TOKENS
    tokenizer = processor.tokenizer
    settings.suppress_tokens = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id,
                                processor.image_token_id, processor.request_token_id, processor.slot_token_id]
    settings.save_pretrained(root / "llm")
    circle_image(root / "circle.png")
    (root / "notes.png").write_text("this file is named like an image but holds text\n")
    flags = ["--adapter", str(root / "adapter")]  # the adapter records its models and processor
    return root, flags


@pytest.fixture(scope="module")
def engine(saved):
    root, _ = saved
    return ChatEngine(load_eval_model(root / "adapter"))


@pytest.fixture(scope="module")
def server(saved):
    """The command-line server's URL; it is stopped after the module (and by ``timeout`` at the latest)."""
    root, flags = saved
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = (root / "server.log").open("w")
    process = subprocess.Popen(["timeout", "-s", "KILL", str(SERVER_LIFETIME_S), sys.executable, "-m",
                                "lmeye_fast.demo", *flags, "--port", str(port), "--device", "cpu"],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo server exited ({process.returncode}):\n{(root / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as page:
                    if page.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not answer within {STARTUP_S} s:\n"
                            f"{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


def expected_answer(engine, image_path, question=QUESTION, turns=(), schedule=None):
    """What ``model.generate`` answers, greedy, for the demo's prompt."""
    batch = engine.batch(engine.open_image(image_path), list(turns), question)
    tokens = engine.model.generate(**batch, schedule=schedule, max_new_tokens=NEW_TOKENS, do_sample=False)
    return engine.processor.decode(tokens)[0].strip()


def ask(client, image, question, lmeye=(), static=(), settings=GREEDY, compare=False):
    return client.predict(gradio_client.handle_file(str(image)), question, list(lmeye), list(static), *settings,
                          compare, api_name="/ask")


def test_the_answer_is_model_generates_and_streams_token_by_token(saved, engine, client):
    root, _ = saved
    # The first turn's prompt is the processor's for the question, as a user would call generate.
    pixels = engine.runner.pixels([engine.open_image(root / "circle.png")])
    tokens = engine.model.generate(**engine.processor([QUESTION], images=pixels), max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    expected = engine.processor.decode(tokens)[0].strip()
    assert expected and expected == expected_answer(engine, root / "circle.png")

    job = client.submit(gradio_client.handle_file(str(root / "circle.png")), QUESTION, [], [], *GREEDY, False,
                        api_name="/ask")
    lmeye, static, question, gallery, note = job.result(timeout=300)
    assert chat_turns(lmeye) == [(QUESTION, expected)]
    assert static == [] and question == ""
    # Streamed: the answer grew token by token, every partial answer a beginning of the next.
    partial = [chat_turns(output[0])[-1][1] for output in job.outputs() if output[0]]
    grown = [text for k, text in enumerate(partial) if k == 0 or text != partial[k - 1]]
    assert len(expected.split()) == NEW_TOKENS and grown[-1] == expected and len(grown) >= NEW_TOKENS - 1
    assert all(later.startswith(earlier) for earlier, later in zip(grown, grown[1:]))
    # The attention panel: one map per <img-d> token (3), over CLIP's 4x4 patches.
    assert [item["caption"].split(":")[0] for item in gallery] == ["<img-d> 1", "<img-d> 2", "<img-d> 3"]
    assert all("class token" in item["caption"] for item in gallery)
    assert "4x4 patches" in note


def test_static_switch_and_a_second_turn(saved, engine, client):
    root, _ = saved
    lmeye, static, _, _, _ = ask(client, root / "circle.png", QUESTION, compare=True)
    first = chat_turns(lmeye)
    assert first == [(QUESTION, expected_answer(engine, root / "circle.png"))]
    assert chat_turns(static) == [(QUESTION, expected_answer(engine, root / "circle.png", schedule="static"))]
    # The second question about the same image, after the first answer, in both columns.
    follow_up = "is the square red ?"
    lmeye2, static2, _, _, _ = ask(client, root / "circle.png", follow_up, lmeye, static, compare=True)
    assert chat_turns(lmeye2) == first + [(follow_up, expected_answer(engine, root / "circle.png", follow_up, first))]
    assert chat_turns(static2) == chat_turns(static) + [
        (follow_up, expected_answer(engine, root / "circle.png", follow_up, chat_turns(static), schedule="static"))]


def test_the_second_turn_follows_the_first_answer_as_training_lays_it_out(engine):
    proc = engine.processor
    row = engine.prompt_row([("what colour ?", "red")], "is the square red ?")
    prefix, start = proc.prefix_ids("what colour ?")
    assert (row.prefix, row.image_start) == (prefix, start)
    assert row.body == (proc.response_ids + proc.encode("red") + [proc.eos_token_id]
                        + proc.encode("is the square red ?") + proc.response_ids)


def test_bad_input_is_answered_in_words_and_the_server_keeps_serving(saved, engine, client):
    root, _ = saved
    cases = [
        (dict(image=root / "notes.png", question=QUESTION), "notes.png is not an image file"),
        (dict(image=root / "circle.png", question="   "), "question: empty"),
        (dict(image=root / "circle.png", question=" ".join(["what"] * 300)), "more than the LLM's 256 positions"),
        (dict(image=root / "circle.png", question=QUESTION, settings=(1, False, 1.0, 1.0, 250)),
         "max_new_tokens: .* need more than the LLM's 256 positions"),
        # Gradio's own check of the slider's range (the page's slider cannot go below it).
        (dict(image=root / "circle.png", question=QUESTION, settings=(1, True, 0.0, 1.0, 4)),
         "Value 0.0 is less than minimum value 0.05"),
    ]
    for kwargs, message in cases:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            ask(client, **kwargs)
    lmeye, _, _, _, _ = ask(client, root / "circle.png", QUESTION)
    assert chat_turns(lmeye) == [(QUESTION, expected_answer(engine, root / "circle.png"))]


def test_beams_and_sampling_from_the_page(saved, engine, client):
    root, _ = saved
    lmeye, _, _, _, _ = ask(client, root / "circle.png", QUESTION, settings=(3, False, 1.0, 1.0, NEW_TOKENS))
    batch = engine.batch(engine.open_image(root / "circle.png"), [], QUESTION)
    beams = engine.model.generate(**batch, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
    assert chat_turns(lmeye) == [(QUESTION, engine.processor.decode(beams)[0].strip())]
    lmeye, _, _, _, _ = ask(client, root / "circle.png", QUESTION, settings=(1, True, 0.7, 0.9, NEW_TOKENS))
    assert len(chat_turns(lmeye)) == 1


def chromium_driver(profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1200"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("chromedriver") is None,
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_a_browser_uploads_asks_and_sees_the_streamed_answer(saved, engine, server, tmp_path):
    pytest.importorskip("selenium", reason="the demo extra: pip install -e '.[demo]'")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    root, _ = saved
    expected = expected_answer(engine, root / "circle.png")
    static = expected_answer(engine, root / "circle.png", schedule="static")
    driver = chromium_driver(tmp_path / "profile")
    try:
        driver.set_page_load_timeout(120)
        driver.get(server)
        wait = WebDriverWait(driver, 120, poll_frequency=0.2)
        question = wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#question textarea")))
        body = driver.find_element(By.TAG_NAME, "body")
        # Asking without an image, then with an empty question, is refused in the page, in words.
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda _: "image: upload an image first" in body.text)
        driver.find_element(By.CSS_SELECTOR, "#image-file input[type=file]").send_keys(str(root / "circle.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda _: "question: empty" in body.text)
        new_tokens = driver.find_element(By.CSS_SELECTOR, "#max-new-tokens input[type=number]")
        new_tokens.clear()
        new_tokens.send_keys(str(NEW_TOKENS), Keys.TAB)
        driver.find_element(By.CSS_SELECTOR, "#compare input[type=checkbox]").click()
        static_chat = wait.until(ready.visibility_of_element_located((By.CSS_SELECTOR, "#static-chat")))
        question.send_keys(QUESTION, Keys.ENTER)
        chat = driver.find_element(By.CSS_SELECTOR, "#lmeye-chat")
        # The answer streams in (test_the_answer_is_model_generates_and_streams_token_by_token counts its
        # steps); the page ends on the whole of it, and the static-only model's beside it.
        wait.until(lambda _: QUESTION in chat.text and chat.text.endswith(expected))
        wait.until(lambda _: QUESTION in static_chat.text and static_chat.text.endswith(static))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attention img")) >= 3)
        assert "4x4 patches" in driver.find_element(By.CSS_SELECTOR, "#attention-note").text
        time.sleep(0.5)  # let the gallery's images finish drawing
        shot = tmp_path / "demo.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("LMEYE_DEMO_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["LMEYE_DEMO_SCREENSHOT"])
    finally:
        driver.quit()


def test_an_encoder_decoder_adapter_streams_and_draws_its_attention(tmp_path):
    from transformers import CLIPImageProcessor

    model, proc = save_tiny_model(tmp_path, arch="t5")
    runner = EvalModel(model, proc, CLIPImageProcessor.from_pretrained(tmp_path / "vision"))
    engine = ChatEngine(runner)
    image = engine.open_image(circle_image(tmp_path / "circle.png"))
    batch = engine.batch(image, [], QUESTION)
    tokens = model.generate(**proc([QUESTION], images=batch["pixel_values"]), max_new_tokens=NEW_TOKENS,
                            do_sample=False)
    expected = proc.decode(tokens)[0].strip()
    assert list(engine.stream(batch, GenerationSettings(max_new_tokens=NEW_TOKENS)))[-1] == expected
    view = engine.attention(batch, image)
    assert len(view.images) == 3 and "4x4 patches" in view.note
    # A second turn goes into the encoder, after the first question and answer.
    row = engine.prompt_row([(QUESTION, "red")], "is the square red ?")
    assert row.prefix == proc.prefix_ids(f"{QUESTION} red is the square red ?")[0]


def test_interactions_without_an_attention_map_say_so():
    from PIL import Image
    from transformers import CLIPImageProcessor

    from lmeye_fast.models import published
    from lmeye_fast.models.tiny import tiny_clip_model, tiny_llm, word_tokenizer

    tokenizer = word_tokenizer("what colour is the circle red blue answer :".split())
    processor, model = published(tokenizer, tiny_llm("llama", len(tokenizer) + 3), tiny_clip_model(),
                                 response_prefix="answer :")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    engine = ChatEngine(EvalModel(model.eval(), processor, images))
    picture = torch.rand(40, 48, 3).mul(255).to(torch.uint8).numpy()
    batch = engine.batch(Image.fromarray(picture), [], QUESTION)
    view = engine.attention(batch, None)
    assert view.images == [] and "CLIPTextInteraction" in view.note and "no attention" in view.note
    assert list(engine.stream(batch, GenerationSettings(max_new_tokens=3)))  # it still answers


def test_attention_over_features_that_are_not_a_patch_grid_is_listed(tmp_path):
    from transformers import CLIPImageProcessor

    from lmeye_fast.models import LMEyeModel, LMEyeProcessor
    from lmeye_fast.models.tiny import tiny_clip, tiny_llm, word_tokenizer

    processor = LMEyeProcessor(word_tokenizer(QUESTION.split()), num_image_tokens=17, num_requests=2)
    config = processor.make_config(interaction_dim=16, num_heads=2, sub_features=3, ipn_feature="pooled")
    model = LMEyeModel(tiny_llm("llama", len(processor)), config, vision=tiny_clip()).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    engine = ChatEngine(EvalModel(model, processor, images))
    image = engine.open_image(circle_image(tmp_path / "circle.png"))
    view = engine.attention(engine.batch(image, [], QUESTION), image)
    assert view.images == [] and "1 'pooled' image feature" in view.note
    assert view.note.count("feature 0: 100%") == 2  # one global feature: each request's whole weight


@pytest.mark.parametrize("flags, message", [
    (["--beams", "9"], "generation settings: beams: expected an int in \\[1, 8\\], got 9"),
    (["--sample", "--top-p", "1.5"], "generation settings: top-p: expected a number in \\(0, 1\\], got 1.5"),
    (["--port", "70000"], "--port: expected a port in \\[1, 65535\\], got 70000"),
])
def test_bad_command_line_settings_are_refused_before_anything_loads(flags, message):
    from lmeye_fast.demo import main

    # The adapter directory does not exist: the flags are refused before it is read.
    with pytest.raises(SystemExit, match=message):
        main(["--adapter", "no-such-adapter", "--llm", "no-llm", "--vision", "no-vision", *flags])
