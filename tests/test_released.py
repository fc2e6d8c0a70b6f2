"""LMEye's released checkpoints, without downloading anything: tiny checkpoints written exactly as the
release writes them (float16 under "net", AdamW state, legacy format, with and without ``module.``)
for LLaMA- and Bloom-shaped tiny LLMs and a tiny CLIP, read by ``read_released`` and run by
``from_released``, against the independent implementation of the released forward in
``released_reference`` (two full passes per unpadded prompt, CLIP's text pass by hand).

Tolerance: float32, relative error (max |a - b| / max |b|) at most 1e-5 for the logits; generated
tokens identical. The checks that the comparison can fail: the static-only model, and the reference
with one sub-feature or the request perturbed, differ from the model by far more.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, CLIPModel

from lmeye_fast.models import CLIPImageEncoder, CLIPTextInteraction, LMEyeModel
from lmeye_fast.models import LMEyeProcessor
from lmeye_fast.models.released import GENERATION, TEMPLATES, from_released, main, read_released
from lmeye_fast.models.sources import load_pretrained
from lmeye_fast.models.tiny import tiny_clip_model, tiny_llm, tiny_seq2seq, word_tokenizer

from training_helpers import image_processor
from released_reference import V1_SHAPES, release_state, v1_forward, v1_logits, write_release

WORDS = "what colour is the circle red blue left right Image as evidence: Question: Answer: is Image: ?".split()
H, C = 32, 16
TOL = 1e-5


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def tiny_bloom(vocab_size, hidden=H):
    config = BloomConfig(vocab_size=vocab_size, hidden_size=hidden, n_layer=2, n_head=4, hidden_dropout=0.0,
                         attention_dropout=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return AutoModelForCausalLM.from_config(config)


def tiny_v1_llm(arch, tokenizer, hidden=H):
    """LLaMA: the release's two tokens lie beyond its table (appended, zero rows); Bloom: inside it (its
    table is larger than its tokenizer, as Bloomz-7b1's), so their word rows are the model's own."""
    if arch == "bloom":
        return tiny_bloom(len(tokenizer) + 6, hidden)
    return tiny_llm("llama", len(tokenizer), hidden=hidden)


def clip_model(width=C, **kwargs):
    """A tiny CLIP whose text tower's weights are large enough that every row of its input moves the
    pooled output (at its initialisation the end row barely sees the others)."""
    clip = tiny_clip_model(hidden=24, text_hidden=width, **kwargs).eval()
    with torch.no_grad():
        for name, param in clip.text_model.named_parameters():
            if "layer_norm" not in name:
                param.normal_(0.0, 1.0 if "embedding" in name else width ** -0.5)
        clip.text_projection.weight.normal_(0.0, width ** -0.5)
    return clip


@pytest.fixture(params=["llama", "bloom"])
def arch(request):
    return request.param


def v1_file(tmp_path, module_prefix=False, name="checkpoint_with_epoch4.pth", **overrides):
    state = release_state(V1_SHAPES, H=H, C=C)
    state.update(overrides)
    return write_release(tmp_path / name, state, module_prefix=module_prefix), state


QUESTIONS = ["what colour is the circle ?", "is the circle left ?"]
# The release's prompts, written out (not read off lmeye_fast's templates).
RELEASE_PROMPTS = {"qa": "Image as evidence: <img>\n Question: {q} <img-d> <img-d> <img-d> <img-d> <img-d>\nAnswer:",
                   "instruction": "Image: <img>\n {q} <img-d> <img-d> <img-d> <img-d> <img-d>\nAnswer:",
                   "demo": "Image is <img>\n {q} <img-d> <img-d> <img-d> <img-d> <img-d>\nAnswer:"}


def prompts():
    return list(QUESTIONS)


def reference_ids(processor, question, prompt="qa"):
    """The release's tokenisation of one whole prompt (add_special_tokens=False, no BOS)."""
    return processor.tokenizer(RELEASE_PROMPTS[prompt].format(q=question), add_special_tokens=False,
                               return_tensors="pt")["input_ids"]


@pytest.fixture
def v1(arch, tmp_path):
    tokenizer = word_tokenizer(WORDS)
    llm, clip = tiny_v1_llm(arch, tokenizer).eval(), clip_model()
    path, state = v1_file(tmp_path, module_prefix=arch == "llama")
    processor, model = from_released(path, llm, clip, tokenizer)
    return dict(processor=processor, model=model.eval(), clip=clip, path=path, arch=arch,
                state={k: v.float() for k, v in state.items()})


