"""LMEye on encoder-decoder LLMs (tiny random T5 and BART): the schedule against a plain per-row loop.

The loop below runs the schedule of docs/encoder_decoder.md one row at a time, unpadded, with
straightforward calls on the Hugging Face model: the token embeddings with the special rows
replaced, the static mapping added into the <img> rows, encoder pass 1 with the slot rows holding
the learned <img-d> embedding, the IPN's math written out (request, decomposition, per-head
attention over the kept sub-features, transmission), encoder pass 2 on the filled rows, and the
decoder once on that encoding. Tolerance: fp32 against fp32, relative error (max |a - b| /
max |b|) at most 1e-4 on the logits of every labelled column, the loss, and the gradient of
every adapter parameter (``special_embed`` row by row), with tests/test_models_schedules.py's checks.
"""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmeye_fast.models import (IGNORE_INDEX, LMEyeBaseModel, LMEyeModel, LMEyeProcessor, LMEyeSeq2SeqModel,
                               global_token, patch_tokens, published)
from lmeye_fast.models.modeling import ADAPTER_FILE
from lmeye_fast.models.processor import TokenizedRow
from lmeye_fast.models.tiny import SEQ2SEQ_ARCHITECTURES, tiny_clip_model, tiny_llm, tiny_seq2seq, word_tokenizer
from test_models_schedules import TOL, WORDS, assert_match, rel_err, sentence

# BART's default initialisation (std 0.02) leaves a tiny random BART almost blind to its input
# embeddings (the IPN's slots would move its logits by 0.2%); std 0.1 makes them count.
INIT = {"t5": {}, "bart": dict(init_std=0.1)}
# For the generation tests: weights large enough that a tiny random LLM's greedy tokens vary from row
# to row and step to step (at the default initialisation a tiny T5 repeats one token), drawn from a
# fixed seed: about one fresh draw in 40 still repeats one token everywhere, this one does not (0 in
# 100 fresh inputs). Their logits are in the hundreds, too ill-conditioned for the parity tests' 1e-4.
VARIED_INIT = {"t5": dict(initializer_factor=3.0), "bart": dict(init_std=1.0)}
VARIED_SEED = 0


def build(arch, num_requests=3, image_tokens=5, vision_dim=19, varied=False):
    tok = word_tokenizer(WORDS)
    proc = LMEyeProcessor(tok, num_image_tokens=image_tokens, num_requests=num_requests, response_prefix="answer :",
                          encoder_decoder=True)
    if varied:
        with torch.random.fork_rng():  # the adapter and the inputs stay fresh
            torch.manual_seed(VARIED_SEED)
            llm = tiny_seq2seq(arch, len(tok), hidden=48, heads=4, **VARIED_INIT[arch])
    else:
        llm = tiny_seq2seq(arch, len(tok), hidden=48, heads=4, **INIT[arch])
    config = proc.make_config(interaction_dim=20, num_heads=2, sub_features=2, vision_dim=vision_dim)
    model = LMEyeSeq2SeqModel(llm, config)
    with torch.no_grad():
        # Large enough that the transmitted tokens move the logits visibly.
        for p in list(model.static.parameters()) + list(model.ipn.parameters()) + [model.special_embed]:
            p.normal_(0.0, 0.3)
    return proc, model.eval()


def prompts(count):
    """Prompts of distinct, odd and even lengths, the image before or inside the text."""
    out = []
    for i, n in enumerate(random.sample(range(1, 12), count)):
        words = sentence(n, n).split()
        cut = random.randint(0, n)
        out.append(" ".join(words[:cut] + (["<img>"] if i % 2 else []) + words[cut:]))
    return out


def make_batch(proc, model, batch=3):
    out = proc(prompts(batch), [sentence(1, 5) for _ in range(batch)])
    dims = (batch, model.config.vision_dim, model.config.num_image_tokens)
    out["image_features"] = torch.randn(dims).transpose(1, 2)  # non-contiguous
    mask = torch.rand(batch, model.config.num_image_tokens) > 0.3
    mask[:, 0] = True
    out["image_mask"] = mask
    return out


def trainable(model):
    """Every adapter parameter trains, so that every one of them is checked."""
    model.set_stage(2, train_special_tokens=True)
    model.static.requires_grad_(True)
    return model


# ---------------------------------------------------------------- the plain loop


