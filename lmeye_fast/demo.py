"""A chat demo in the browser over an LMEye adapter, on 127.0.0.1 (the ``demo`` extra: Gradio).

    python -m lmeye_fast.demo --adapter DIR [--port 7860]

Upload an image and ask: the answer streams token by token (``LMEyeModel.generate`` with a
``TextIteratorStreamer``, on the adapter's schedule, the single pass for a causal LLM), and the chat
goes on about the same image. The settings are those of the released LMEye demo: beams, sampling,
temperature, top-p, maximum new tokens (transformers streams greedy and sampled decoding; beam
search answers at once). A switch answers every question with the static-only model as well
(``schedule="static"``, the same adapter without the IPN), beside LMEye's answer, and a panel shows
per ``<img-d>`` token what its request attended to: with the attention interaction, its weights
over the image tokens drawn over the image as the vision tower sees it
(``LMEyeModel.attention_weights``); another interaction says it has no such map.

The adapter is loaded with the models and the processor it records
(``lmeye_fast.models.load_pretrained``), and a conversation is laid out by the processor's saved
template as training lays it out (``LMEyeProcessor.row``): the first question with the image, its
slots and response prefix, then each answer with its end-of-turn token and every later question
with its response prefix. An encoder-decoder LLM reads the whole conversation in its encoder.
``ChatEngine`` is the model side, without Gradio; ``build_app`` the page; ``main`` the command line.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from .eval import DTYPES, EvalModel, add_model_arguments, load_eval_model
from .models.processor import LMEyeBatch, TokenizedRow
from .models.prompts import Turn
from .models.vision import read_image

__all__ = ["GenerationSettings", "AttentionView", "ChatEngine", "load_engine", "chat_turns", "build_app", "launch",
           "main"]

HOST = "127.0.0.1"
# How long the page waits for the next token before it says that generation stalled.
TOKEN_TIMEOUT_S = 300.0
# The largest beam count the page offers (the released demo uses 5).
MAX_BEAMS = 8
# The page's bound on new tokens per answer (the released demo asks for 200); the LLM's positions may
# bound it further, which the model reports.
MAX_NEW_TOKENS = 1024
# The shown size of the image as the vision tower sees it, with the attention drawn over it.
VIEW_SIZE = 224
# How bright a patch that received no attention is drawn (one with the largest weight is as it is).
DIM_FLOOR = 0.15


@dataclass(frozen=True)
class GenerationSettings:
    """The page's generation settings, as ``model.generate`` takes them."""

    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self):
        if not isinstance(self.num_beams, int) or not 1 <= self.num_beams <= MAX_BEAMS:
            raise ValueError(f"beams: expected an int in [1, {MAX_BEAMS}], got {self.num_beams!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max new tokens: expected a positive int, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top-p: expected a number in (0, 1], got {self.top_p!r}")

    @property
    def streams(self) -> bool:
        """transformers streams greedy and sampled decoding, not beam search."""
        return self.num_beams == 1

    def generate_kwargs(self) -> dict:
        kwargs = dict(num_beams=self.num_beams, do_sample=self.do_sample, max_new_tokens=self.max_new_tokens)
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p))
        return kwargs


@dataclass(frozen=True)
class AttentionView:
    """What the attention panel shows: one (image, caption) per ``<img-d>`` token, and a note."""

    images: List[Tuple[object, str]]
    note: str