def model_rows(model, batch, schedule):
    """Per prompt: the logits of its real (unpadded) columns, as the release computes them alone."""
    logits = model(**batch, schedule=schedule, all_logits=True).logits
    mask = batch["attention_mask"].bool()
    return [logits[b, mask[b]] for b in range(logits.shape[0])]


def reference_rows(v1, pixels, **kw):
    processor = v1["processor"]
    rows = []
    for b, text in enumerate(prompts()):
        ids = reference_ids(processor, text)
        rows.append(v1_logits(v1["state"], v1["model"].llm, v1["clip"], ids, pixels[b:b + 1],
                              processor.image_token_id, processor.slot_token_id, **kw)[0])
    return rows


@torch.no_grad()
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
def test_v1_logits_match_the_released_forward(v1, schedule):
    processor, model = v1["processor"], v1["model"]
    pixels = torch.rand(2, 3, 32, 32)
    batch = processor(prompts(), images=pixels)
    # The processor lays out the release's token sequence: the same ids as tokenising the whole prompt.
    for b, text in enumerate(prompts()):
        assert batch["input_ids"][b, batch["attention_mask"][b].bool()].tolist() == \
            reference_ids(processor, text)[0].tolist()
    for got, want in zip(model_rows(model, batch, schedule), reference_rows(v1, pixels)):
        assert rel_err(got, want) <= TOL


@torch.no_grad()
def test_v1_comparison_can_fail(v1):
    """The static-only model, and the reference with one sub-feature or the request perturbed, are far off."""
    processor, model, state = v1["processor"], v1["model"], v1["state"]
    pixels = torch.rand(2, 3, 32, 32)
    batch = processor(prompts(), images=pixels)
    want = reference_rows(v1, pixels)
    static = model_rows(model, batch, "static")
    assert min(rel_err(g, w) for g, w in zip(static, want)) > 1e3 * TOL
    one_sub_feature = copy.deepcopy(state)
    # Random directions: CLIP's layer norms make a constant shift of a row invisible.
    one_sub_feature["promptMlp.bias"][2 * C:3 * C] += 0.5 * torch.randn(C)  # sub-feature 2 of 5
    request = copy.deepcopy(state)
    request["llm2clip.bias"] += 0.5 * torch.randn(C)
    got = model_rows(model, batch, "single_pass")
    for perturbed in (one_sub_feature, request):
        rows = reference_rows(dict(v1, state=perturbed), pixels)
        assert min(rel_err(g, w) for g, w in zip(got, rows)) > 1e2 * TOL


@torch.no_grad()
@pytest.mark.parametrize("schedule", ["single_pass", "two_pass"])
@pytest.mark.parametrize("beams", [1, 3])
def test_v1_generation_matches_the_released_forward(v1, schedule, beams):
    processor, model = v1["processor"], v1["model"]
    pixels = torch.rand(2, 3, 32, 32)
    batch = processor(prompts(), images=pixels)
    settings = dict(num_beams=beams, max_new_tokens=6, do_sample=False)
    tokens = model.generate(**batch, schedule=schedule, **settings)
    suppressed = [i for i in model.config.token_ids() if i is not None]  # LMEye never generates its placeholders
    for b, text in enumerate(prompts()):
        ids = reference_ids(processor, text)
        embeds = v1_forward(v1["state"], model.llm, v1["clip"], ids, pixels[b:b + 1], processor.image_token_id,
                            processor.slot_token_id)
        want = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), **settings,
                                  suppress_tokens=suppressed, pad_token_id=processor.pad_token_id,
                                  eos_token_id=processor.eos_token_id)[0]
        assert tokens[b, :len(want)].tolist() == want.tolist()
        # A row that stopped before the batch's longest is filled after its end.
        assert set(tokens[b, len(want):].tolist()) <= {processor.pad_token_id, processor.eos_token_id}


