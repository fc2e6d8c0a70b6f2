"""``python -m lmeye_fast.train``: train an LMEye stage from a YAML/JSON config and/or flags.

    python -m lmeye_fast.train --config stage2.yaml
    torchrun --nproc_per_node 8 -m lmeye_fast.train --config stage2.yaml --batch_size 4
    python -m lmeye_fast.train --llm lmsys/vicuna-7b-v1.5 --vision openai/clip-vit-large-patch14 \\
        --data llava_instruct.json --image_folder coco/ --output_dir out/stage2 --adapter out/stage1

The LLM is a causal LM or, as its config says, an encoder-decoder one (T5 /
FlanT5, BART). The same command runs in one process and under ``torchrun`` (the
Trainer then runs DDP, or DeepSpeed with ``--deepspeed ds.json``). ``output_dir`` gets
``checkpoint-N/`` every ``save_steps`` (adapter, optimizer, scheduler), the
final adapter with the tokenizer, and ``log.jsonl`` (one JSON object per log).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

from transformers import TrainerCallback

from ..atomic import replace_files, write_atomic
from .config import TrainConfig, load_config

__all__ = ["main", "parse_args", "JsonLinesLog", "ProgressBar"]


def _flag_value(text: str):
    """A flag's value as JSON when it parses (numbers, true/false, null), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m lmeye_fast.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML or JSON file of the keys below; flags override it")
    for field in dataclasses.fields(TrainConfig):
        default = "required" if field.default is dataclasses.MISSING else f"default {field.default!r}"
        parser.add_argument(f"--{field.name}", type=_flag_value, default=argparse.SUPPRESS,
                            help=f"{field.type}, {default}")
    options = vars(parser.parse_args(argv))
    return load_config(options.pop("config", None), options)


class JsonLinesLog(TrainerCallback):
    """Appends every Trainer log (loss, learning rate, grad norm, ...) to ``path`` as one JSON line, on rank 0."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "time": round(time.time(), 3), **logs}) + "\n")


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps (its ETA) with the last logged loss and the input tokens per second."""

    def __init__(self):
        self.bar = None
        self.start_tokens, self.start_time = 0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
            self.start_tokens, self.start_time = state.num_input_tokens_seen, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        elapsed = time.perf_counter() - self.start_time
        tokens = (state.num_input_tokens_seen - self.start_tokens) / max(elapsed, 1e-9)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tokens_per_s=f"{tokens:,.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# Keys of the adapter's structure that a flag also sets: the flag must agree with a saved adapter.
ADAPTER_KEYS = ("num_requests", "interaction_dim", "num_heads", "static_hidden_dim")


def check_before_loading(config: TrainConfig) -> Tuple[TrainConfig, Optional[Path]]:
    """What ``TrainConfig`` cannot check alone, checked before any model loads: the adapter folder is
    complete, the checkpoint to resume exists and is complete, and the adapter flags agree with the
    adapter that training continues (``adapter``, or the resumed checkpoint's). A flag left at its
    default takes the adapter's value. Returns the config so completed and the checkpoint to resume."""
    from ..models import LMEyeConfig
    from ..models.adapter_files import check_adapter
    from .checkpoints import checkpoint_to_resume

    resume = checkpoint_to_resume(config.resume, config.output_dir)
    for key, folder in (("adapter", config.adapter), ("resume", resume)):
        if folder is None:
            continue
        check_adapter(folder, key)
        saved = LMEyeConfig.load(folder)
        for name in ADAPTER_KEYS:
            value, default = getattr(config, name), TrainConfig.__dataclass_fields__[name].default
            if value != default and value != getattr(saved, name):
                raise ValueError(f"{name}: {value!r} contradicts the {key} {folder}, saved with {name}="
                                 f"{getattr(saved, name)!r}")
        config = dataclasses.replace(config, **{name: getattr(saved, name) for name in ADAPTER_KEYS})
    return config, resume


