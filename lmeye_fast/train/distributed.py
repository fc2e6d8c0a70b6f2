"""Data parallelism for LMEye's frozen LLM + small adapter under ``torchrun``.

DDP: only the adapter trains, so only its gradients are all-reduced (DDP
buckets parameters that require grad); the frozen LLM and vision tower are
also kept out of DDP's start-up broadcast and buffer syncs, which would
otherwise copy every frozen weight from rank 0 (14 GB for a 7B LLM) although
each rank loaded the same ones.

FSDP2: ``shard_frozen_llm`` shards the frozen towers with
``torch.distributed.fsdp.fully_shard``: one group per repeated block of the LLM
and of the vision tower (decoder layers; an encoder-decoder's encoder and
decoder blocks), one for the LLM's token embeddings (with the LM head when
tied) and one for the LM head, so that an LLM that does not fit one device
trains. The adapter stays whole on every rank and trains data-parallel: DDP
all-reduces its gradients (the Trainer wraps the model in DDP as without
sharding; the sharded towers are among the parameters DDP ignores). Each group
is all-gathered for each call (the single pass calls every layer twice per
step: prefix, then suffix on the cache) and for the backward through it.
"""

from __future__ import annotations

from typing import Any, List

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["leave_frozen_out_of_ddp", "decoder_layers", "shard_frozen_llm", "resident_parameter_bytes", "per_rank"]


def leave_frozen_out_of_ddp(model: nn.Module) -> List[str]:
    """Mark the frozen LLM and vision tower of ``model`` (an ``LMEyeModel``) as ignored by any
    ``DistributedDataParallel`` wrapping it later; returns the ignored names."""
    frozen = [name for prefix, module in (("llm", model.llm), ("vision", model.vision)) if module is not None
              for name, _ in [*module.named_parameters(prefix=prefix), *module.named_buffers(prefix=prefix)]]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return frozen


def decoder_layers(module: nn.Module) -> List[nn.Module]:
    """The repeated blocks of a Hugging Face model: the entries of every ``nn.ModuleList`` that is not inside
    another list's entry (a decoder's layers; an encoder-decoder's encoder blocks and decoder blocks)."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m)]
    inner = {id(m) for outer in lists for entry in outer for m in entry.modules() if isinstance(m, nn.ModuleList)}
    blocks = [entry for m in lists if id(m) not in inner for entry in m]
    if not blocks:
        raise ValueError(f"{type(module).__name__}: has no nn.ModuleList of layers to shard")
    return blocks


def shard_frozen_llm(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to the frozen LLM and vision tower of ``model`` (an ``LMEyeModel``): one ``fully_shard`` group
    per block (``decoder_layers``) of each, one for the LLM's token embeddings (and a tied LM head), one for
    its LM head. The adapter is left whole, for DDP to train data-parallel (``LMEyeTrainer`` wraps the model in
    DDP; in a loop of one's own, wrap it after ``leave_frozen_out_of_ddp``). Returns ``model``, now sharded."""
    from torch.distributed.fsdp import fully_shard

    def shard(modules):
        fully_shard(modules, mesh=mesh, reshard_after_forward=reshard_after_forward)

    towers = [model.llm] + ([model.vision] if model.vision is not None else [])
    for tower in towers:
        for block in decoder_layers(tower):
            shard(block)
    embeddings, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    if head is not None and head.weight is embeddings.weight:
        shard([embeddings, head])  # a tied head and embedding share their weight, so they share a group
    else:
        shard(embeddings)
        if head is not None:
            shard(head)
    return model


def resident_parameter_bytes(module: nn.Module) -> int:
    """The bytes of ``module``'s parameters this rank holds: its partition of a DeepSpeed ZeRO-3 parameter
    (the whole tensor too while gathered or persistent), its shard of an FSDP2 DTensor, else the tensor."""
    from torch.distributed.tensor import DTensor

    from ..models.gathered import is_partitioned

    total = 0
    for param in module.parameters():
        if is_partitioned(param):
            total += param.ds_tensor.numel() * param.ds_tensor.element_size()
            total += param.data.numel() * param.element_size()
        elif isinstance(param, DTensor):
            total += param.to_local().numel() * param.element_size()
        else:
            total += param.numel() * param.element_size()
    return total


def per_rank(value: Any) -> List[Any]:
    """``value`` (any picklable object) of every rank, in rank order; ``[value]`` outside torch.distributed.
    A collective: every rank calls it."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
