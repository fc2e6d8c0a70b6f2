"""A catalogue of misuse: every case must raise the stated exception type with a message that
names the argument at fault, before any kernel runs and without changing any input.

Each row is (case id, call, exception type, the name the message must contain). The calls
build fresh inputs, so a case cannot leak into the next.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lmeye_fast  # noqa: E402
from lmeye_fast import InteractiveLayer, StaticVisualMapping, backends, ops  # noqa: E402
from lmeye_fast.models import LMEyeModel, LMEyeProcessor  # noqa: E402
from lmeye_fast.models.config import CONFIG_FILE  # noqa: E402
from lmeye_fast.models.modeling import ADAPTER_FILE  # noqa: E402
from lmeye_fast.models.tiny import tiny_llm, word_tokenizer  # noqa: E402
from lmeye_fast.planner import plan_slots  # noqa: E402

B, T, D, N, DV, DI, R, H = 2, 5, 16, 3, 8, 8, 2, 2


def layer(**kwargs):
    return InteractiveLayer(D, DV, DI, R, 1, H, backend="reference", **kwargs)


def inputs(**changes):
    """Well-formed forward arguments of ``layer()``, with ``changes`` applied."""
    args = dict(hidden=torch.randn(B, T, D), image=torch.randn(B, N, DV), embeds=torch.randn(B, T + R, D),
                slot_pos=torch.tensor([[T, T + 1]] * B), request_pos=torch.tensor([T - 1, T - 2]),
                image_mask=None)
    args.update(changes)
    return args


def run_layer(**changes):
    args = inputs(**changes)
    return layer()(args.pop("hidden"), args.pop("image"), args.pop("embeds"), args.pop("slot_pos"), **args)


def run_layer_validated(**changes):
    return run_layer(validate=True, **changes)


def run_in_place_on(embeds_of):
    args = inputs()
    embeds = embeds_of(args)
    return layer()(args["hidden"], args["image"], embeds, args["slot_pos"], request_pos=args["request_pos"],
                   inplace=True)


def run_mapping(image=None, embeds=None, slot_pos=None, validate=False, pass_slots=True):
    mapping = StaticVisualMapping(DV, D, backend="reference")
    image = torch.randn(B, N, DV) if image is None else image
    embeds = torch.randn(B, N + 2, D) if embeds is None else embeds
    slot_pos = torch.arange(N).expand(B, N) if slot_pos is None else slot_pos
    return mapping(image, embeds, slot_pos if pass_slots else None, validate=validate)


def triton_op(name):
    ok, why = backends.status("triton")
    if not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    return ops.get(name, "triton")


WORDS = "what colour is the circle red blue answer :".split()


def processor(**kwargs):
    return LMEyeProcessor(word_tokenizer(WORDS), num_image_tokens=N, num_requests=R, response_prefix="answer :",
                          **kwargs)


def model():
    proc = processor()
    config = proc.make_config(interaction_dim=DI, num_heads=H, vision_dim=DV)
    return proc, LMEyeModel(tiny_llm("llama", len(proc.tokenizer), hidden=D, max_positions=64), config).eval()


def run_model(call="forward", **changes):
    proc, lmeye = model()
    batch = dict(proc(["what colour is the circle ?", "what colour ?"], ["red", "blue"]).items())
    batch["image_features"] = torch.randn(B, N, DV)
    batch.update(changes)
    if call == "generate":
        batch.pop("labels")
        return lmeye.generate(**batch, max_new_tokens=2)
    return lmeye(**batch)


def tokenizer_without_pad():
    tok = word_tokenizer(WORDS)
    tok.pad_token = None
    tok.eos_token = None
    return tok


def load_into_fresh(tmp_path, tamper):
    proc, lmeye = model()
    lmeye.save_pretrained(tmp_path)
    tamper(tmp_path)
    _, other = model()
    return other.load_adapter(tmp_path)


CASES = [
    # --- InteractiveLayer: construction
    ("layer heads not dividing Di", lambda: InteractiveLayer(D, DV, 10, R, 1, 4), ValueError, "num_heads"),
    ("layer zero width", lambda: InteractiveLayer(0, DV), ValueError, "llm_dim"),
    ("layer unknown interaction", lambda: InteractiveLayer(D, DV, DI, R, 1, H, interaction="mlp"), ValueError,
     "interaction"),
    ("layer unknown backend", lambda: InteractiveLayer(D, DV, DI, R, 1, H, backend="fast"), ValueError, "backend"),
    ("layer unknown transmission", lambda: InteractiveLayer(D, DV, DI, R, 1, H, transmission="slot"), ValueError,
     "transmission"),
    ("layer shared with more slots than requests", lambda: InteractiveLayer(D, DV, DI, R, 1, H, num_slots=R + 1),
     ValueError, "num_slots"),
    ("layer per-slot slots not a multiple of requests", lambda: InteractiveLayer(
        D, DV, DI, R, 1, H, num_slots=R + 1, transmission="per_slot"), ValueError, "num_slots"),
    ("layer per-slot slot count", lambda: layer(num_slots=2 * R, transmission="per_slot")(
        *(inputs()[k] for k in ("hidden", "image", "embeds", "slot_pos")), request_pos=inputs()["request_pos"]),
     ValueError, "slot_pos"),
    # --- InteractiveLayer: every tensor's rank, shape, dtype, device
    ("hidden rank", lambda: run_layer(hidden=torch.randn(B, D)), ValueError, "hidden"),
    ("hidden width", lambda: run_layer(hidden=torch.randn(B, T, D + 1)), ValueError, "hidden"),
    ("hidden dtype", lambda: run_layer(hidden=torch.ones(B, T, D, dtype=torch.int64)), TypeError, "hidden"),
    ("hidden device", lambda: run_layer(hidden=torch.randn(B, T, D, device="meta")), ValueError, "hidden"),
    ("hidden not a tensor", lambda: run_layer(hidden=[[0.0] * D] * B), TypeError, "hidden"),
    ("image rank", lambda: run_layer(image=torch.randn(B, DV)), ValueError, "image"),
    ("image width", lambda: run_layer(image=torch.randn(B, N, DV + 2)), ValueError, "image"),
    ("image dtype", lambda: run_layer(image=torch.ones(B, N, DV, dtype=torch.int32)), TypeError, "image"),
    ("embeds rank", lambda: run_layer(embeds=torch.randn(T + R, D)), ValueError, "embeds"),
    ("embeds batch", lambda: run_layer(embeds=torch.randn(B + 1, T + R, D)), ValueError, "embeds"),
    ("embeds width", lambda: run_layer(embeds=torch.randn(B, T + R, D - 1)), ValueError, "embeds"),
    ("embeds device", lambda: run_layer(embeds=torch.randn(B, T + R, D, device="meta")), ValueError, "embeds"),
    ("slot_pos dtype", lambda: run_layer(slot_pos=torch.tensor([[T, T + 1.0]] * B)), TypeError, "slot_pos"),
    ("slot_pos count", lambda: run_layer(slot_pos=torch.tensor([[T]] * B)), ValueError, "slot_pos"),
    ("slot_pos device", lambda: run_layer(slot_pos=torch.zeros(B, R, dtype=torch.long, device="meta")),
     ValueError, "slot_pos"),
    ("request_pos shape", lambda: run_layer(request_pos=torch.tensor([0, 1, 2])), ValueError, "request_pos"),
    ("request_pos dtype", lambda: run_layer(request_pos=torch.tensor([0.0, 1.0])), TypeError, "request_pos"),
    ("image_mask shape", lambda: run_layer(image_mask=torch.ones(B, N + 1, dtype=torch.bool)), ValueError,
     "image_mask"),
    ("image_mask dtype", lambda: run_layer(image_mask=torch.ones(B, N)), TypeError, "image_mask"),
    # --- InteractiveLayer: position values (validate=True)
    ("slot past the end", lambda: run_layer_validated(slot_pos=torch.tensor([[T, T + R]] * B)), ValueError,
     "slot_pos"),
    ("negative slot", lambda: run_layer_validated(slot_pos=torch.tensor([[-1, T]] * B)), ValueError, "slot_pos"),
    ("duplicate slots", lambda: run_layer_validated(slot_pos=torch.tensor([[T, T]] * B)), ValueError, "slot_pos"),
    ("request past the prefix", lambda: run_layer_validated(request_pos=torch.tensor([T, 0])), ValueError,
     "request_pos"),
    ("negative request", lambda: run_layer_validated(request_pos=torch.tensor([-1, 0])), ValueError,
     "request_pos"),
    # --- InteractiveLayer: in-place writes that would be silently wrong
    ("in place into an expanded embeds", lambda: run_in_place_on(lambda a: torch.randn(1, T + R, D).expand(B, -1, -1)),
     ValueError, "embeds"),
    ("in place into hidden itself", lambda: run_in_place_on(_aliased_hidden), ValueError, "hidden"),
    # --- StaticVisualMapping
    ("mapping image rank", lambda: run_mapping(image=torch.randn(N, DV)), ValueError, "image"),
    ("mapping image width", lambda: run_mapping(image=torch.randn(B, N, DV + 1)), ValueError, "image"),
    ("mapping embeds without slots", lambda: run_mapping(pass_slots=False), ValueError, "slot_pos"),
    ("mapping slot count", lambda: run_mapping(slot_pos=torch.arange(N - 1).expand(B, N - 1)), ValueError,
     "slot_pos"),
    ("mapping slot past the end", lambda: run_mapping(slot_pos=torch.arange(N + 2, 2 * N + 2).expand(B, N),
                                                      validate=True), ValueError, "slot_pos"),
    ("mapping embeds width", lambda: run_mapping(embeds=torch.randn(B, N + 2, D + 3)), ValueError, "embeds"),
    # --- the Triton ops (the registered ops' eager entry points)
    ("triton request weight dtype", lambda: triton_op("request")(
        torch.randn(B, T, D), torch.tensor([0, 1]), torch.randn(R * DI, D, dtype=torch.float16), None, R),
     TypeError, "w_q"),
    ("triton attend heads", lambda: triton_op("attend_decomposed")(
        torch.randn(B, R, DI), torch.randn(B, N, DV), None, torch.randn(DI, DV), None, 3, 1), ValueError,
     "num_heads"),
    ("triton interleave float64", lambda: triton_op("interleave")(
        torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, R, D, dtype=torch.float64),
        torch.tensor([[0, 1]] * B)), TypeError, "embeds"),
    ("triton transmit slot count", lambda: triton_op("transmit_interleave")(
        torch.randn(B, R, DI), torch.randn(D, DI), None, None, torch.randn(B, T, D),
        torch.zeros(B, R + 1, dtype=torch.long)), ValueError, "slot_pos"),
    ("triton per-slot transmit slots not a multiple", lambda: triton_op("transmit_interleave")(
        torch.randn(B, R, DI), torch.randn(R + 1, D, DI), None, None, torch.randn(B, T, D),
        torch.zeros(B, R + 1, dtype=torch.long)), ValueError, "w_o"),
    ("triton per-slot transmit flat bias", lambda: triton_op("transmit")(
        torch.randn(B, 1, DI), torch.randn(3, D, DI), torch.randn(3 * D), None), ValueError, "b_o"),
    ("triton per-slot transmit slot embedding count", lambda: triton_op("transmit")(
        torch.randn(B, 1, DI), torch.randn(3, D, DI), None, torch.randn(1, D)), ValueError, "slot_embed"),
    ("triton per-slot transmit weight width", lambda: triton_op("transmit")(
        torch.randn(B, 1, DI), torch.randn(3, D, DI + 1), None, None), ValueError, "w_o"),
    ("triton per-slot transmit slot_pos count", lambda: triton_op("transmit_interleave")(
        torch.randn(B, 1, DI), torch.randn(3, D, DI), None, None, torch.randn(B, T, D),
        torch.zeros(B, 1, dtype=torch.long)), ValueError, "slot_pos"),
    ("reference per-slot transmit slots not a multiple", lambda: lmeye_fast.reference.transmit(
        torch.randn(B, R, DI), torch.randn(R + 1, D, DI), None, None), ValueError, "w_o"),
    ("triton interleave rows alias embeds", lambda: _aliased_rows_in_place(triton_op("interleave")), ValueError,
     "rows"),
    # --- planner
    ("planner float ids", lambda: plan_slots(torch.zeros(B, T), 1, 2, R), TypeError, "input_ids"),
    ("planner same ids", lambda: plan_slots(torch.zeros(B, T, dtype=torch.long), 1, 1, R), ValueError,
     "slot_token_id"),
    ("planner zero slots", lambda: plan_slots(torch.zeros(B, T, dtype=torch.long), 1, 2, 0), ValueError,
     "num_slots"),
    # --- LMEyeProcessor
    ("processor one string", lambda: processor()("what colour ?"), TypeError, "prompts"),
    ("processor no prompts", lambda: processor()([]), ValueError, "prompts"),
    ("processor answers count", lambda: processor()(["what ?", "colour ?"], ["red"]), ValueError, "answers"),
    ("processor images batch", lambda: processor()(["what ?", "colour ?"], images=torch.rand(3, 3, 8, 8)),
     ValueError, "images"),
    ("processor two placeholders", lambda: processor()(["<img> what <img> ?"]), ValueError, "prompts"),
    ("processor no pad token", lambda: LMEyeProcessor(tokenizer_without_pad(), num_image_tokens=N), ValueError,
     "tokenizer"),
    ("processor zero image tokens", lambda: LMEyeProcessor(word_tokenizer(WORDS), num_image_tokens=0), ValueError,
     "num_image_tokens"),
    # --- LMEyeModel
    ("model schedule", lambda: run_model(schedule="three_pass"), ValueError, "schedule"),
    ("model prefix_len", lambda: run_model(prefix_len=0), ValueError, "prefix_len"),
    ("model no image", lambda: run_model(image_features=None), ValueError, "image_features"),
    ("model image width", lambda: run_model(image_features=torch.randn(B, N, DV + 1)), ValueError, "image"),
    ("model image batch", lambda: run_model(image_features=torch.randn(B + 1, N, DV)), ValueError, "image"),
    ("generate image width", lambda: run_model("generate", image_features=torch.randn(B, N, DV + 1)), ValueError,
     "image"),
    ("model prompt longer than the LLM's positions", lambda: _run_too_long(), ValueError, "input_ids"),
    # --- checkpoints
    ("load from a missing directory", lambda: model()[1].load_adapter("no-such-adapter"), FileNotFoundError,
     "directory"),
]


def _aliased_hidden(args):
    """``embeds`` that shares its rows with ``hidden`` (written in place, read by the request)."""
    both = torch.randn(B, T + R, D)
    args["hidden"] = both[:, :T]
    return both


def _aliased_rows_in_place(interleave):
    embeds = torch.randn(B, T, D)
    return interleave(embeds, embeds[:, :R], torch.tensor([[T - 2, T - 1]] * B), True)


def _run_too_long():
    proc, lmeye = model()
    words = " ".join(["what"] * lmeye.llm.config.max_position_embeddings)
    batch = dict(proc([words, "what ?"], ["red", "blue"]).items())
    return lmeye(**batch, image_features=torch.randn(B, N, DV))


@pytest.mark.parametrize("case, call, error, name", CASES, ids=[c[0] for c in CASES])
def test_misuse_is_refused_by_name(case, call, error, name):
    with pytest.raises(error) as info:
        call()
    assert name in str(info.value), f"{case}: the message does not name {name!r}: {info.value}"


def test_catalogue_size():
    assert len(CASES) >= 40


# --- checkpoints that never half-load: each damage raises a named error and leaves every adapter
# tensor of the receiving model as it was.

def _cut_short(directory):
    path = directory / ADAPTER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])


def _bad_header(directory):
    path = directory / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[8:16] = b"{{{{{{{{"
    path.write_bytes(bytes(data))


def _rewrite(directory, change):
    path = directory / ADAPTER_FILE
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _config(directory, change):
    path = directory / CONFIG_FILE
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


DAMAGE = {
    "truncated": (_cut_short, "lmeye_adapter"),
    "corrupt header": (_bad_header, "lmeye_adapter"),
    "integer tensor": (lambda d: _rewrite(d, lambda t: t.update(special_embed=t["special_embed"].long())),
                       "special_embed"),
    "extra tensor": (lambda d: _rewrite(d, lambda t: t.update(extra=torch.zeros(2))), "extra"),
    "missing tensor": (lambda d: _rewrite(d, lambda t: t.pop("special_embed")), "special_embed"),
    "wrong shape": (lambda d: _rewrite(d, lambda t: t.update(special_embed=torch.zeros(3, D + 1))), "special_embed"),
    "unknown config key": (lambda d: _config(d, lambda p: p["config"].update(colour="red")), "colour"),
    "wrong config type": (lambda d: _config(d, lambda p: p["config"].update(num_heads="two")), "num_heads"),
    "newer format": (lambda d: _config(d, lambda p: p.update(format_version=99)), "format_version"),
    "config not json": (lambda d: (d / CONFIG_FILE).write_text("{"), "lmeye_config"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoints_load_nothing(tmp_path, damage):
    tamper, name = DAMAGE[damage]
    _, saved = model()
    with torch.no_grad():
        for tensor in saved.adapter_state_dict().values():
            tensor.normal_()
    saved.save_pretrained(tmp_path)
    tamper(tmp_path)
    _, target = model()
    before = {k: v.clone() for k, v in target.adapter_state_dict().items()}
    embeddings = target.llm.get_input_embeddings().weight.clone()
    with pytest.raises((ValueError, TypeError)) as info:
        target.load_adapter(tmp_path)
    assert name in str(info.value), f"{damage}: the message does not name {name!r}: {info.value}"
    after = target.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), f"{damage}: the model was changed"
    assert torch.equal(embeddings, target.llm.get_input_embeddings().weight)
    with pytest.raises((ValueError, TypeError)):
        LMEyeModel.from_pretrained(tmp_path, llm=tiny_llm("llama", len(processor().tokenizer), hidden=D))


def test_no_pickle_anywhere_in_the_package():
    """Adapters and configs are safetensors and JSON: nothing in the package unpickles (the released
    checkpoints' reader catches pickle's error class from torch.load(weights_only=True), and unpickles nothing)."""
    package = Path(lmeye_fast.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "pickle.load" not in text and "Unpickler(" not in text and "import dill" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


# --- empty and degenerate sizes: they work or are refused by name, on every backend

BACKENDS = ["reference"] + (["triton"] if backends.status("triton")[0] else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_no_image_tokens_work(backend):
    ipn = InteractiveLayer(D, DV, DI, R, 1, H, backend=backend)
    out = ipn(torch.randn(0, T, D), torch.randn(0, N, DV), torch.randn(0, T + R, D),
              torch.zeros(0, R, dtype=torch.long), request_pos=torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, T + R, D)
    # No image tokens: nothing to attend to, so z = r (the all-masked rule).
    hidden, embeds = torch.randn(B, T, D), torch.randn(B, T + R, D)
    slots, request_pos = torch.tensor([[T, T + 1]] * B), torch.tensor([T - 1, 0])
    none = ipn(hidden, torch.randn(B, 0, DV), embeds, slots, request_pos=request_pos)
    masked = ipn(hidden, torch.randn(B, 1, DV), embeds, slots, request_pos=request_pos,
                 image_mask=torch.zeros(B, 1, dtype=torch.bool))
    torch.testing.assert_close(none, masked)
    with pytest.raises(ValueError, match="hidden"):
        ipn(torch.randn(B, 0, D), torch.randn(B, N, DV), embeds, slots, request_pos=request_pos)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_request_reads_zeros_alike(backend):
    """Without validation an out-of-range request position reads a zero row on every backend (the
    kernels' rule), never another row; with it, it is refused by name."""
    ipn = InteractiveLayer(D, DV, DI, R, 1, H, backend=backend)
    args = inputs()
    bad = torch.tensor([T + 3, -1])
    out = ipn(args["hidden"], args["image"], args["embeds"], args["slot_pos"], request_pos=bad)
    zeros = ipn(torch.zeros(B, D), args["image"], args["embeds"], args["slot_pos"])
    torch.testing.assert_close(out, zeros)


def test_the_validate_switch_checks_everywhere(monkeypatch):
    monkeypatch.setenv("LMEYE_FAST_VALIDATE", "1")
    with pytest.raises(ValueError, match="slot_pos"):
        run_layer(slot_pos=torch.tensor([[T, T]] * B))
    with pytest.raises(ValueError, match="input_ids"):
        plan_slots(torch.zeros(B, T, dtype=torch.long), 1, 2, R)
    monkeypatch.delenv("LMEYE_FAST_VALIDATE")
    run_layer(slot_pos=torch.tensor([[T, T + 1]] * B))
