"""Files a user keeps are written whole or not at all.

    write_atomic(path, text_or_bytes)           # one file
    with replacing(path) as temporary:          # a writer that needs a path of its own (safetensors, torch.save)
        save_file(tensors, str(temporary))
    replace_files(directory, lambda folder: tokenizer.save_pretrained(folder))   # a writer of several files

The rule: the new content goes to a temporary name in the target's own folder
(``.NAME.RANDOM.tmp``: same file system, so the rename cannot copy), is flushed
and ``fsync``-ed, then ``os.replace`` puts it in place in one step and the
folder is ``fsync``-ed so that the rename itself survives a power cut. A reader
sees the old file or the new one, never a mix; a process killed mid-write leaves
at most a temporary, which no loader reads (the dot and the ``.tmp`` keep it out
of every pattern) and which the next successful write of the same name removes.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Union

__all__ = ["write_atomic", "replacing", "replace_files", "remove_temporaries", "is_temporary", "fsync_folder"]

TEMPORARY_SUFFIX = ".tmp"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary of this module (a leftover once its writer is gone)."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"


def fsync_folder(folder: Union[str, os.PathLike]) -> None:
    """Make the renames in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_file(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_temporaries(path: Union[str, os.PathLike]) -> List[Path]:
    """Remove the leftover temporaries of ``path`` (files or folders of killed writes); returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for leftover in path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


@contextmanager
def replacing(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write the new file at; on a clean exit it replaces ``path``.

    On an exception the temporary is removed and ``path`` is left as it was. The folder must exist.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, expected a file path to write")
    temporary = _temporary(path)
    try:
        yield temporary
        if not temporary.is_file():
            raise FileNotFoundError(f"{path}: the writer wrote nothing at {temporary.name}")
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    remove_temporaries(path)


def write_atomic(path: Union[str, os.PathLike], data: Union[str, bytes]) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` whole or not at all; returns ``path``."""
    path = Path(path)
    with replacing(path) as temporary:
        with open(temporary, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def replace_files(directory: Union[str, os.PathLike], write: Callable[[Path], object]) -> List[Path]:
    """Run ``write(folder)`` on an empty temporary folder inside ``directory``, then move each file it wrote
    into ``directory`` with ``os.replace``: every file is whole, old or new. A set of files is not
    replaced as one (a kill between two renames leaves some of each); use it for files that are each
    read on their own, like a tokenizer's. Returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    folder = _temporary(directory / "files")
    folder.mkdir()
    try:
        write(folder)
        written = sorted(p for p in folder.rglob("*") if p.is_file())
        for source in written:
            _fsync_file(source)
        targets = []
        for source in written:
            target = directory / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            targets.append(target)
        fsync_folder(directory)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    remove_temporaries(directory / "files")
    return targets
