"""Which training checkpoints are complete, and which one ``resume`` continues from.

The Trainer writes a ``checkpoint-N`` folder file by file (the adapter, the
optimizer, the scheduler, every rank's RNG state, ``trainer_state.json``, and
under DeepSpeed each rank's shards), so a process killed while it saves leaves a
folder with some of them. ``LMEyeTrainer`` therefore marks a checkpoint complete
only once every rank has written its part, with ``checkpoint_complete.json``
written atomically as the last file, and takes the mark away before it writes
into a folder that has one. A folder without the mark is never resumed from and
never counted by the rotation of ``save_total_limit``; the next save removes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Union

from ..atomic import write_atomic

__all__ = ["COMPLETE_MARK", "is_complete", "mark_complete", "unmark", "complete_checkpoints",
           "incomplete_checkpoints", "remove_incomplete_checkpoints",
           "latest_complete_checkpoint", "checkpoint_to_resume"]

COMPLETE_MARK = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _step(path: Path) -> Optional[int]:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete(checkpoint: Union[str, os.PathLike]) -> bool:
    """Whether ``checkpoint`` carries the mark of a finished save for its own step."""
    path = Path(checkpoint) / COMPLETE_MARK
    try:
        mark = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and mark.get("global_step") == _step(Path(checkpoint))


def mark_complete(checkpoint: Union[str, os.PathLike], global_step: int) -> None:
    write_atomic(Path(checkpoint) / COMPLETE_MARK, json.dumps({"global_step": global_step}) + "\n")


def unmark(checkpoint: Union[str, os.PathLike]) -> None:
    (Path(checkpoint) / COMPLETE_MARK).unlink(missing_ok=True)


def _checkpoints(output_dir) -> List[Path]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir() if (step := _step(path)) is not None]
    return [path for _, path in sorted(found)]


def complete_checkpoints(output_dir) -> List[Path]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, oldest step first."""
    return [path for path in _checkpoints(output_dir) if is_complete(path)]


def incomplete_checkpoints(output_dir) -> List[Path]:
    """The ``checkpoint-N`` folders of ``output_dir`` that a killed save left without the mark."""
    return [path for path in _checkpoints(output_dir) if not is_complete(path)]


def remove_incomplete_checkpoints(output_dir) -> None:
    for path in incomplete_checkpoints(output_dir):
        shutil.rmtree(path, ignore_errors=True)


def latest_complete_checkpoint(output_dir) -> Optional[Path]:
    """The complete checkpoint of the highest step in ``output_dir``, or None."""
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def checkpoint_to_resume(resume: Union[bool, str, os.PathLike, None], output_dir) -> Optional[Path]:
    """The checkpoint ``resume`` asks for: True, the latest complete one in ``output_dir``; a path, that
    checkpoint, which must be complete; None or False, none. Raises ``ValueError`` naming ``resume``."""
    if resume is None or resume is False:
        return None
    if resume is True:
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            partial = [p.name for p in incomplete_checkpoints(output_dir)]
            raise ValueError(f"resume: no complete checkpoint-N in {output_dir}"
                             + (f" (incomplete, from a killed save: {', '.join(partial)})" if partial else ""))
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"resume: no checkpoint directory {path}")
    if not is_complete(path):
        raise ValueError(f"resume: {path} is not a complete checkpoint (no {COMPLETE_MARK} for its step: its "
                         "save was interrupted, or it is not an LMEyeTrainer checkpoint-N folder)")
    return path