def plain_ipn(ipn, hidden, request_at, image, keep):
    """The IPN's transmitted tokens (R, D) for one row, its math written out."""
    R, Di, S, H = ipn.num_requests, ipn.interaction_dim, ipn.sub_features, ipn.num_heads
    requests = (ipn.request_proj(hidden[request_at])).reshape(R, Di)
    feats = ipn.decompose_proj(image).reshape(image.shape[0] * S, Di)     # row n*S + k: sub-feature k of token n
    keep = keep.repeat_interleave(S)
    width = Di // H
    heads = []
    for h in range(H):
        r, f = requests[:, h * width:(h + 1) * width], feats[keep, h * width:(h + 1) * width]
        heads.append(torch.softmax(r @ f.T / math.sqrt(width), dim=-1) @ f)
    z = torch.cat(heads, dim=-1) + requests
    return ipn.transmit_proj(z) + ipn.slot_embed


def plain_row(model, batch, row, schedule):
    """(decoder logits (L, V), summed cross-entropy, labelled count) of one row, unpadded."""
    length = int(batch["attention_mask"][row].sum())
    ids = batch["input_ids"][row, :length]
    embeds = model.llm.get_input_embeddings()(ids)
    for k, token in enumerate(model.config.token_ids()):
        embeds = torch.where((ids == token)[:, None], model.special_embed[k], embeds)
    image_pos = batch["image_pos"][row]
    has_image = bool((image_pos >= 0).all())
    if has_image:
        mapped = model.static.proj(batch["image_features"][row])
        embeds = embeds.index_add(0, image_pos, mapped)
    encoder = model.llm.get_encoder()
    if schedule == "two_pass" and has_image:
        hidden = encoder(inputs_embeds=embeds[None]).last_hidden_state[0]     # pass 1: slots hold <img-d>
        sent = plain_ipn(model.ipn, hidden, batch["request_pos"][row], batch["image_features"][row],
                         batch["image_mask"][row])
        embeds = embeds.index_add(0, batch["slot_pos"][row], sent)
    encoded = encoder(inputs_embeds=embeds[None])                                # pass 2
    labels = batch["labels"][row]
    labels = labels[labels != IGNORE_INDEX]
    start = torch.tensor([model.llm.config.decoder_start_token_id])
    decoder_ids = torch.cat([start, labels[:-1]])[None]
    logits = model.llm(encoder_outputs=encoded, decoder_input_ids=decoder_ids).logits[0]
    return logits, F.cross_entropy(logits, labels, reduction="sum"), len(labels)


def plain_loop(model, batch, schedule):
    """(logits (B, L, V), zero past each row's labels; loss; gradients), as ``batched`` returns them."""
    model.zero_grad(set_to_none=True)
    rows = [plain_row(model, batch, row, schedule) for row in range(batch["input_ids"].shape[0])]
    loss = sum(r[1] for r in rows) / sum(r[2] for r in rows)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logits = torch.zeros(len(rows), batch["labels"].shape[1], rows[0][0].shape[-1])
    for row, (row_logits, _, count) in enumerate(rows):
        logits[row, :count] = row_logits.detach()
    return logits, loss.detach(), grads


def batched(model, batch, schedule):
    model.zero_grad(set_to_none=True)
    out = model(**batch, schedule=schedule)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


# ---------------------------------------------------------------- schedule parity


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_two_pass_matches_the_plain_loop(arch):
    proc, model = build(arch)
    trainable(model)
    batch = make_batch(proc, model, batch=3)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and (lengths < batch["input_ids"].shape[1]).sum() == 2
    got = batched(model, batch, "two_pass")
    labelled = batch["labels"] != IGNORE_INDEX
    assert_match(got, plain_loop(model, batch, "two_pass"), labelled, f"{arch} two_pass vs plain loop")

    # The slots carry the IPN's output: the static-only model differs.
    with torch.no_grad():
        static = model(**batch, schedule="static").logits
    assert rel_err(static, got[0]) > 1e-2


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_static_matches_the_plain_loop(arch):
    proc, model = build(arch)
    model.set_stage(1)
    model.special_embed.requires_grad_(True)
    batch = make_batch(proc, model, batch=3)
    assert_match(batched(model, batch, "static"), plain_loop(model, batch, "static"), batch["labels"] != IGNORE_INDEX,
                 f"{arch} static vs plain loop")


