"""LMEyeTrainer: an LMEyeModel (or LMEyeSeq2SeqModel, on a T5) under transformers.Trainer, adapter-only
checkpoints, resume, accumulation."""

import os

import pytest
import torch
from training_helpers import image_processor, relative_difference, tiny_model, write_llava

pytest.importorskip("accelerate")

from transformers import TrainingArguments  # noqa: E402

from lmeye_fast.data import LMEyeCollator, LMEyeDataset  # noqa: E402
from lmeye_fast.models import IGNORE_INDEX  # noqa: E402
from lmeye_fast.models.modeling import ADAPTER_FILE  # noqa: E402
from lmeye_fast.train import LMEyeTrainer, encoder_decoder_loss  # noqa: E402


def arguments(output_dir, **overrides):
    options = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True, seed=5,
                   per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=3e-2,
                   save_steps=2, logging_steps=1, dataloader_num_workers=0, ddp_find_unused_parameters=False)
    options.update(overrides)
    return TrainingArguments(**options)


def seeded_model(stage, arch="llama"):
    torch.manual_seed(0)
    return tiny_model(stage, arch)


def tiny_dataset(tmp_path, processor):
    return LMEyeDataset(write_llava(tmp_path / "data", count=8, text_only=2), processor, image_processor(),
                        image_folder=tmp_path / "data" / "images")


def run(tmp_path, name, stage=2, resume=None, arch="llama", model=None, **overrides):
    """Train the seeded tiny model of ``arch`` (or the ``(processor, model)`` given) on the tiny data set."""
    processor, model = model or seeded_model(stage, arch)
    trainer = LMEyeTrainer(model=model, args=arguments(tmp_path / name, **overrides),
                           train_dataset=tiny_dataset(tmp_path, processor), data_collator=LMEyeCollator(processor))
    frozen = {k: v.clone() for k, v in model.llm.state_dict().items()}
    result = trainer.train(resume_from_checkpoint=resume)
    assert all(torch.equal(v, frozen[k]) for k, v in model.llm.state_dict().items())
    return trainer, model, result


def adapter(model):
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoints_hold_the_adapter_and_optimizer_only(tmp_path, stage, arch):
    before = adapter(seeded_model(stage, arch)[1])
    trainer, model, result = run(tmp_path, "out", stage=stage, arch=arch)
    after = adapter(model)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith("static." if stage == 1 else ("ipn.", "special_embed")) for k in moved)
    assert torch.isfinite(torch.tensor(result.training_loss))

    checkpoint = tmp_path / "out" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {ADAPTER_FILE, "lmeye_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    adapter_bytes = sum(v.numel() * v.element_size() for v in after.values())
    assert os.path.getsize(checkpoint / ADAPTER_FILE) < adapter_bytes + 8192
    llm_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    assert sum(os.path.getsize(checkpoint / f) for f in files) < llm_bytes

    trainer.save_model(tmp_path / "final")
    processor, fresh = tiny_model(stage, arch)
    loaded = type(model).from_pretrained(tmp_path / "final", fresh.llm, fresh.vision)
    assert all(torch.equal(v, after[k]) for k, v in loaded.adapter_state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_resume_from_checkpoint_continues_the_same_run(tmp_path, arch):
    _, whole, _ = run(tmp_path, "whole", arch=arch)
    _, resumed, _ = run(tmp_path, "resumed", arch=arch, resume=str(tmp_path / "whole" / "checkpoint-2"))
    expected, got = adapter(whole), adapter(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=0)


def seeded_float64_model(arch):
    processor, model = seeded_model(2, arch)
    return processor, model.double()


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_gradient_accumulation_matches_one_large_batch(tmp_path, arch):
    """Labelled tokens differ per micro-batch; the loss is normalised over the whole accumulated batch. In
    float64: batches of 2 and of 4 sum in different orders, and in float32 Adam turns that rounding into
    relative changes of about 1e-5, the size of a normalisation error worth catching."""
    _, accumulated, first = run(tmp_path, "accumulated", arch=arch, model=seeded_float64_model(arch), save_steps=100)
    _, large, second = run(tmp_path, "large", arch=arch, model=seeded_float64_model(arch),
                           per_device_train_batch_size=4, gradient_accumulation_steps=1, save_steps=100)
    assert first.training_loss == pytest.approx(second.training_loss, rel=1e-6)  # logged in float32
    expected, got = adapter(large), adapter(accumulated)
    assert max(relative_difference(got[key], expected[key]) for key in expected) <= 1e-9


def test_an_encoder_decoder_model_learns_with_the_models_own_loss(tmp_path):
    """On a tiny T5, eight steps lower the loss of the whole data set (by 18-39% over six seeds), and the
    Trainer's loss is the decoder's cross-entropy of the labelled tokens, the model's own."""
    processor, model = tiny_model(2, "t5")
    whole = LMEyeCollator(processor)(list(tiny_dataset(tmp_path, processor)))

    def loss():
        with torch.no_grad():
            return model(**whole)

    before = loss()
    labelled = int((whole["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(encoder_decoder_loss(before, whole["labels"]), before.loss)
    torch.testing.assert_close(encoder_decoder_loss(before, whole["labels"], num_items_in_batch=2 * labelled),
                               before.loss / 2)
    trainer, _, result = run(tmp_path, "learns", model=(processor, model), max_steps=8, save_steps=100)
    assert trainer.compute_loss_func is encoder_decoder_loss
    assert loss().loss < 0.9 * before.loss and torch.isfinite(torch.tensor(result.training_loss))


def test_refuses_a_model_without_trainable_parameters(tmp_path):
    _, model = tiny_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="set_stage"):
        LMEyeTrainer(model=model, args=arguments(tmp_path))


def test_bf16_mixed_precision_keeps_the_adapter_in_float32(tmp_path):
    trainer, model, result = run(tmp_path, "bf16", bf16=True, save_steps=100)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
