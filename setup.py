"""Builds ``lmeye_fast._C`` from csrc/ (PyTorch bindings) and kernels/ (CUDA device code).

Environment:
  LMEYE_FAST_SKIP_CUDA_BUILD=1   build no extension (the package still imports; info says why)
  TORCH_CUDA_ARCH_LIST           architectures, default "8.0;9.0" (never read off a local GPU)
  CUDA_HOME                      CUDA toolkit; otherwise /usr/local/cuda, then the nvcc on PATH
  MAX_JOBS                       parallel compile jobs (ninja)
The outcome is written to lmeye_fast/_build_info.json for `python -m lmeye_fast.info`.
"""

import json
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO = ROOT / "lmeye_fast" / "_build_info.json"
DEFAULT_ARCHS = "8.0;9.0"


def kernel_sources():
    """The one list of CUDA sources, shared with CMakeLists.txt."""
    lines = (ROOT / "kernels" / "SOURCES").read_text().splitlines()
    return [f"kernels/{line.strip()}" for line in lines if line.strip() and not line.startswith("#")]


def find_cuda_home():
    """(toolkit folder, None), or (None, why not). An explicit CUDA_HOME is taken at its word."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [explicit] if explicit else ["/usr/local/cuda"]
    for candidate in candidates:
        if (Path(candidate) / "bin" / "nvcc").exists() and (Path(candidate) / "include").exists():
            return candidate, None
    if explicit:
        return None, f"no CUDA toolchain found: CUDA_HOME={explicit} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script on PATH makes torch guess its parent's parent; follow links to the real toolkit.
        home = Path(os.path.realpath(nvcc)).parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home), None
    return None, "no CUDA toolchain found (no nvcc under CUDA_HOME, /usr/local/cuda or PATH)"


def record(info):
    BUILD_INFO.write_text(json.dumps(info, indent=2) + "\n")


def extensions():
    if os.environ.get("LMEYE_FAST_SKIP_CUDA_BUILD", "0") == "1":
        record({"built": False, "reason": "skipped: LMEYE_FAST_SKIP_CUDA_BUILD=1 at install time"})
        return [], {}
    try:
        import torch
    except ImportError:
        record({"built": False, "reason": "torch was not importable at build time: install torch first, "
                                          "then `pip install -e . --no-build-isolation`"})
        return [], {}
    if torch.version.cuda is None:
        record({"built": False, "reason": f"torch {torch.__version__} is a CPU-only build"})
        return [], {}
    cuda_home, missing = find_cuda_home()
    if cuda_home is None:
        record({"built": False, "reason": missing})
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name="lmeye_fast._C",
        sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")) + kernel_sources(),
        include_dirs=[str(ROOT / "kernels"), str(ROOT / "csrc")],
        # No -std flag: BuildExtension adds the C++ standard that the installed
        # torch's headers need (recent releases need C++20, older ones C++17).
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    record({"built": True, "archs": [f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in archs.split(";") if a],
            "torch": torch.__version__, "cuda": torch.version.cuda})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
