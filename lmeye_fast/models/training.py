"""A small training loop for both LMEye stages: AdamW, warm-up + cosine decay, clipping, bf16 autocast on GPU.

    model.set_stage(1)                            # static mapping, captioning loss
    train(model, caption_batches, steps=2000, lr=1e-3)
    model.set_stage(2, train_special_tokens=True) # IPN (+ <img-q>/<img-d> embeddings), instruction loss
    train(model, instruction_batches, steps=4000, lr=3e-4)
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

__all__ = ["train"]


def _forever(batches: Iterable):
    """Cycle over ``batches``, re-iterating it each epoch (a DataLoader reshuffles)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches: the iterable yielded no batch")


def train(model, batches: Iterable, steps: int, lr: float = 3e-4, weight_decay: float = 0.0,
          max_grad_norm: Optional[float] = 1.0, warmup_steps: int = 0, schedule: Optional[str] = None,
          autocast: Optional[bool] = None, progress: bool = True, log_every: int = 20,
          description: str = "train") -> torch.Tensor:
    """Train the parameters of ``model`` that require grad (pick them with ``model.set_stage``).

    Args:
        batches: an iterable of ``LMEyeProcessor`` batches with labels and
            ``pixel_values`` or ``image_features``; it is cycled over until
            ``steps`` optimizer steps are done.
        schedule: the model schedule to train with (default: the model's).
        autocast: run the forward under bf16 autocast; default on CUDA only.
        log_every: steps between progress-bar loss updates (each one syncs).
    Returns:
        the loss of every step, (steps,) on the CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no parameter requires grad; call model.set_stage(1) or model.set_stage(2) first")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    device = params[0].device
    if autocast is None:
        autocast = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses = torch.zeros(steps, device=device)
    was_training = model.training
    model.train()
    bar = tqdm(total=steps, desc=description, disable=not progress)
    try:
        for step, batch in zip(range(steps), _forever(batches)):
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            if "labels" not in batch:
                raise ValueError("batches: a training batch needs labels (call the processor with answers)")
            context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with context:
                loss = model(**batch, schedule=schedule).loss
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses[step] = loss.detach()
            bar.update(1)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                bar.set_postfix(loss=f"{losses[max(0, step + 1 - log_every):step + 1].mean().item():.4f}")
    finally:
        bar.close()
        model.train(was_training)
    return losses.cpu()