@torch.no_grad()
def test_v1_image_vector_option(tmp_path):
    """``image_vector="embedding_imgd"`` puts the slot vector at <img>, as the released inference scripts load
    it; the default is the trained ``embedding_img``."""
    tokenizer = word_tokenizer(WORDS)
    llm, clip = tiny_v1_llm("llama", tokenizer).eval(), clip_model()
    path, state = v1_file(tmp_path)
    processor, model = from_released(path, llm, clip, tokenizer, image_vector="embedding_imgd")
    state = {k: v.float() for k, v in state.items()}
    pixels = torch.rand(2, 3, 32, 32)
    batch = processor(prompts(), images=pixels)
    v1 = dict(processor=processor, model=model.eval(), clip=clip, state=state)
    got = model_rows(model, batch, "single_pass")
    for g, w in zip(got, reference_rows(v1, pixels, image_vector="embedding_imgd")):
        assert rel_err(g, w) <= TOL
    for g, w in zip(got, reference_rows(v1, pixels)):
        assert rel_err(g, w) > 1e2 * TOL
    with pytest.raises(ValueError, match="image_vector: expected one of"):
        from_released(path, llm, clip, word_tokenizer(WORDS), image_vector="embedding")


def test_v1_read_released(tmp_path):
    for prefix in (False, True):
        path, state = v1_file(tmp_path, module_prefix=prefix, name=f"c{prefix}.pth")
        checkpoint = read_released(path)
        assert checkpoint.layout == "v1" and checkpoint.epoch == 4
        assert (checkpoint.llm_dim, checkpoint.interaction_dim, checkpoint.vision_dim) == (H, C, C)
        assert (checkpoint.sub_features, checkpoint.num_requests, checkpoint.num_slots) == (5, 1, 5)
        assert sorted(checkpoint.state) == sorted(V1_SHAPES)
        assert all(torch.equal(checkpoint.state[k], v) for k, v in state.items())


def test_v1_special_rows_are_word_row_plus_vector(v1):
    """Bloom's <img>/<img-d> rows are the model's own word rows; LLaMA's, appended, are zero."""
    model, processor, state = v1["model"], v1["processor"], v1["state"]
    words = model.llm.get_input_embeddings().weight
    ids = torch.tensor([[processor.image_token_id, processor.slot_token_id]])
    row_img, row_imgd = model.embed(ids)[0]
    torch.testing.assert_close(row_img, words[ids[0, 0]] + state["embedding_img"][0])
    torch.testing.assert_close(row_imgd, words[ids[0, 1]] + state["embedding_imgd"][0])
    appended = v1["arch"] == "llama"
    assert bool((words[ids[0]] == 0).all()) == appended