def _build(config: TrainConfig):
    """Load the tokenizer, the LLM, the vision tower and its image processor; wrap them as an LMEyeModel,
    or an LMEyeSeq2SeqModel when the LLM is an encoder-decoder (its config's ``is_encoder_decoder``)."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    from ..models import LMEyeProcessor
    from ..models.seq2seq import model_classes

    # The LLM's config alone decides the model class and is checked before any weights load.
    llm_config = AutoConfig.from_pretrained(config.llm)
    encoder_decoder = bool(getattr(llm_config, "is_encoder_decoder", False))
    llm_class, model_class = model_classes(encoder_decoder)
    schedule = config.model_schedule(encoder_decoder)
    if schedule not in model_class.schedules:
        raise ValueError(f"schedule: expected one of {model_class.schedules} for the "
                         f"{'encoder-decoder' if encoder_decoder else 'decoder-only'} LLM {config.llm}, "
                         f"got {schedule!r}")
    decoder_start_token_id = getattr(llm_config, "decoder_start_token_id", None) if encoder_decoder else None
    if encoder_decoder and decoder_start_token_id is None:
        raise ValueError(f"llm: the encoder-decoder LLM {config.llm} has no decoder_start_token_id in its config, "
                         "and the decoder's input begins with it")
    dtype = getattr(torch, config.llm_dtype)
    tokenizer = AutoTokenizer.from_pretrained(config.llm)
    llm = llm_class.from_pretrained(config.llm, dtype=dtype)
    vision = AutoModel.from_pretrained(config.vision)
    # A two-tower checkpoint (CLIP's openai/clip-vit-large-patch14, SigLIP) loads whole; LMEye reads its image side.
    vision = getattr(vision, "vision_model", vision)
    image_processor = AutoImageProcessor.from_pretrained(config.vision)
    num_image_tokens = _num_vision_tokens(vision, image_processor, config.vision_feature)
    processor = LMEyeProcessor(tokenizer, num_image_tokens=num_image_tokens, num_requests=config.num_requests,
                               encoder_decoder=encoder_decoder, decoder_start_token_id=decoder_start_token_id)
    if config.adapter is not None:
        model = model_class.from_pretrained(config.adapter, llm, vision=vision)
    else:
        model = model_class(llm, processor.make_config(
            interaction_dim=config.interaction_dim, num_heads=config.num_heads,
            # The training config names one vision output; the static mapping and the IPN both read it.
            static_feature=config.vision_feature, ipn_feature=config.vision_feature,
            static_hidden_dim=config.static_hidden_dim, schedule=schedule), vision=vision)
    model.config.schedule = schedule
    model.set_stage(config.stage, train_special_tokens=config.train_special_tokens)
    return tokenizer, processor, image_processor, model


def _num_vision_tokens(vision, image_processor, feature: str) -> int:
    """N, the vision tower's tokens per image: 1 pooled, else what it returns for one preprocessed image."""
    if feature == "pooled":
        return 1
    import torch
    from PIL import Image

    pixels = image_processor(images=Image.new("RGB", (32, 32)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = vision(pixels.to(next(vision.parameters()).dtype))
    return out.shape[1] if isinstance(out, torch.Tensor) else out.last_hidden_state.shape[1]


def _stream(path: str):
    """The records of ``path`` read as they come: datasets' json builder reads a JSON list and JSONL alike."""
    from datasets import load_dataset

    builder = "csv" if Path(path).suffix.lower() == ".csv" else "json"
    return load_dataset(builder, data_files=path, streaming=True, split="train")


def _training_arguments(config: TrainConfig):
    import torch
    from transformers import TrainingArguments

    on_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=config.output_dir, seed=config.seed, use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and distributed else None,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler, max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.epochs, max_steps=config.max_steps, bf16=config.bf16,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_num_workers=config.num_workers, dataloader_persistent_workers=config.num_workers > 0,
        logging_steps=config.logging_steps, save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, deepspeed=config.deepspeed, report_to=[], disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        # Accelerate would read a stream on rank 0 and send out concatenated batches, which fails on
        # batches padded to different lengths; instead every rank reads the stream and keeps its share.
        accelerator_config={"dispatch_batches": False} if config.streaming else None,
        # Every trainable parameter takes part in every step, and the frozen towers' buffers never change.
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False)


def main(argv: Optional[List[str]] = None) -> Path:
    """Run the CLI; returns the output directory, which holds the final adapter."""
    config = parse_args(argv)
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..data import ChatTemplate, LMEyeCollator, LMEyeDataset, LMEyeStream
    from .trainer import LMEyeTrainer

    config, resume = check_before_loading(config)
    args = _training_arguments(config)
    set_seed(config.seed)  # the adapter's initialisation, before the Trainer seeds the rest
    tokenizer, processor, image_processor, model = _build(config)
    items = dict(image_folder=config.image_folder, caption_prompt=config.caption_prompt,
                 template=ChatTemplate(config.system_prompt, config.user_prefix, config.assistant_prefix),
                 on_bad_image=config.on_bad_image, max_length=config.max_length)
    if config.streaming:
        dataset = LMEyeStream(_stream(config.data), processor, image_processor, **items)
    else:
        dataset = LMEyeDataset(config.data, processor, image_processor, **items)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    trainer = LMEyeTrainer(model=model, args=args, train_dataset=dataset, data_collator=LMEyeCollator(processor),
                           callbacks=[JsonLinesLog(output / "log.jsonl")])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if config.progress:
        trainer.add_callback(ProgressBar())
    result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        replace_files(output, tokenizer.save_pretrained)  # with the special tokens whose ids the adapter's config holds
        # No skipped-image count here: DataLoader workers count their own (each warns on its first).
        summary = {"global_step": result.global_step, "train_loss": result.training_loss, **result.metrics}
        write_atomic(output / "train_result.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}))
    return output
