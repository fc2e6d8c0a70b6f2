"""setup.py records why it built no extension, and the package imports without one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_record(tmp_path, **env):
    shutil.rmtree(tmp_path / "kernels", ignore_errors=True)
    shutil.rmtree(tmp_path / "lmeye_fast", ignore_errors=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "kernels").mkdir()
    shutil.copy(ROOT / "kernels" / "SOURCES", tmp_path / "kernels" / "SOURCES")
    (tmp_path / "lmeye_fast").mkdir()
    subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, **env})
    return json.loads((tmp_path / "lmeye_fast" / "_build_info.json").read_text())


def test_skip_flag_builds_nothing_and_says_why(tmp_path):
    record = build_record(tmp_path, LMEYE_FAST_SKIP_CUDA_BUILD="1")
    assert record == {"built": False, "reason": "skipped: LMEYE_FAST_SKIP_CUDA_BUILD=1 at install time"}


def test_missing_toolchain_builds_nothing_and_says_why(tmp_path):
    missing = tmp_path / "no-toolkit"
    record = build_record(tmp_path, CUDA_HOME=str(missing))
    assert record == {"built": False, "reason": f"no CUDA toolchain found: CUDA_HOME={missing} has no bin/nvcc"}


def test_architectures_come_from_the_environment_not_the_gpu(tmp_path):
    record = build_record(tmp_path, TORCH_CUDA_ARCH_LIST="8.6;9.0")
    if not record.get("built"):
        pytest.skip(f"this machine builds no extension: {record['reason']}")
    assert record["archs"] == ["sm_86", "sm_90"]
    default = build_record(tmp_path, TORCH_CUDA_ARCH_LIST="")
    assert default["archs"] == ["sm_80", "sm_90"]


def test_package_imports_without_the_extension():
    code = ("import sys; sys.modules['lmeye_fast._C'] = None\n"
            "import lmeye_fast; from lmeye_fast import backends\n"
            "ok, reason = backends.status('cuda'); assert not ok and reason, reason; print(reason)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
