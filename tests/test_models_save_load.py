"""save_pretrained / from_pretrained: adapter only, safetensors + JSON, mismatches refused before loading."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmeye_fast.models import LMEyeConfig, LMEyeModel, LMEyeProcessor
from lmeye_fast.models.modeling import ADAPTER_FILE
from lmeye_fast.models.sources import SOURCES_FILE
from lmeye_fast.models.tiny import tiny_llm, word_tokenizer

WORDS = "what colour is the circle square red blue answer :".split()


def build(interaction_dim=16, hidden=32, static_hidden_dim=None):
    tok = word_tokenizer(WORDS)
    proc = LMEyeProcessor(tok, num_image_tokens=4, num_requests=2, response_prefix="answer :")
    llm = tiny_llm("llama", len(tok), hidden=hidden)
    pristine = copy.deepcopy(llm)
    config = proc.make_config(interaction_dim=interaction_dim, num_heads=2, vision_dim=11,
                              static_hidden_dim=static_hidden_dim)
    model = LMEyeModel(llm, config)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.normal_(0.0, 0.3)
    return proc, model.eval(), pristine


def snapshot(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("static_hidden_dim", [None, 13])
def test_round_trip_restores_outputs(tmp_path, static_hidden_dim):
    proc, model, pristine = build(static_hidden_dim=static_hidden_dim)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_FILE, "lmeye_config.json", SOURCES_FILE])
    saved = load_file(str(tmp_path / ADAPTER_FILE))
    assert all(k.startswith(("static.", "ipn.")) or k == "special_embed" for k in saved)
    assert not any("llm" in k for k in saved)
    assert json.loads((tmp_path / "lmeye_config.json").read_text())["config"]["llm_dim"] == 32

    restored = LMEyeModel.from_pretrained(tmp_path, llm=pristine).eval()
    assert restored.config == model.config
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(restored.adapter_state_dict()[key], value), key
    batch = proc(["what colour is the circle", "red"], ["blue", "square circle"])
    image = torch.randn(2, 4, 11)
    with torch.no_grad():
        want = model(**batch, image_features=image)
        got = restored(**batch, image_features=image)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)


def test_mismatched_config_fails_and_loads_nothing(tmp_path):
    _, small, _ = build(interaction_dim=16)
    small.save_pretrained(tmp_path)
    _, other, _ = build(interaction_dim=8)
    before = snapshot(other)
    with pytest.raises(ValueError, match="interaction_dim: saved 16, model 8"):
        other.load_adapter(tmp_path)
    for key, value in other.adapter_state_dict().items():
        assert torch.equal(value, before[key])


def test_tampered_tensor_fails_and_loads_nothing(tmp_path):
    _, model, _ = build()
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_FILE))
    tensors["ipn.transmit_proj.weight"] = tensors["ipn.transmit_proj.weight"][:, :-1].contiguous()
    del tensors["special_embed"]
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / ADAPTER_FILE))
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        model.load_adapter(tmp_path)
    message = str(info.value)
    assert "missing special_embed" in message and "unexpected extra" in message
    assert "ipn.transmit_proj.weight: saved shape" in message
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(value, before[key])


def test_from_pretrained_refuses_a_different_llm_before_touching_it(tmp_path):
    _, model, _ = build(hidden=32)
    model.save_pretrained(tmp_path)
    wider = tiny_llm("llama", 10, hidden=48)
    rows = wider.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="32 wide"):
        LMEyeModel.from_pretrained(tmp_path, llm=wider)
    assert wider.get_input_embeddings().num_embeddings == rows

    (tmp_path / ADAPTER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        LMEyeModel.from_pretrained(tmp_path, llm=tiny_llm("llama", 10, hidden=32))


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="lmeye_config.json"):
        LMEyeModel.from_pretrained(tmp_path, llm=tiny_llm("llama", 10))
    (tmp_path / "lmeye_config.json").write_text(json.dumps({"format_version": 1, "config": {"num_image_tokens": 2,
                                                                                             "colour": "red"}}))
    with pytest.raises(ValueError, match="unknown fields"):
        LMEyeConfig.load(tmp_path)
    (tmp_path / "lmeye_config.json").write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        LMEyeConfig.load(tmp_path)
