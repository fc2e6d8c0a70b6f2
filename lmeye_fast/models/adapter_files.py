"""The two files of a saved adapter and the rule that keeps them one adapter through a crash.

A saved adapter is ``lmeye_adapter.safetensors`` (the tensors) and
``lmeye_config.json`` (the config). They must be replaced together, and no file
system renames two files as one step, so every save gets a fresh *save id*,
written into both: the tensors' safetensors metadata (``lmeye_save_id``) and the
config's ``save_id``. ``write_adapter`` then

1. writes the tensors to a temporary name (``lmeye_fast.atomic``);
2. writes the config, whole, as ``.lmeye_config.<save id>.json`` (the *pending* config);
3. renames the tensors over ``lmeye_adapter.safetensors``;
4. renames the pending config over ``lmeye_config.json``;
5. removes the leftovers of earlier killed saves.

``config_file`` names the config that belongs to the tensors: the pending config
of their save id when there is one (a save killed between 3 and 4: new tensors,
old ``lmeye_config.json``), else ``lmeye_config.json``. A kill before 3 leaves the
old tensors, whose pending config is gone (step 5 of their own save), so the old
``lmeye_config.json`` is theirs. A kill at any moment therefore loads the old
complete adapter or the new one; the temporaries and pending configs it leaves
are never read as an adapter and the next save removes them. Tensors without a
save id (written by other tools) go with ``lmeye_config.json``; a config and
tensors whose ids differ with no pending config to settle it are refused.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..atomic import fsync_folder, replacing, write_atomic

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "SAVE_ID_KEY", "write_adapter", "config_file", "check_save_id", "check_adapter",
           "tensors_save_id"]

ADAPTER_FILE = "lmeye_adapter.safetensors"
CONFIG_FILE = "lmeye_config.json"
SAVE_ID_KEY = "lmeye_save_id"


def _pending_config(directory: Path, save_id: str) -> Path:
    return directory / f".lmeye_config.{save_id}.json"


def tensors_save_id(directory: Union[str, os.PathLike]) -> Optional[str]:
    """The save id in the metadata of ``directory``'s tensors file (None when absent, as is the file)."""
    from safetensors import safe_open

    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    return metadata.get(SAVE_ID_KEY)


def config_file(directory: Union[str, os.PathLike]) -> Path:
    """The config file of the adapter saved in ``directory`` (see the module's docstring)."""
    directory = Path(directory)
    save_id = tensors_save_id(directory)
    if save_id is not None:
        pending = _pending_config(directory, save_id)
        if pending.is_file():
            return pending
    return directory / CONFIG_FILE


def check_save_id(path: Path, payload: dict) -> None:
    """Refuse a config whose save id is not that of the tensors beside it."""
    saved = payload.get("save_id")
    tensors = tensors_save_id(path.parent)
    if None not in (saved, tensors) and saved != tensors:
        raise ValueError(f"{path}: belongs to the save {saved}, but {path.parent / ADAPTER_FILE} to the save "
                         f"{tensors}; the folder holds parts of two adapters (copied over by hand?)")


def write_adapter(directory: Union[str, os.PathLike], tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
                  config_payload: dict) -> Path:
    """Save ``tensors`` (with ``metadata``) and ``config_payload`` as one adapter in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory: {directory} is a file, expected a folder to save the adapter in")
    directory.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    pending = _pending_config(directory, save_id)
    with replacing(directory / ADAPTER_FILE) as temporary:
        save_file(tensors, str(temporary), metadata={**metadata, SAVE_ID_KEY: save_id})
        write_atomic(pending, json.dumps({**config_payload, "save_id": save_id}, indent=2, sort_keys=True) + "\n")
    os.replace(pending, directory / CONFIG_FILE)
    fsync_folder(directory)
    for leftover in directory.glob(".*lmeye_config.*"):  # pending configs and temporaries of killed saves
        leftover.unlink(missing_ok=True)
    return directory


def check_adapter(directory: Union[str, os.PathLike], name: str = "adapter") -> None:
    """Refuse a folder that holds no complete adapter, naming ``name`` (a flag or key) and what is missing;
    reads the config and the tensors' header only, so it runs before any model loads."""
    from .config import LMEyeConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{name}: no folder {directory}")
    if not (directory / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{name}: {directory} holds no {ADAPTER_FILE}, so no saved adapter "
                                "(written by LMEyeModel.save_pretrained)")
    LMEyeConfig.load(directory)
