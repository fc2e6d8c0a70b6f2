"""Whole parameters where DeepSpeed ZeRO-3 partitions them.

Under a ZeRO-3 config the Trainer's ``TrainingArguments`` make ``from_pretrained``
load every weight partitioned (``deepspeed.zero.Init``): a rank holds a slice of
each tensor, and its ``.data`` is empty until the tensors are gathered. What
LMEye computes from weights before training (the special tokens' initial
values, the rows resizing adds) reads them inside ``gathered``, on every rank
(gathering is a collective), so that every world size computes the same values.
Elsewhere ``gathered`` does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from torch import nn

__all__ = ["gathered", "is_partitioned"]


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 parameter (partitioned across ranks, gathered on demand)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modify: bool = False) -> Iterator[None]:
    """A context in which ``params`` are whole on every rank. With ``modify``, what rank 0 writes into them
    is partitioned back on leaving (every rank must write the same, as rank 0's values win)."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield
