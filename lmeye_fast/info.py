"""``python -m lmeye_fast.info``: versions, what was built, which backends run here and why not."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, backends, ops


def report() -> str:
    lines = [f"lmeye_fast {__version__}", f"python     {platform.python_version()} ({sys.platform})",
             f"torch      {torch.__version__} (built with CUDA {torch.version.cuda})"]
    try:
        import triton
        lines.append(f"triton     {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton     not importable ({exc})")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        lines.append(f"device     {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("device     no CUDA device")
    info = backends.build_info()
    if info.get("built"):
        lines.append(f"_C         built for {', '.join(info['archs'])} against torch {info['torch']} "
                     f"(CUDA {info['cuda']}); loads: {backends.extension_status()[1]}")
    else:
        lines.append(f"_C         not built: {info.get('reason')}")
    lines.append("backends")
    for name in backends.BACKENDS:
        ok, reason = backends.status(name)
        lines.append(f"  {name:<10} {'available' if ok else 'missing  '}  {reason}")
    lines.append('dispatch   backend="auto" on CUDA tensors, first available of')
    for op, order in ops.AUTO_ORDER.items():
        lines.append(f"  {op:<20} {' > '.join(order)}")
    lines.append(f"attention  {attention_schedule()}")
    return "\n".join(lines)


def attention_schedule() -> str:
    """The Triton attention schedule a layer gets by default (``InteractiveLayer(attention="auto")``)."""
    try:
        from .ops.attend import MAX_HEAD_GROUP_WIDTH
    except Exception as exc:  # no triton: nothing to schedule
        return f"none (triton not importable: {exc})"
    return (f"split: F = X W_fᵀ + b_f by one GEMM, then the attention kernel (ops/attend.py), by default; "
            f"heads wider than {MAX_HEAD_GROUP_WIDTH} and attention=\"folded\" take the folded schedule "
            f"(ops/attend_folded.py)")


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