class ChatEngine:
    """The demo's model side: images in, conversations laid out, answers streamed, attention drawn.

    Args:
        runner: the model, its processor and image processor (``lmeye_fast.eval.load_eval_model``); the
            processor's template lays the conversation out.
    """

    def __init__(self, runner: EvalModel):
        if runner.image_processor is None:
            raise ValueError("runner: the demo reads image files and needs the vision tower's image processor")
        self.runner = runner
        self.model, self.processor = runner.model, runner.processor

    # ------------------------------------------------------------- inputs

    @staticmethod
    def open_image(path):
        """The image file at ``path`` as an RGB PIL image (``read_image``); ``ValueError`` naming it when it
        cannot be read."""
        if path is None:
            raise ValueError("image: upload an image first")
        try:
            return read_image(path)
        except OSError as error:
            raise ValueError(f"image: {Path(path).name} is not an image file that can be read ({error})") from None

    def prompt_row(self, turns: Sequence[Tuple[str, str]], question: str) -> TokenizedRow:
        """The conversation so far (``turns``: (question, answer) pairs) and the new ``question`` as one
        generation row, laid out by the processor's template as training lays out a conversation."""
        if not question.strip():
            raise ValueError("question: empty; type a question about the image")
        proc = self.processor
        if proc.encoder_decoder:
            # The encoder reads the whole conversation; the decoder starts the new answer.
            text = " ".join([q.strip() + " " + a.strip() for q, a in turns] + [question.strip()])
            return proc.row([Turn(text)])
        return proc.row([Turn(q, a.strip()) for q, a in turns] + [Turn(question)])

    def batch(self, image, turns: Sequence[Tuple[str, str]], question: str) -> LMEyeBatch:
        """The model's inputs for one question about ``image`` (a PIL image) after ``turns``."""
        row = self.prompt_row(turns, question)
        proc = self.processor
        if proc.encoder_decoder:
            batch = proc.pad_encoder_decoder([(row.prefix, row.image_start)])
        else:
            batch = proc.pad([row], prompts=True)
            del batch["labels"]
        batch = batch.to(self.model.special_embed.device)
        batch["pixel_values"] = self.runner.pixels([image])
        return batch

    # ------------------------------------------------------------- answers

    def stream(self, batch: LMEyeBatch, settings: GenerationSettings, schedule: Optional[str] = None) -> Iterator[str]:
        """The answer so far, after every token (at once for beam search); ``schedule`` None is the
        adapter's, ``"static"`` the static-only model. The model's own errors (a prompt longer than
        the LLM allows) are raised as they are."""
        kwargs = settings.generate_kwargs()
        if not settings.streams:
            tokens = self.model.generate(**batch, schedule=schedule, **kwargs)
            yield self.processor.decode(tokens)[0].strip()
            return
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=TOKEN_TIMEOUT_S)
        failures = []

        def generate():
            try:
                self.model.generate(**batch, schedule=schedule, streamer=streamer, **kwargs)
            except Exception as error:  # handed to the page's thread, which reports it
                failures.append(error)
                streamer.end()

        worker = threading.Thread(target=generate, name="lmeye-demo-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text.strip()
        except queue.Empty:
            raise RuntimeError(f"generation: no token for {TOKEN_TIMEOUT_S:.0f} s; the model stalled") from None
        worker.join(TOKEN_TIMEOUT_S)
        if failures:
            raise failures[0]
        yield text.strip()

    # ------------------------------------------------------------- attention

    def attention(self, batch: LMEyeBatch, image) -> AttentionView:
        """Per ``<img-d>`` token, what its request attended to, drawn over the image where the IPN's
        features are a grid of patches (CLIP's tokens), else listed."""
        interaction = self.model.ipn.interaction
        if interaction is not None:
            return AttentionView([], f"This adapter's IPN interacts through {type(interaction).__name__}: its "
                                     "requests meet the image features inside that module, which has no attention "
                                     "weights to draw.")
        weights = self.model.attention_weights(**batch)[0].float().mean(dim=0)  # (R, M*S), averaged over heads
        config = self.model.config
        per_token = weights.reshape(weights.shape[0], -1, config.sub_features).sum(dim=-1).cpu()  # (R, M)
        tokens = per_token.shape[1]
        side = math.isqrt(tokens - 1) if tokens > 1 else 0
        with_class = side * side == tokens - 1 and side > 1
        if not with_class:
            side = math.isqrt(tokens)
        if config.ipn_feature != "tokens" or side < 2 or (not with_class and side * side != tokens):
            lines = [f"- `{name}`: " + ", ".join(f"feature {n}: {w:.0%}" for w, n in _top(row))
                     for name, row in zip(_slot_names(self.model.ipn), per_token)]
            return AttentionView([], f"The IPN reads {tokens} {config.ipn_feature!r} image feature(s), not a grid of "
                                     "patches; each request's weights over them (heads averaged):\n"
                                     + "\n".join(lines))
        view = self._view(batch["pixel_values"][0])
        images = []
        for name, row in zip(_slot_names(self.model.ipn), per_token):
            grid = row[1:] if with_class else row
            caption = name + (f": class token {row[0].item():.0%}" if with_class else "")
            images.append((_overlay(view, grid.reshape(side, side)), caption))
        return AttentionView(images, f"Per `<img-d>` token, where its request attended over the {side}x{side} "
                                     "patches (heads averaged; the brighter a patch, the more weight, each map "
                                     "scaled to its own largest weight), on the image as the vision tower sees it; "
                                     "the caption gives the weight on the class token.")

    def _view(self, pixels: torch.Tensor):
        """The vision tower's input (C, H, W) as an RGB image of ``VIEW_SIZE``, the image processor's
        rescaling and normalisation undone (an unknown processor's output is shown min-max scaled)."""
        from PIL import Image

        images = self.runner.image_processor
        pixels = pixels.detach().float().cpu()
        mean, std = getattr(images, "image_mean", None), getattr(images, "image_std", None)
        if not (hasattr(images, "do_rescale") or hasattr(images, "do_normalize")):
            pixels = 255 * (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-12)
        else:
            if getattr(images, "do_normalize", False) and mean is not None and std is not None:
                pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
            if getattr(images, "do_rescale", False):
                pixels = pixels / getattr(images, "rescale_factor", 1 / 255)
        array = pixels.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(array, "RGB").resize((VIEW_SIZE, VIEW_SIZE), Image.Resampling.BICUBIC)


def _slot_names(ipn) -> List[str]:
    """Per request, the ``<img-d>`` slots it feeds: request j the K/R consecutive slots from j·K/R."""
    per_request = ipn.num_slots // ipn.num_requests
    if per_request == 1:
        return [f"<img-d> {j + 1}" for j in range(ipn.num_requests)]
    return [f"<img-d> {j * per_request + 1}-{(j + 1) * per_request}" for j in range(ipn.num_requests)]


def _top(weights: torch.Tensor, count: int = 5):
    values, indices = weights.topk(min(count, weights.numel()))
    return list(zip(values.tolist(), indices.tolist()))


def _overlay(view, grid: torch.Tensor):
    """``view`` lit by ``grid`` (g, g): each patch's brightness follows its weight, the largest weight at
    full brightness and none at ``DIM_FLOOR`` (a colour of its own would hide in images of that colour)."""
    from PIL import Image

    light = DIM_FLOOR + (1 - DIM_FLOOR) * grid / grid.max().clamp_min(1e-12)
    mask = Image.fromarray((light * 255).round().to(torch.uint8).numpy(), "L").resize(view.size,
                                                                                       Image.Resampling.NEAREST)
    return Image.composite(view, Image.new("RGB", view.size, (0, 0, 0)), mask)


def load_engine(args: argparse.Namespace) -> ChatEngine:
    """The one place the demo loads its model, from the command line's flags."""
    runner = load_eval_model(args.adapter, args.llm, args.vision, args.tokenizer, args.image_processor,
                             args.response_prefix, args.device, args.dtype, template=args.prompt_template,
                             llm_revision=args.llm_revision, vision_revision=args.vision_revision)
    return ChatEngine(runner)


# ------------------------------------------------------------------ the page

def _text(content) -> str:
    """A chat message's text: Gradio hands it back as a string or as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def chat_turns(messages) -> List[Tuple[str, str]]:
    """(question, answer) pairs of a chat's messages."""
    turns, question = [], None
    for message in messages or []:
        role, text = message.get("role"), _text(message.get("content"))
        if role == "user":
            question = text
        elif role == "assistant" and question is not None:
            turns.append((question, text))
            question = None
    return turns


def _messages(turns: Sequence[Tuple[str, str]]) -> List[dict]:
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def build_app(engine: ChatEngine, title: str = "LMEye", settings: GenerationSettings = GenerationSettings()):
    """The page (a ``gradio.Blocks``) over ``engine``, its settings starting at ``settings``; its API
    endpoint ``/ask`` takes the image file, the question, both chats, the settings and the comparison
    switch, and streams both chats and the attention panel."""
    import gradio as gr

    def fail(error: Exception):
        return gr.Error(str(error), print_exception=False)

    def load_image(path):
        if path is None:
            return None, [], [], [], ""
        try:
            image = engine.open_image(path)
        except ValueError as error:
            raise fail(error)
        return image, [], [], [], ""

    def ask(path, question, lmeye_chat, static_chat, beams, sample, temperature, top_p, max_new_tokens, compare):
        try:
            image = engine.open_image(path)
            settings = GenerationSettings(int(beams), bool(sample), float(temperature), float(top_p),
                                          int(max_new_tokens))
            lmeye_turns, static_turns = chat_turns(lmeye_chat), chat_turns(static_chat)
            batch = engine.batch(image, lmeye_turns, question)
            static_batch = engine.batch(image, static_turns, question) if compare else None
            shown_static = _messages(static_turns) + [{"role": "user", "content": question}] if compare else []
            answer = ""
            for answer in engine.stream(batch, settings):
                yield (_messages(lmeye_turns + [(question, answer)]), shown_static, "", gr.skip(), gr.skip())
            lmeye_done, static_done = _messages(lmeye_turns + [(question, answer)]), shown_static
            if compare:
                for static_answer in engine.stream(static_batch, settings, schedule="static"):
                    static_done = _messages(static_turns + [(question, static_answer)])
                    yield lmeye_done, static_done, "", gr.skip(), gr.skip()
            view = engine.attention(batch, image)
            yield lmeye_done, static_done, "", view.images, view.note
        except (ValueError, RuntimeError) as error:
            raise fail(error)

    def clear():
        return [], [], [], ""

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nUpload an image and ask about it. LMEye's answer streams as it is generated; "
                    "the chat goes on about the same image.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image file", file_types=["image"], elem_id="image-file")
                preview = gr.Image(label="Image", type="pil", interactive=False, height=240, elem_id="preview")
                with gr.Accordion("Generation settings", open=True):
                    beams = gr.Slider(1, MAX_BEAMS, value=settings.num_beams, step=1,
                                      label="Beams (beam search answers at once)")
                    sample = gr.Checkbox(value=settings.do_sample, label="Sampling")
                    temperature = gr.Slider(0.05, 2.0, value=settings.temperature, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=settings.max_new_tokens, step=1,
                                        label="Max new tokens", elem_id="max-new-tokens")
                compare = gr.Checkbox(value=False, label="Also answer with the static-only model (no IPN)",
                                      elem_id="compare")
            with gr.Column(scale=2):
                with gr.Row():
                    lmeye_chat = gr.Chatbot(label="LMEye", height=360, elem_id="lmeye-chat")
                    static_chat = gr.Chatbot(label="Static-only model", height=360, visible=False,
                                             elem_id="static-chat")
                question = gr.Textbox(label="Question", placeholder="Ask about the image, then press Enter",
                                      elem_id="question")
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear_button = gr.Button("New conversation")
                gallery = gr.Gallery(label="What each <img-d> token's request attended to", columns=4,
                                     height=260, object_fit="contain", elem_id="attention")
                note = gr.Markdown(elem_id="attention-note")

        inputs = [upload, question, lmeye_chat, static_chat, beams, sample, temperature, top_p, max_new, compare]
        outputs = [lmeye_chat, static_chat, question, gallery, note]
        upload.change(load_image, upload, [preview, lmeye_chat, static_chat, gallery, note], api_name=False)
        question.submit(ask, inputs, outputs, api_name="ask")
        ask_button.click(ask, inputs, outputs, api_name=False)
        clear_button.click(clear, None, [lmeye_chat, static_chat, gallery, note], api_name=False)
        # Toggling the comparison starts a new conversation, so that both chats hold the same questions.
        compare.change(lambda on: (gr.update(visible=on, value=[]), [], [], ""), compare,
                       [static_chat, lmeye_chat, gallery, note], api_name=False)
    app.queue(default_concurrency_limit=1)
    return app