def encoder_inputs(model, run):
    """The ``inputs_embeds`` of every encoder call during ``run()``, and how many times the decoder ran."""
    seen, decoded = [], []
    hooks = [model.encoder.register_forward_pre_hook(
                 lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()),
                 with_kwargs=True),
             model.llm.get_decoder().register_forward_pre_hook(lambda module, args: decoded.append(1))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen, len(decoded)


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_pass_one_reads_the_learned_slot_embedding_and_the_decoder_runs_once(arch):
    proc, model = build(arch)
    batch = make_batch(proc, model, batch=3)
    seen, decoded = encoder_inputs(model, lambda: model(**batch))
    assert len(seen) == 2 and decoded == 1
    first, second = seen
    rows = torch.arange(3)[:, None]
    slots = batch["slot_pos"]
    has_image = (slots >= 0).all(1)
    slot_rows = first[rows, slots.clamp_min(0)][has_image]
    # Pass 1: every slot row holds the learned <img-d> embedding, as LMEyeModel's two-pass schedule.
    assert torch.equal(slot_rows, model.special_embed[2].expand_as(slot_rows))
    # Pass 2: the slots hold the IPN's tokens added to it; every other row is untouched.
    with torch.no_grad():
        hidden = model.encoder(inputs_embeds=first, attention_mask=batch["attention_mask"]).last_hidden_state
        sent = model.ipn.transmitted(hidden, batch["image_features"], request_pos=batch["request_pos"],
                                     image_mask=batch["image_mask"])
    assert rel_err(second[rows, slots.clamp_min(0)][has_image], slot_rows + sent[has_image]) <= TOL
    untouched = torch.ones_like(batch["attention_mask"], dtype=torch.bool)
    untouched[rows.expand_as(slots)[has_image], slots[has_image]] = False
    assert torch.equal(first[untouched], second[untouched])

    seen, decoded = encoder_inputs(model, lambda: model(**batch, schedule="static"))
    assert len(seen) == 1 and decoded == 1


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_attention_weights_are_those_of_the_request_read_in_pass_one(arch):
    proc, model = build(arch)
    batch = make_batch(proc, model, batch=3)
    weights = model.attention_weights(**batch)
    assert weights.shape == (3, 2, 3, 2 * model.config.num_image_tokens)  # (B, H, R, M*S)
    (first, _), _ = encoder_inputs(model, lambda: model(**batch))
    with torch.no_grad():
        hidden = model.encoder(inputs_embeds=first, attention_mask=batch["attention_mask"]).last_hidden_state
    expected = model.ipn.attention_weights(hidden, batch["image_features"], request_pos=batch["request_pos"],
                                           image_mask=batch["image_mask"])
    torch.testing.assert_close(weights, expected)
    masked = ~batch["image_mask"].repeat_interleave(2, dim=1)[:, None, None, :].expand_as(weights)
    assert torch.equal(weights[masked], torch.zeros_like(weights[masked]))


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_padded_batch_equals_each_row_alone(arch):
    """Right padding in the encoder is masked; in BART (absolute positions) each row keeps its positions."""
    proc, model = build(arch)
    texts, answers = prompts(3), [sentence(1, 5) for _ in range(3)]
    image = torch.randn(3, 5, 19)
    with torch.no_grad():
        together = model(**proc(texts, answers), image_features=image).logits
        for row in range(3):
            alone = model(**proc(texts[row:row + 1], answers[row:row + 1]), image_features=image[row:row + 1]).logits
            assert rel_err(together[row, :alone.shape[1]], alone[0]) <= TOL, f"row {row}"


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
def test_decoder_inputs_are_the_start_token_then_the_labels_shifted_right(arch):
    proc, model = build(arch)
    # Answers of 1, 3 and 5 words: the shorter rows are right-padded.
    labels = proc(prompts(3), [sentence(n, n) for n in (1, 3, 5)])["labels"]
    assert (labels == IGNORE_INDEX).any()
    got = model.decoder_inputs(labels)
    start = model.llm.config.decoder_start_token_id
    assert got.shape == labels.shape and (got[:, 0] == start).all()
    shifted = labels[:, :-1]
    assert torch.equal(got[:, 1:], shifted.masked_fill(shifted == IGNORE_INDEX, proc.pad_token_id))
    # For T5 and BART, the families' own label shift gives the same.
    assert torch.equal(got, model.llm.prepare_decoder_input_ids_from_labels(labels=labels))


