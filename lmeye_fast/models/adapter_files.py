"""The files of a saved adapter and the rule that keeps them one adapter through a crash.

A saved adapter is ``lmeye_adapter.safetensors`` (the tensors) and JSON files
beside it (``lmeye_config.json``, the config, and any others its writer adds).
They must be replaced together, and no file system renames several files as one
step, so every save gets a fresh *save id*, written into all of them: the
tensors' safetensors metadata (``lmeye_save_id``) and each JSON file's
``save_id``. ``write_adapter`` then

1. writes the tensors to a temporary name (``lmeye_fast.atomic``);
2. writes each JSON file, whole, as ``.NAME.<save id>.pending`` (its *pending* copy);
3. renames the tensors over ``lmeye_adapter.safetensors``;
4. renames each pending copy over its ``NAME``;
5. removes the leftovers of earlier killed saves.

``adapter_file`` names the copy of a JSON file that belongs to the tensors: its
pending copy of their save id when there is one (a save killed after 3: new
tensors, some old JSON files), else ``NAME``. A kill before 3 leaves the old
tensors, whose pending copies are gone (step 5 of their own save), so the old
files are theirs. A kill at any moment therefore loads the old complete adapter
or the new one; the temporaries and pending copies it leaves are never read as
an adapter and the next save removes them. Tensors without a save id (written by
other tools) go with the plain files; a file and tensors whose ids differ with no
pending copy to settle it are refused.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..atomic import fsync_folder, replacing, write_atomic

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "SAVE_ID_KEY", "write_adapter", "adapter_file", "config_file",
           "check_save_id", "check_adapter", "tensors_save_id"]

ADAPTER_FILE = "lmeye_adapter.safetensors"
CONFIG_FILE = "lmeye_config.json"
SAVE_ID_KEY = "lmeye_save_id"


def _pending(directory: Path, name: str, save_id: str) -> Path:
    return directory / f".{name}.{save_id}.pending"


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


def adapter_file(directory: Union[str, os.PathLike], name: str) -> Path:
    """The copy of the JSON file ``name`` that belongs to the adapter saved in ``directory`` (see the
    module's docstring)."""
    directory = Path(directory)
    save_id = tensors_save_id(directory)
    if save_id is not None:
        pending = _pending(directory, name, save_id)
        if pending.is_file():
            return pending
    return directory / name


def config_file(directory: Union[str, os.PathLike]) -> Path:
    """The config file of the adapter saved in ``directory``."""
    return adapter_file(directory, CONFIG_FILE)


def check_save_id(path: Path, payload: dict) -> None:
    """Refuse a JSON file of an adapter whose save id is not that of the tensors beside it."""
    saved = payload.get("save_id")
    tensors = tensors_save_id(path.parent)
    if None not in (saved, tensors) and saved != tensors:
        raise ValueError(f"{path}: belongs to the save {saved}, but {path.parent / ADAPTER_FILE} to the save "
                         f"{tensors}; the folder holds parts of two adapters (copied over by hand?)")


def write_adapter(directory: Union[str, os.PathLike], tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
                  files: Dict[str, dict]) -> Path:
    """Save ``tensors`` (with ``metadata``) and the JSON ``files`` (name -> payload, ``lmeye_config.json``
    among them) as one adapter in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"directory: {directory} is a file, expected a folder to save the adapter in")
    directory.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    pending = {name: _pending(directory, name, save_id) for name in files}
    with replacing(directory / ADAPTER_FILE) as temporary:
        save_file(tensors, str(temporary), metadata={**metadata, SAVE_ID_KEY: save_id})
        for name, payload in files.items():
            write_atomic(pending[name], json.dumps({**payload, "save_id": save_id}, indent=2, sort_keys=True) + "\n")
    for name, path in pending.items():
        os.replace(path, directory / name)
    fsync_folder(directory)
    for name in files:  # pending copies and temporaries of killed saves
        for leftover in directory.glob(f".*{name}.*"):
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
