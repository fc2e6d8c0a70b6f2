"""Builds ``lmeye_fast._C`` from csrc/ (PyTorch bindings) and kernels/ (CUDA device code)
against the torch of the Python that runs the install (docs/install.md says why).

Plain ``pip install -e .`` builds in an isolated environment that holds only the build
requirements. torch is deliberately not one of them: pip would put a second torch of several GB
there, not necessarily the release that imports the extension afterwards. So when torch is not
importable here, the build imports the installing Python's own torch instead.

When no extension can be built (no torch, a CPU-only torch, no CUDA toolkit) the install stops
with the reason and the command that fixes it: pip prints a failing build's output but hides a
passing one's, so a warning would go unseen. For the same reason an install asked to skip the
extension carries it in its version, which pip does print ("Successfully installed
lmeye_fast-0.1.0+no.cuda.kernels").

Environment:
  LMEYE_FAST_SKIP_CUDA_BUILD=1   install without the extension (the package still imports; info says why)
  TORCH_CUDA_ARCH_LIST           architectures, default "8.0;9.0" (never read off a local GPU)
  CUDA_HOME                      CUDA toolkit; otherwise /usr/local/cuda, then the nvcc on PATH
  MAX_JOBS                       parallel compile jobs (ninja)
What was built, against which torch, is recorded in lmeye_fast/_build_info.json beside the
extension; lmeye_fast refuses to load an extension built against another torch.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGE = "lmeye_fast"
RECORD_NAME = "_build_info.json"
DEFAULT_ARCHS = "8.0;9.0"
SKIP_FLAG = "LMEYE_FAST_SKIP_CUDA_BUILD"
REINSTALL = "pip install -e ."
# A PEP 440 local label: pip prints it in its last line, the one line of a passing install a user sees.
SKIPPED_LABEL = "+no.cuda.kernels"


def package_version():
    """lmeye_fast.__version__, read as text: the package cannot be imported before it is built."""
    text = (ROOT / PACKAGE / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


class CannotBuild(Exception):
    """No extension can be built here: why, what fixes it, and the command to run after."""

    def __init__(self, why, fix, command):
        super().__init__(why)
        self.why, self.fix, self.command = why, fix, command

    def report(self):
        return (f"\nlmeye_fast: cannot build the CUDA extension lmeye_fast._C.\n"
                f"  Why: {self.why}\n"
                f"  Fix: {self.fix}:\n"
                f"         {self.command}\n"
                f"  Or install lmeye_fast without its CUDA kernels (the Triton and PyTorch backends still work):\n"
                f"         {SKIP_FLAG}=1 {REINSTALL}\n")


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


def installing_python_path():
    """sys.path of the Python running this build as it is outside pip's build isolation: pip
    hides the installing environment's packages through PYTHONPATH, which -E ignores."""
    out = subprocess.run([sys.executable, "-E", "-c", "import json, sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def import_torch():
    """(torch, isolated): the torch this build can import, else the installing Python's own
    (isolated is then True). Raises CannotBuild when neither Python has one."""
    isolated = importlib.util.find_spec("torch") is None
    if isolated:
        # Appended, so the build environment's own setuptools stays first.
        sys.path.extend(p for p in installing_python_path() if p not in sys.path)
        if importlib.util.find_spec("torch") is None:
            raise CannotBuild(f"torch is not installed in the Python running this install ({sys.executable})",
                              "lmeye_fast._C is compiled against the torch that will import it, so install "
                              "torch first", f"pip install torch && {REINSTALL}")
    try:
        import torch
    except Exception as exc:
        raise CannotBuild(f"torch failed to import ({exc!r})", "reinstall torch",
                          f"pip install --force-reinstall torch && {REINSTALL}") from exc
    return torch, isolated


def plan():
    """(extension, build record) for the torch and toolkit found here; raises CannotBuild."""
    torch, isolated = import_torch()
    if torch.version.cuda is None:
        raise CannotBuild(f"torch {torch.__version__} is not a CUDA build (a CPU-only or ROCm one)",
                          "install a CUDA build of torch (https://pytorch.org/get-started/locally/ gives the "
                          "command for your CUDA version), then reinstall", REINSTALL)
    cuda_home, missing = find_cuda_home()
    if cuda_home is None:
        raise CannotBuild(missing, f"install the CUDA toolkit {torch.version.cuda} that torch {torch.__version__} "
                                   f"was built with, and point CUDA_HOME at it",
                          f"CUDA_HOME=/usr/local/cuda-{torch.version.cuda} {REINSTALL}")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    from torch.utils.cpp_extension import CUDAExtension

    ext = CUDAExtension(
        name=f"{PACKAGE}._C",
        sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")) + kernel_sources(),
        include_dirs=[str(ROOT / "kernels"), str(ROOT / "csrc")],
        # No -std flag: BuildExtension adds the C++ standard that the installed
        # torch's headers need (recent releases need C++20, older ones C++17).
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    record = {"built": True, "archs": [f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in archs.split(";") if a],
              "torch": torch.__version__, "cuda": torch.version.cuda, "isolated_build": isolated}
    return ext, record


def write_record(folder, record):
    (Path(folder) / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def build_command(record):
    """torch's BuildExtension, writing ``record`` beside the extension once it is built, so that a
    failed build never leaves a record claiming an extension it did not make."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildAndRecord(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
        def run(self):
            super().run()
            # build_lib feeds the wheel; an editable install (inplace) imports from the source tree.
            write_record(Path(self.build_lib) / PACKAGE, record)
            if self.inplace:
                write_record(ROOT / PACKAGE, record)

    return BuildAndRecord


def main():
    if os.environ.get(SKIP_FLAG, "0") == "1":
        reason = f"skipped: {SKIP_FLAG}=1 at install time; to build it, reinstall without the flag: {REINSTALL}"
        write_record(ROOT / PACKAGE, {"built": False, "reason": reason})
        setup(version=package_version() + SKIPPED_LABEL)
        return
    try:
        ext, record = plan()
    except CannotBuild as why:
        sys.exit(why.report())
    setup(version=package_version(), ext_modules=[ext], cmdclass={"build_ext": build_command(record)})


if __name__ == "__main__":
    main()