def test_the_two_models_share_the_base_class_and_not_each_other():
    _, seq2seq = build("t5")
    tok = word_tokenizer(WORDS)
    proc = LMEyeProcessor(tok, num_image_tokens=5)
    decoder_only = LMEyeModel(tiny_llm("llama", len(tok)), proc.make_config(vision_dim=19))
    assert isinstance(seq2seq, LMEyeBaseModel) and isinstance(decoder_only, LMEyeBaseModel)
    assert not isinstance(seq2seq, LMEyeModel) and not isinstance(decoder_only, LMEyeSeq2SeqModel)
    with pytest.raises(TypeError, match="abstract"):
        LMEyeBaseModel(tiny_llm("llama", len(tok)), proc.make_config(vision_dim=19))


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHITECTURES)
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_generation_equals_one_by_one(arch, beams):
    proc, model = build(arch, varied=True)
    texts = prompts(4)
    image = torch.randn(4, 5, 19)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=beams)
    seen, _ = encoder_inputs(model, lambda: model.generate(**proc(texts), image_features=image, **kwargs))
    assert len(seen) == 2, "the encoder runs twice (pass 1, pass 2), then every step and beam reuses it"
    together = model.generate(**proc(texts), image_features=image, **kwargs)
    assert together.shape == (4, 6)
    assert together.unique().numel() > 1, "one token everywhere would make a weak test"
    for row in range(4):
        alone = model.generate(**proc(texts[row:row + 1]), image_features=image[row:row + 1], **kwargs)
        assert torch.equal(together[row], alone[0]), f"row {row}"
    if beams == 1:
        # The first greedy token is the argmax of the forward's first decoder column (EOS barred, and
        # LMEye's own tokens, which generation never produces).
        start = torch.full((4, 1), model.llm.config.decoder_start_token_id)
        first = model(**proc(texts), image_features=image, decoder_input_ids=start).logits[:, 0]
        first[:, [proc.eos_token_id, *model.config.token_ids()]] = float("-inf")
        assert torch.equal(together[:, 0], first.argmax(-1))


def test_generation_from_a_training_batch_and_the_static_schedule():
    proc, model = build("t5")
    batch = make_batch(proc, model, batch=2)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    tokens = model.generate(**batch, **kwargs)  # labels are dropped
    assert tokens.shape == (2, 3) and len(proc.decode(tokens)) == 2
    assert model.generate(**batch, schedule="static", **kwargs).shape == (2, 3)


# ---------------------------------------------------------------- processor, stages, save / load


def test_processor_layout():
    proc, _ = build("t5", num_requests=2, image_tokens=3)
    batch = proc(["what colour <img> is the circle", "red"], ["blue", "green left"])
    assert set(batch) == {"input_ids", "attention_mask", "image_pos", "request_pos", "slot_pos", "labels"}
    ids, tok = batch["input_ids"], proc.tokenizer
    want = ["<bos>", "what", "colour", "<img>", "<img>", "<img>", "is", "the", "circle", "<img-q>", "<img-d>",
            "<img-d>", "answer", ":", "<eos>"]
    assert tok.convert_ids_to_tokens(ids[0].tolist()) == want
    assert batch["image_pos"][0].tolist() == [3, 4, 5] and batch["request_pos"][0] == 9
    assert batch["slot_pos"][0].tolist() == [10, 11]
    second = tok.convert_ids_to_tokens(ids[1, :int(batch["attention_mask"][1].sum())].tolist())
    assert second == ["<bos>", "<img>", "<img>", "<img>", "red", "<img-q>", "<img-d>", "<img-d>", "answer", ":",
                      "<eos>"]
    assert (ids[1, len(second):] == proc.pad_token_id).all()  # right-padded
    assert tok.convert_ids_to_tokens(batch["labels"][1].tolist()) == ["green", "left", "<eos>"]
    assert batch["labels"][0, 2] == IGNORE_INDEX
    config = proc.make_config(interaction_dim=8, num_heads=2)
    assert config.encoder_decoder and config.schedule == "two_pass"
    # Conversations (LMEyeCollator) need the decoder start token, which this processor was not given.
    with pytest.raises(ValueError, match="^decoder_start_token_id: required"):
        proc.pad([TokenizedRow(*proc.prefix_ids("red"), [], [])])


