"""``python -m lmeye_fast.train``: train an LMEye stage from a YAML/JSON config and/or flags.

    python -m lmeye_fast.train --config stage2.yaml
    torchrun --nproc_per_node 8 -m lmeye_fast.train --config stage2.yaml --batch_size 4
    python -m lmeye_fast.train --llm lmsys/vicuna-7b-v1.5 --vision openai/clip-vit-large-patch14 \\
        --preset global_token --data llava_instruct.json --image_folder coco/ --output_dir out/stage2 \\
        --adapter out/stage1

The LLM is a causal LM or, as its config says, an encoder-decoder one (T5 /
FlanT5, BART). The same command runs in one process and under ``torchrun`` (the
Trainer then runs DDP, or DeepSpeed with ``--deepspeed ds.json``; ``--fsdp true`` shards the
frozen LLM with FSDP2 under the Trainer's DDP). ``output_dir`` gets
``checkpoint-N/`` every ``save_steps`` (adapter, optimizer, scheduler; never the
frozen LLM), from which ``--resume true`` continues under any of them; at the end, the
final adapter with its processor (tokenizer, prompt template) and the record of its
models, ``log.jsonl`` (one JSON object per log) and ``train_result.json`` (the run's
summary, also printed as one line: its skipped images, each rank's resident LLM
parameter bytes). ``python -m lmeye_fast.eval --adapter out/stage2 --data
questions.jsonl`` needs nothing else.
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

from ..atomic import write_atomic
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

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if config.fsdp and processes < 2:
        raise ValueError(f"fsdp: shards the LLM across the processes of torchrun, and this run has {processes} "
                         "(launch it with torchrun --nproc_per_node N, N >= 2, or leave fsdp out)")
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
    """Load the tokenizer, the LLM, the vision model and its image processor; wrap them as an LMEyeModel,
    or an LMEyeSeq2SeqModel when the LLM is an encoder-decoder (its config's ``is_encoder_decoder``): as
    ``preset`` builds it, from the saved ``adapter``, or with the sizes and ``vision_feature`` of the config."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, set_seed

    from ..models import LMEyeProcessor
    from ..models.presets import PRESETS, preset_vision
    from ..models.seq2seq import model_classes
    from ..models.sources import load_pretrained
    from ..models.vision import load_vision

    # The LLM's config alone decides the model class and is checked before any weights load.
    llm_config = AutoConfig.from_pretrained(config.llm, revision=config.llm_revision)
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
    template = config.template()
    if config.adapter is not None:
        # The adapter's own record of its processor and vision model; the config's template must agree with it.
        set_seed(config.seed)
        processor, model, image_processor = load_pretrained(
            config.adapter, llm=config.llm, vision=config.vision, llm_revision=config.llm_revision,
            vision_revision=config.vision_revision, dtype=dtype, vision_dtype=torch.float32, template=template)
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.llm, revision=config.llm_revision)
        llm = llm_class.from_pretrained(config.llm, revision=config.llm_revision, dtype=dtype)
        image_processor = AutoImageProcessor.from_pretrained(config.vision, revision=config.vision_revision)
        if config.preset is not None:
            vision = preset_vision(config.preset, config.vision, revision=config.vision_revision)
            set_seed(config.seed)  # after the loading, as below
            processor, model = PRESETS[config.preset](tokenizer, llm, vision, template=template,
                                                      **config.preset_settings(), schedule=schedule)
        else:
            feature = config.vision_feature or "tokens"
            vision = load_vision(config.vision, (feature,), revision=config.vision_revision)
            num_image_tokens = _num_vision_tokens(vision, image_processor, feature)
            # The adapter's initialisation draws from a generator seeded here, after the loading: zero.Init
            # initialises the modules it loads (and draws from the generator) where a plain load does not.
            set_seed(config.seed)
            processor = LMEyeProcessor(tokenizer, num_image_tokens=num_image_tokens,
                                       num_requests=config.num_requests, template=template,
                                       encoder_decoder=encoder_decoder, decoder_start_token_id=decoder_start_token_id)
            model = model_class(llm, processor.make_config(
                interaction_dim=config.interaction_dim, num_heads=config.num_heads,
                # The training config names one vision output; the static mapping and the IPN both read it.
                static_feature=feature, ipn_feature=feature,
                static_hidden_dim=config.static_hidden_dim, schedule=schedule), vision=vision)
    model.config.schedule = schedule
    model.set_stage(config.stage, train_special_tokens=config.train_special_tokens)
    return processor, image_processor, model


def _num_vision_tokens(vision, image_processor, feature: str) -> int:
    """N, the vision tower's tokens per image: as its config says (1 pooled or projected), else what it returns for one
    preprocessed image. Under ZeRO-3 its weights are partitioned until gathered, so the config comes first."""
    from ..models.vision import feature_shape

    count = feature_shape(vision, feature)[0]
    if count is not None:
        return count
    import torch
    from PIL import Image

    from ..models.gathered import gathered

    pixels = image_processor(images=Image.new("RGB", (32, 32)), return_tensors="pt")["pixel_values"]
    with torch.no_grad(), gathered(vision.parameters()):
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
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..data import LMEyeCollator, LMEyeDataset, LMEyeStream
    from .distributed import per_rank, resident_parameter_bytes
    from .trainer import LMEyeTrainer

    config, resume = check_before_loading(config)
    # The Trainer's arguments come first: under a ZeRO-3 config they make from_pretrained load the LLM
    # and the vision tower already partitioned (deepspeed.zero.Init), so no rank ever holds all of them.
    args = _training_arguments(config)
    processor, image_processor, model = _build(config)
    items = dict(image_folder=config.image_folder, caption_prompt=config.caption_prompt,
                 on_bad_image=config.on_bad_image, max_length=config.max_length)
    if config.streaming:
        dataset = LMEyeStream(_stream(config.data), processor, image_processor, **items)
    else:
        dataset = LMEyeDataset(config.data, processor, image_processor, **items)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # processing_class: every checkpoint and the final adapter get the processor (tokenizer, template).
    trainer = LMEyeTrainer(model=model, args=args, train_dataset=dataset, data_collator=LMEyeCollator(processor),
                           processing_class=processor, callbacks=[JsonLinesLog(output / "log.jsonl")],
                           shard_frozen=config.fsdp)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if config.progress:
        trainer.add_callback(ProgressBar())
    result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    trainer.save_model(str(output))
    # What each rank holds of the frozen LLM's weights: all of them under DDP, its share under ZeRO-3 and FSDP2.
    llm_bytes = per_rank(resident_parameter_bytes(trainer.accelerator.unwrap_model(trainer.model).llm))
    if trainer.is_world_process_zero():
        # result.metrics holds the run's skipped_images (and skipped_image_files), summed over workers and ranks.
        summary = {"global_step": result.global_step, "train_loss": result.training_loss, **result.metrics,
                   "llm_parameter_bytes_per_rank": llm_bytes}
        write_atomic(output / "train_result.json", json.dumps(summary, indent=2) + "\n")
        line = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        line.update({k: summary[k] for k in ("skipped_image_files", "llm_parameter_bytes_per_rank") if k in summary})
        print(json.dumps(line))
    return output
