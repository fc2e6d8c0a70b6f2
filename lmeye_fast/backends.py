"""Which backends exist on this machine, and why not when they don't.

Nothing here raises: a missing backend is a reason string, reported by
``python -m lmeye_fast.info`` and by the error of an explicit request for it.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_BACKEND = "LMEYE_FAST_BACKEND"
BUILD_INFO = Path(__file__).with_name("_build_info.json")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # triton is absent on macOS/Windows wheels
        return False, f"triton is not importable ({exc})"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if triton_interpret():
        return True, f"triton {triton.__version__} on the CPU through TRITON_INTERPRET=1 (tests only)"
    return False, "no CUDA device; set TRITON_INTERPRET=1 to run the Triton kernels on the CPU (slow, for tests)"


# The command that builds lmeye_fast._C against the torch in use (setup.py compiles against the
# torch of the Python that runs it); named by every reason the extension is missing.
REBUILD = "reinstall lmeye_fast from its source folder: pip install -e ."


def build_info() -> dict:
    """What setup.py recorded about the extension build (architectures, torch version, or why it was skipped)."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {"built": False, "reason": f"no build record: lmeye_fast was not installed by its setup.py; {REBUILD}"}


def torch_mismatch(info: dict) -> Optional[str]:
    """Why an extension built as ``info`` records must not be loaded into the running torch, or None."""
    if info.get("torch") == torch.__version__:
        return None
    # torch's C++ ABI changes between releases: loading the extension would fail on an undefined
    # symbol at best, so it is refused before it is loaded.
    return (f"lmeye_fast._C was built against torch {info.get('torch')}, but torch {torch.__version__} is "
            f"running; the CUDA backend is off until it is rebuilt against this torch: {REBUILD}")


def extension_status() -> Tuple[bool, str]:
    """Whether ``lmeye_fast._C`` loads (its ops are then registered under ``torch.ops.lmeye_fast``).

    The build record decides first: an extension it does not vouch for, or one built against
    another torch, is never loaded."""
    info = build_info()
    if not info.get("built"):
        return False, info.get("reason") or f"lmeye_fast._C was not built; {REBUILD}"
    mismatch = torch_mismatch(info)
    if mismatch:
        return False, mismatch
    # import_module returns an already loaded module at once, and refuses a blocked one
    # (a None entry in sys.modules), which a bare membership test would count as loaded.
    try:
        importlib.import_module("lmeye_fast._C")
    except Exception as exc:
        return False, f"lmeye_fast._C failed to load ({exc}); {REBUILD}"
    return True, "lmeye_fast._C loaded"


def warn_if_built_for_another_torch() -> None:
    """At ``import lmeye_fast``: a warning with the fix when the extension was built against
    another torch (upgraded since the install). A package installed without one stays quiet."""
    info = build_info()
    mismatch = torch_mismatch(info) if info.get("built") else None
    if mismatch:
        warnings.warn(mismatch, RuntimeWarning, stacklevel=2)


def cuda_status() -> Tuple[bool, str]:
    loaded, reason = extension_status()
    if not loaded:
        return False, reason
    if not torch.cuda.is_available():
        return False, "lmeye_fast._C is built, but there is no CUDA device to run it on"
    return True, f"lmeye_fast._C on {torch.cuda.get_device_name()}"


# Filled on first ask and then only read: torch.compile traces a dict lookup
# as a constant, whereas the probes themselves (device queries, imports)
# would break the graph. Modules resolve their backends eagerly at
# construction, so a compiled forward only ever reads this.
_STATUS: Dict[str, Tuple[bool, str]] = {}
_PROBES = {"reference": lambda: (True, "plain PyTorch, any device"), "triton": triton_status, "cuda": cuda_status}


def status(backend: str) -> Tuple[bool, str]:
    """(available, reason) for ``backend``, probed once per process."""
    known = _STATUS.get(backend)
    if known is not None:
        return known
    if backend not in _PROBES:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    _STATUS[backend] = _PROBES[backend]()
    return _STATUS[backend]


def requested(backend: Optional[str]) -> str:
    """The backend asked for: ``LMEYE_FAST_BACKEND`` overrides the argument."""
    choice = os.environ.get(ENV_BACKEND) or backend or "auto"
    if choice != "auto" and choice not in BACKENDS:
        source = ENV_BACKEND if os.environ.get(ENV_BACKEND) else "backend"
        raise ValueError(f"{source}: expected one of {('auto',) + BACKENDS}, got {choice!r}")
    return choice
