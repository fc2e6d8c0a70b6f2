"""``transformers.Trainer`` for LMEye: checkpoints hold the adapter and the optimizer, never the frozen LLM.

    trainer = LMEyeTrainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
                           data_collator=LMEyeCollator(processor))
    trainer.train(resume_from_checkpoint=...)
    trainer.save_model(out)                     # then LMEyeModel.from_pretrained(out, llm, vision)

An ``LMEyeSeq2SeqModel`` (an encoder-decoder LLM) trains the same way, on the
collator's batches of an encoder-decoder processor.

Everything else is the Trainer's own: DDP under ``torchrun`` (the frozen LLM and
vision tower left out of DDP's broadcasts), DeepSpeed ZeRO-2 and ZeRO-3 through
``deepspeed=`` (resumable: DeepSpeed's checkpoints leave the frozen LLM out, and
load back around it), gradient accumulation, mixed precision, logging, the
learning-rate schedule. ``shard_frozen=True`` adds FSDP2 under that DDP: the
frozen LLM and vision tower sharded across the ranks (``shard_frozen_llm``),
the adapter whole on each, its gradients all-reduced by DDP as without it.

Images the dataset skipped (``on_bad_image="skip"``) are counted over every
DataLoader worker and rank: each item names the images skipped to reach it, and
every log carries the run's total ``skipped_images`` (and the first few files,
``skipped_image_files``), warned about once, on rank 0.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Dict, List, Sequence

import torch
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..atomic import replace_files, replacing
from ..data import SKIPPED_IMAGES
from ..models.modeling import LMEyeBaseModel, LMEyeModel
from ..models.seq2seq import LMEyeSeq2SeqModel
from .checkpoints import checkpoint_to_resume, mark_complete, remove_incomplete_checkpoints, unmark
from .distributed import leave_frozen_out_of_ddp, per_rank, shard_frozen_llm

__all__ = ["LMEyeTrainer", "suffix_loss", "encoder_decoder_loss"]

# How many of the skipped images' file names the logs and the run's summary list.
SKIPPED_EXAMPLES = 5


# The models' own losses, under the names the Trainer's users know: ``suffix_loss`` for a decoder-only LLM,
# ``encoder_decoder_loss`` for an encoder-decoder one (each model's ``loss``, its ``compute_loss_func``).
suffix_loss = LMEyeModel.loss
encoder_decoder_loss = LMEyeSeq2SeqModel.loss


class _SkipRecordingCollator:
    """A collator that also puts the images skipped to reach its items into the batch (``SKIPPED_IMAGES``),
    so that the count crosses the DataLoader workers' processes with the data; the trainer takes it out
    before the model runs. Picklable, as DataLoader workers need."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: Sequence[Dict]):
        batch = self.collate(items)
        skipped = [path for item in items for path in item.get(SKIPPED_IMAGES, ())]
        if skipped:
            batch[SKIPPED_IMAGES] = skipped
        return batch


