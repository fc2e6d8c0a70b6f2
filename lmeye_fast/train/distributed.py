"""Data parallelism for LMEye's frozen LLM + small adapter under ``torchrun``.

DDP: only the adapter trains, so only its gradients are all-reduced (DDP
buckets parameters that require grad); the frozen LLM and vision tower are
also kept out of DDP's start-up broadcast and buffer syncs, which would
otherwise copy every frozen weight from rank 0 (14 GB for a 7B LLM) although
each rank loaded the same ones.

FSDP2: ``shard_frozen_llm`` shards each decoder layer of the LLM (and of the
vision tower) with ``torch.distributed.fsdp.fully_shard``, and the model's root
(embeddings, head, the adapter) as one group, so an LLM that does not fit one
device trains. The single-pass schedule runs each layer twice per step (prefix,
then suffix on the cache); FSDP2 gathers a layer's weights for each call.
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
    """The repeated blocks of a Hugging Face model: the entries of its largest ``nn.ModuleList``."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(module).__name__}: has no nn.ModuleList of layers to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def shard_frozen_llm(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to ``model`` (an ``LMEyeModel``): one ``fully_shard`` group per LLM and vision layer,
    then the root with what is left (embeddings, LM head, adapter). Returns ``model``, now sharded."""
    from torch.distributed.fsdp import fully_shard

    towers = [model.llm] + ([model.vision] if model.vision is not None else [])
    for tower in towers:
        for layer in decoder_layers(tower):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
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