def test_stages_train_the_right_parts():
    proc, model = build("bart")
    batch = make_batch(proc, model, batch=2)
    names = lambda: {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    model.set_stage(1)
    assert names() == {"static"}
    model.set_stage(2)
    assert names() == {"ipn"}
    model.set_stage(2, train_special_tokens=True)
    assert names() == {"ipn", "special_embed"}
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_save_load_round_trip(tmp_path):
    proc, model = build("t5")
    llm_state = {k: v.clone() for k, v in model.llm.state_dict().items()}
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / ADAPTER_FILE))
    assert all(k.startswith(("static.", "ipn.")) or k == "special_embed" for k in saved)
    assert json.loads((tmp_path / "lmeye_config.json").read_text())["config"]["encoder_decoder"] is True

    fresh = tiny_seq2seq("t5", len(proc), hidden=48, heads=4)
    fresh.load_state_dict(llm_state)
    restored = LMEyeSeq2SeqModel.from_pretrained(tmp_path, llm=fresh).eval()
    assert restored.config == model.config
    batch = make_batch(proc, model, batch=2)
    with torch.no_grad():
        want, got = model(**batch), restored(**batch)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    with pytest.raises(ValueError, match="llm: T5ForConditionalGeneration is an encoder-decoder LLM"):
        LMEyeModel.from_pretrained(tmp_path, llm=tiny_seq2seq("t5", len(proc), hidden=48, heads=4))


def test_presets_pick_the_encoder_decoder_model():
    tok = word_tokenizer(WORDS)
    clip = tiny_clip_model(text_hidden=16)
    processor, model = published(tok, tiny_seq2seq("t5", len(tok) + 3), clip, response_prefix="answer :")
    assert isinstance(model, LMEyeSeq2SeqModel) and processor.encoder_decoder
    assert processor.decoder_start_token_id == model.llm.config.decoder_start_token_id  # so LMEyeCollator batches it
    batch = processor(["what colour"], ["red"], images=torch.rand(1, 3, 32, 32))
    assert torch.isfinite(model(**batch).loss)
    processor, model = patch_tokens(word_tokenizer(WORDS), tiny_seq2seq("bart", len(tok) + 3), clip,
                                    interaction_dim=16, num_heads=2)
    assert isinstance(model, LMEyeSeq2SeqModel) and model.config.num_image_tokens == 17
    assert processor.decoder_start_token_id == model.llm.config.decoder_start_token_id
    processor, model = global_token(tok, tiny_seq2seq("t5", len(tok) + 3), clip, interaction_dim=16, num_heads=2)
    assert isinstance(model, LMEyeSeq2SeqModel) and model.config.num_image_tokens == 1
    batch = processor(["what colour"], ["red"], images=torch.rand(1, 3, 32, 32))
    assert torch.isfinite(model(**batch).loss)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    proc, model = build("t5")
    batch = make_batch(proc, model, batch=2)
    with pytest.raises(ValueError, match="schedule: expected one of .'two_pass', 'static'."):
        model(**batch, schedule="single_pass")
    with pytest.raises(ValueError, match="labels / decoder_input_ids"):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(TypeError, match="labels"):
        model(**dict(batch, labels=batch["labels"].float()))
    with pytest.raises(ValueError, match="labels"):
        model(**batch, decoder_input_ids=batch["labels"][:, :1].clamp_min(0))
    with pytest.raises(ValueError, match="image_features"):
        model(**dict(batch, image_features=batch["image_features"][:, :-1]))
    with pytest.raises(ValueError, match="pixel_values / image_features"):
        model(**{k: v for k, v in batch.items() if k != "image_features"})
    with pytest.raises(ValueError, match="slot_pos: required"):
        model(**dict(batch, slot_pos=None))
    with pytest.raises(ValueError, match="slot_pos"):
        model(**dict(batch, slot_pos=batch["slot_pos"] + 100), validate=True)
    with pytest.raises(ValueError, match="attention_mask"):
        model(**dict(batch, attention_mask=batch["attention_mask"][:, :-1]))
    with pytest.raises(ValueError, match="llm: LlamaForCausalLM is a decoder-only LLM; wrap it in LMEyeModel"):
        LMEyeSeq2SeqModel(tiny_llm("llama", len(proc)), model.config)
    decoder_only = LMEyeProcessor(word_tokenizer(WORDS), num_image_tokens=5).make_config(vision_dim=19)
    with pytest.raises(ValueError, match="config: made for a decoder-only LLM"):
        LMEyeSeq2SeqModel(tiny_seq2seq("t5", len(proc)), decoder_only)
    with pytest.raises(ValueError, match="schedule: expected one of .* for an encoder-decoder LLM"):
        proc.make_config(schedule="single_pass")
    no_start = tiny_seq2seq("t5", len(proc), decoder_start_token_id=None)
    no_start.generation_config.decoder_start_token_id = None
    with pytest.raises(ValueError, match="llm: T5ForConditionalGeneration names no decoder_start_token_id"):
        LMEyeSeq2SeqModel(no_start, model.config)
