"""Run by tests/test_train_distributed.py under ``torchrun`` (or as one plain process).

    python distributed_worker.py {trainer|fsdp2|zero2|zero3} OUTPUT_DIR GLOBAL_BATCH [RESUME_CHECKPOINT]

Trains the tiny LMEye for 5 optimizer steps on the same global batches in any
world size and writes, from rank 0, the adapter (``adapter.pt``) and the loss
of every step (``losses.json``). ``trainer``: ``LMEyeTrainer`` (DDP when the
world is larger than one). ``zero2``: ``LMEyeTrainer`` with DeepSpeed ZeRO-2
(examples/deepspeed/zero2.json), a checkpoint after step 3; ``zero3``: the same
with ZeRO-3 (examples/deepspeed/zero3.json, every parameter partitioned). ``fsdp2``: a plain
loop over the frozen towers sharded with ``shard_frozen_llm`` and the adapter under DDP, single-pass
schedule.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from training_helpers import image_processor, tiny_model, write_llava

from lmeye_fast.data import LMEyeCollator, LMEyeDataset
from lmeye_fast.train import LMEyeTrainer, leave_frozen_out_of_ddp, shard_frozen_llm, suffix_loss

STEPS = 5


def dataset(processor, directory):
    return LMEyeDataset(write_llava(directory, count=12, text_only=4), processor, image_processor(),
                        image_folder=Path(directory) / "images")


def run_trainer(output, global_batch, world, deepspeed=None, resume=None):
    from transformers import TrainingArguments

    torch.manual_seed(0)
    processor, model = tiny_model()
    saving = dict(save_strategy="no") if deepspeed is None else dict(save_strategy="steps", save_steps=3)
    args = TrainingArguments(output_dir=str(output / "run"), use_cpu=True, report_to=[], disable_tqdm=True, seed=1,
                             per_device_train_batch_size=global_batch // world, max_steps=STEPS, learning_rate=1e-2,
                             logging_steps=1, ddp_backend="gloo" if world > 1 else None, deepspeed=deepspeed,
                             ddp_find_unused_parameters=False, ddp_broadcast_buffers=False, **saving)
    trainer = LMEyeTrainer(model=model, args=args, train_dataset=dataset(processor, output / f"data{_rank()}"),
                           data_collator=LMEyeCollator(processor))
    trainer.train(resume_from_checkpoint=resume)
    if world > 1 and deepspeed is None:
        # Only the adapter is DDP's: the frozen towers are neither broadcast nor bucketed.
        ddp = trainer.model_wrapped
        frozen = {name for name, _ in model.named_parameters() if name.startswith(("llm.", "vision."))}
        assert type(ddp).__name__ == "DistributedDataParallel" and frozen <= ddp.parameters_to_ignore
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer.adapter_state_dict(), losses


def run_zero2(output, global_batch, world, resume=None):
    config = Path(__file__).parent.parent / "examples" / "deepspeed" / "zero2.json"
    return run_trainer(output, global_batch, world, deepspeed=str(config), resume=resume)


def run_zero3(output, global_batch, world, resume=None):
    config = json.loads((Path(__file__).parent.parent / "examples" / "deepspeed" / "zero3.json").read_text())
    # Partition even the tiny adapter's parameters, which ZeRO-3 would otherwise keep whole on every rank.
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return run_trainer(output, global_batch, world, deepspeed=config, resume=resume)


def run_fsdp2(output, global_batch, world):
    torch.manual_seed(0)
    processor, model = tiny_model()
    rank = _rank()
    items = dataset(processor, output / f"data{rank}")
    collate = LMEyeCollator(processor)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    forward = model
    if world > 1:
        # The frozen towers sharded, the adapter whole and data-parallel under DDP (as LMEyeTrainer runs it).
        shard_frozen_llm(model)
        leave_frozen_out_of_ddp(model)
        forward = DistributedDataParallel(model, broadcast_buffers=False)
    local = global_batch // world
    losses = []
    for step in range(STEPS):
        start = (step * global_batch) % len(items)
        whole = collate([items[(start + k) % len(items)] for k in range(global_batch)])
        labelled = (whole["labels"] != -100).sum()
        batch = collate([items[(start + rank * local + k) % len(items)] for k in range(local)])
        labels = batch.pop("labels")
        # DDP averages gradients over ranks; each rank's sum over the global count, times the world size,
        # makes the step's gradient that of the mean over the global batch.
        loss = suffix_loss(forward(**batch, schedule="single_pass"), labels, labelled) * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach() / world
        if world > 1:
            dist.all_reduce(reported)
        losses.append(float(reported))
    if world > 1:
        from torch.distributed.fsdp import FSDPModule

        assert all(isinstance(layer, FSDPModule) for layer in model.llm.model.layers)
        assert type(model.llm.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
        assert not any(type(value).__name__ == "DTensor" for value in model.adapter_state_dict().values())
    return model.adapter_state_dict(), losses


def _rank():
    return int(os.environ.get("RANK", 0))


def main():
    mode, output, global_batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    resume = {"resume": sys.argv[4]} if len(sys.argv) > 4 else {}
    world = int(os.environ.get("WORLD_SIZE", 1))
    if mode == "fsdp2" and world > 1:
        dist.init_process_group("gloo")
    run = {"trainer": run_trainer, "zero2": run_zero2, "zero3": run_zero3, "fsdp2": run_fsdp2}[mode]
    adapter, losses = run(output, global_batch, world, **resume)
    if _rank() == 0:
        torch.save({name: value.detach().clone() for name, value in adapter.items()}, output / "adapter.pt")
        (output / "losses.json").write_text(json.dumps(losses))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