class LMEyeTrainer(Trainer):
    """A ``Trainer`` for an ``LMEyeModel`` or ``LMEyeSeq2SeqModel`` fed by ``LMEyeCollator`` batches.

    Checkpoints and ``save_model`` write ``LMEyeModel.save_pretrained``'s adapter
    (plus the Trainer's optimizer, scheduler and RNG state in checkpoints);
    ``resume_from_checkpoint`` loads that adapter back: True takes the newest *complete* checkpoint
    (``checkpoints.latest_complete_checkpoint``), a path must be a complete one. A checkpoint is
    marked complete after every rank has written it, and ``save_total_limit`` deletes old ones only
    then, so a kill while saving never costs the checkpoint before. The loss is
    ``suffix_loss``, or ``encoder_decoder_loss`` for an encoder-decoder LLM.

    ``shard_frozen``: shard the frozen LLM and vision tower with FSDP2 (``shard_frozen_llm``) once the
    Trainer has started torch.distributed and placed the model, so that each rank holds its share of them.
    """

    def __init__(self, model: LMEyeBaseModel = None, *args, shard_frozen: bool = False, **kwargs):
        if not isinstance(model, LMEyeBaseModel):
            raise TypeError(f"model: expected an LMEyeModel or LMEyeSeq2SeqModel, got {type(model).__name__}")
        if not model.trainable_parameters():
            raise ValueError("model: no parameter requires grad; call model.set_stage(1) or model.set_stage(2) first")
        kwargs.setdefault("compute_loss_func", model.loss)
        leave_frozen_out_of_ddp(model)
        super().__init__(model, *args, **kwargs)
        if shard_frozen:
            engine = "DeepSpeed" if self.is_deepspeed_enabled else "the Trainer's FSDP" if self.is_fsdp_enabled \
                else None
            if engine is not None or self.args.world_size < 2:
                raise ValueError("shard_frozen: shards the frozen LLM across the ranks of a torchrun DDP run, got "
                                 f"{engine or f'{self.args.world_size} process'}")
            shard_frozen_llm(model)
        # The run warns once about skipped images (``log``), not each worker's dataset copy on its own.
        if hasattr(self.train_dataset, "warn_skipped"):
            self.train_dataset.warn_skipped = False
        self._skipped_here: List[str] = []  # the images this rank's batches skipped
        self.skipped_images, self.skipped_image_files = 0, []  # the run's, as of the last log

    # The collator builds the model's inputs from dataset items that are not
    # model arguments themselves, so no column may be dropped before it runs.
    def _remove_unused_columns(self, dataset, description=None):
        return dataset

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return _SkipRecordingCollator(data_collator)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = checkpoint_to_resume(resume_from_checkpoint, self.args.output_dir)
        return super().train(None if checkpoint is None else str(checkpoint), *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            unmark(folder)  # about to be written into: incomplete until every file is new
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer's rotation would run before the mark
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's part (RNG state, DeepSpeed shards) is written
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            run_dir = os.path.dirname(folder)
            remove_incomplete_checkpoints(run_dir)
            rotate_checkpoints(run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._skipped_here.extend(inputs.pop(SKIPPED_IMAGES, ()))
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def log(self, logs, start_time=None) -> None:
        # Every rank logs at the same steps, so the ranks' counts are gathered here (a small collective).
        shares = per_rank((len(self._skipped_here), self._skipped_here[:SKIPPED_EXAMPLES]))
        count = sum(number for number, _ in shares)
        files = [name for _, names in shares for name in names][:SKIPPED_EXAMPLES]
        if count and not self.skipped_images and self.is_world_process_zero():
            warnings.warn(f"skipping unreadable images ({count} so far, first {files[0]}); the logs count them "
                          "(skipped_images) and name the first few (skipped_image_files)", stacklevel=2)
        self.skipped_images, self.skipped_image_files = count, files
        logs["skipped_images"] = count  # in place, as the Trainer adds its own keys: train()'s metrics get it
        if count:
            logs["skipped_image_files"] = files
        super().log(logs, start_time)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not (self.is_deepspeed_enabled and resume_from_checkpoint is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # The Trainer would load DeepSpeed's checkpoint strictly, but it leaves the frozen LLM out
        # (``_save_optimizer_and_scheduler``): the same load, with the module's keys checked non-strictly.
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=False)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _adapter_model(self) -> LMEyeBaseModel:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _whole_adapter(self):
        """A context in which the adapter's parameters are whole on every rank: ZeRO-3 partitions every
        parameter (the adapter's too, past its first steps), so they are gathered for reading."""
        if not (self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3):
            return contextlib.nullcontext()
        import deepspeed

        model = self._adapter_model()
        towers = tuple(f"{name}." for name in ("llm", "vision"))
        adapter = [p for name, p in model.named_parameters() if not name.startswith(towers)]
        return deepspeed.zero.GatheredParameters(adapter, modifier_rank=None)

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """``LMEyeModel.adapter_state_dict`` of the trained model, whole (gathered under ZeRO-3), on every rank."""
        with self._whole_adapter():
            return {name: value.clone() for name, value in self._adapter_model().adapter_state_dict().items()}

    def save_model(self, output_dir=None, _internal_call: bool = False) -> None:
        # The Trainer's gathering of the model's full state dict, which would copy the frozen LLM, is
        # skipped: the adapter is whole on every rank (DDP, ZeRO-2), or gathered alone (ZeRO-3).
        self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir=None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with self._whole_adapter():  # on every rank: gathering is a collective
            if not self.args.should_save:
                return
            self._adapter_model().save_pretrained(output_dir)
        if self.processing_class is not None:
            replace_files(output_dir, self.processing_class.save_pretrained)
        with replacing(os.path.join(output_dir, "training_args.bin")) as temporary:
            torch.save(self.args, temporary)

    def _save_optimizer_and_scheduler(self, output_dir) -> None:
        if self.is_deepspeed_enabled:
            # DeepSpeed's own checkpoint would hold the whole module, frozen LLM included.
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            from accelerate.utils import DeepSpeedSchedulerWrapper

            # The Trainer's own learning-rate schedule (not in the DeepSpeed config) is not in that checkpoint.
            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        else:
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        self._adapter_model().load_adapter(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._adapter_model().load_adapter(self.state.best_model_checkpoint)