def launch(app, port: int, block: bool = True):
    """Serve ``app`` on ``HOST``:``port``; returns the local URL when ``block`` is False."""
    import gradio as gr

    # The machine's own fonts: the page loads nothing from outside.
    theme = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                              font_mono=("ui-monospace", "monospace"))
    _, url, _ = app.launch(server_name=HOST, server_port=port, prevent_thread_lock=not block, quiet=not block,
                           theme=theme, show_error=True, footer_links=[])
    return url


# ------------------------------------------------------------------ command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmeye_fast.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--port", type=int, default=7860, help=f"port on {HOST}")
    start = GenerationSettings()
    settings = parser.add_argument_group("the page's first generation settings (the released demo's: --beams 5 "
                                         "--sample --temperature 1 --max-new-tokens 200)")
    settings.add_argument("--beams", type=int, default=start.num_beams)
    settings.add_argument("--sample", action="store_true", help="sampling on")
    settings.add_argument("--temperature", type=float, default=start.temperature)
    settings.add_argument("--top-p", type=float, default=start.top_p)
    settings.add_argument("--max-new-tokens", type=int, default=start.max_new_tokens)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise SystemExit(f"--port: expected a port in [1, 65535], got {args.port}")
    try:
        settings = GenerationSettings(args.beams, args.sample, args.temperature, args.top_p, args.max_new_tokens)
    except ValueError as error:
        raise SystemExit(f"generation settings: {error}") from None
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("the demo needs Gradio: pip install -e \".[demo]\"") from None
    engine = load_engine(args)
    launch(build_app(engine, title=f"LMEye: {Path(args.adapter).name}", settings=settings), args.port)


if __name__ == "__main__":
    main(sys.argv[1:])
