"""What differs between the transformers releases the models run on.

transformers 5.17 takes the KV cache as ``past_key_values``; later 5.x releases
call it ``cache`` and warn about the old name. The name is read off the
installed model's ``forward`` signature, never off a version number, so a model
class that kept the old name keeps working.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers import DynamicCache

__all__ = ["cache_kwarg", "new_cache", "checkpointing_enabled"]


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` (and its ``generate``) takes the KV cache."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"llm: {type(model).__name__}.forward takes no KV cache (neither 'cache' nor "
                    "'past_key_values'); the single-pass schedule needs one")


def new_cache(config) -> DynamicCache:
    """An empty dynamic cache; the config lets it lay out sliding-window layers like the model does."""
    return DynamicCache(config=config)


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is switched on anywhere in ``model``.

    Every 5.x release marks the checkpointed modules with a ``gradient_checkpointing``
    attribute; reading it avoids the renamed, deprecation-warning properties.
    """
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())
