"""lmeye_fast: fused kernels for LMEye's interactive perception network.

``InteractiveLayer`` and ``StaticVisualMapping`` are the drop-in modules;
``lmeye_fast.reference`` holds the math every backend is tested against;
``lmeye_fast.ops`` dispatches each op to its reference, Triton or CUDA
implementation; ``python -m lmeye_fast.info`` says what is available here.
"""

from . import backends, ops, reference
from .layers import InteractiveLayer, StaticVisualMapping

backends.warn_if_built_for_another_torch()

__version__ = "0.1.0"

__all__ = ["InteractiveLayer", "StaticVisualMapping", "ops", "reference", "__version__"]