def test_v1_converter_directory_gives_the_same_outputs(v1, tmp_path):
    clip = v1["clip"]
    base = tmp_path / "base"
    # The converter loads the LLM, CLIP and tokenizer as a user's hub ids would: from directories.
    fresh_tokenizer = word_tokenizer(WORDS)
    llm = tiny_v1_llm(v1["arch"], fresh_tokenizer)
    llm.save_pretrained(base / "llm")
    fresh_tokenizer.save_pretrained(base / "llm")
    clip.save_pretrained(base / "clip")
    image_processor().save_pretrained(base / "clip")
    main(["convert", str(v1["path"]), "--llm", str(base / "llm"), "--clip", str(base / "clip"),
          "--out", str(tmp_path / "adapter")])

    # The adapter directory loaded the ordinary way, from its records alone, against from_released on the
    # same models.
    loaded = load_pretrained(tmp_path / "adapter")
    model2 = loaded.model.eval()
    assert loaded.processor.template.name == "lmeye-v1-qa"
    clip2 = CLIPModel.from_pretrained(base / "clip").eval()
    direct_processor, direct = from_released(v1["path"], AutoModelForCausalLM.from_pretrained(base / "llm").eval(),
                                             clip2, word_tokenizer(WORDS))
    direct.eval()
    pixels = torch.rand(2, 3, 32, 32)
    batch = direct_processor(prompts(), images=pixels)
    assert torch.equal(loaded.processor(prompts(), images=pixels)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        for schedule in ("single_pass", "two_pass"):
            torch.testing.assert_close(model2(**batch, schedule=schedule).logits,
                                       direct(**batch, schedule=schedule).logits, rtol=0, atol=0)
        settings = dict(num_beams=3, max_new_tokens=5, do_sample=False)
        assert torch.equal(model2.generate(**batch, **settings), direct.generate(**batch, **settings))
    again = AutoModelForCausalLM.from_pretrained(base / "llm")
    # An interaction module set up otherwise than the saved one is refused before anything is built.
    with pytest.raises(ValueError, match="interaction: the adapter .* saved with an interaction set to"):
        LMEyeModel.from_pretrained(tmp_path / "adapter", again, vision=CLIPImageEncoder(clip2),
                                   interaction=CLIPTextInteraction(clip2, 1))


@pytest.mark.parametrize("prompt", ["qa", "instruction", "demo"])
def test_released_prompt_templates(prompt):
    """Each released prompt is a named template: the processor lays out the release's token sequence (the
    same ids as tokenising the whole prompt string), no BOS, the request at the first slot."""
    tokenizer = word_tokenizer(WORDS + ["describe", "it"])
    tokenizer.add_tokens(["<img>", "<img-d>"], special_tokens=True)
    processor = LMEyeProcessor(tokenizer, num_image_tokens=1, num_requests=5, template=TEMPLATES[prompt])
    batch = processor(["describe it", "what colour is the circle ?"], images=torch.rand(2, 3, 32, 32))
    for b, question in enumerate(["describe it", "what colour is the circle ?"]):
        row = batch["input_ids"][b, batch["attention_mask"][b].bool()].tolist()
        assert row == reference_ids(processor, question, prompt)[0].tolist()
    assert (batch["request_pos"] == batch["prefix_len"]).all()
    assert processor.make_config().request_position == "first_slot"


def test_released_generation_settings():
    assert GENERATION["qa"] == dict(num_beams=5, max_new_tokens=100)
    assert GENERATION["instruction"] == dict(num_beams=4, do_sample=True, max_new_tokens=300)
    assert GENERATION["vqa"] == dict(num_beams=5, length_penalty=-1.0, max_new_tokens=50)
    assert GENERATION["demo"] == dict(num_beams=5, do_sample=True, temperature=1.0, max_new_tokens=200)
    assert GENERATION["mmbench"] == dict(num_beams=5, do_sample=False, max_new_tokens=16)


# ------------------------------------------------------------------ refusals

def test_refuses_a_file_that_is_not_the_container(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("never run",))

    torch.save({"net": Payload()}, tmp_path / "code.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"code.pth: not LMEye's released checkpoint .*weights_only=True"):
        read_released(tmp_path / "code.pth")
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: .*under 'net'.*got \['state_dict'\]"):
        read_released(tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not a pickle")
    with pytest.raises(ValueError, match="text.pth: not LMEye's released checkpoint"):
        read_released(tmp_path / "text.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint: no file"):
        read_released(tmp_path / "absent.pth")


def test_refuses_other_keys_and_shapes(tmp_path):
    state = release_state(V1_SHAPES, H=H, C=C)
    other = dict(state)
    other["imgLinear2.weight"] = other.pop("imgLinear.weight")
    write_release(tmp_path / "keys.pth", other, module_prefix=True)
    with pytest.raises(ValueError, match=r"against v1's: missing \['imgLinear.weight'\], unexpected "
                                         r"\['imgLinear2.weight'\]"):
        read_released(tmp_path / "keys.pth")
    wrong = dict(state, **{"llm2clip.weight": torch.zeros(C, H + 1, dtype=torch.float16)})
    write_release(tmp_path / "shape.pth", wrong)
    with pytest.raises(ValueError, match=r"llm2clip.weight: shape \(16, 33\), expected \(16, 32\)"):
        read_released(tmp_path / "shape.pth")


def test_refuses_mismatched_models_before_building(tmp_path):
    path, _ = v1_file(tmp_path)
    tokenizer = word_tokenizer(WORDS)
    size = len(tokenizer)
    wide = tiny_llm("llama", size, hidden=48)
    with pytest.raises(ValueError, match="llm: its word embedding is 48 wide, the checkpoint's is 32 wide"):
        from_released(path, wide, clip_model(), tokenizer)
    llm = tiny_llm("llama", size)
    with pytest.raises(ValueError, match="clip: its text tower is 24 wide, the checkpoint's is 16 wide"):
        from_released(path, llm, clip_model(width=24), tokenizer)
    # Nothing was built or changed: the tokenizer has no new token, the LLM's table its old size.
    assert len(tokenizer) == size and llm.get_input_embeddings().num_embeddings == size
    shuffled = word_tokenizer(WORDS)
    shuffled.add_tokens(["<img-d>", "<img>"], special_tokens=True)
    with pytest.raises(ValueError, match=r"tokenizer: already has .*'<img>': \d+.*must be"):
        from_released(path, llm, clip_model(), shuffled)
    with pytest.raises(ValueError, match="v1, made for a causal LLM"):
        from_released(path, tiny_seq2seq("t5", size), clip_model(), word_tokenizer(WORDS))
