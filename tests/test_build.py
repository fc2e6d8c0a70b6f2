"""setup.py records why it built no extension, the package imports without one, and CI
(``LMEYE_FAST_REQUIRE_EXTENSION=1``, exported by .ci/run) fails without one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRE = "LMEYE_FAST_REQUIRE_EXTENSION"
# Run first in a fresh interpreter: lmeye_fast._C then fails to import as a missing one would.
BLOCK_EXTENSION = ("import importlib.abc, sys\n"
                   "class _NoExtension(importlib.abc.MetaPathFinder):\n"
                   "    def find_spec(self, name, path=None, target=None):\n"
                   "        if name == 'lmeye_fast._C':\n"
                   "            raise ImportError('lmeye_fast._C is blocked by the test')\n"
                   "sys.meta_path.insert(0, _NoExtension())\n")


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
        why = f"this machine builds no extension: {record['reason']}"
        if os.environ.get(REQUIRE, "0") == "1":
            pytest.fail(f"{why} ({REQUIRE}=1)", pytrace=False)
        pytest.skip(why)
    assert record["archs"] == ["sm_86", "sm_90"]
    default = build_record(tmp_path, TORCH_CUDA_ARCH_LIST="")
    assert default["archs"] == ["sm_80", "sm_90"]


def test_package_imports_without_the_extension():
    code = BLOCK_EXTENSION + (
        "import lmeye_fast; from lmeye_fast import backends\n"
        "ok, reason = backends.extension_status(); assert not ok and reason, reason\n"
        "ok, reason = backends.status('cuda'); assert not ok and reason, reason; print(reason)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_ci_requires_the_extension():
    """.ci/run turns a missing extension from a skip into a failure, for the README's test command."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    export = lines.index(f"export {REQUIRE}=1")
    command = next(i for i, line in enumerate(lines) if line.endswith("&& pytest tests") or line == "pytest tests")
    assert export < command


def run_extension_tests(tmp_path, required):
    """tests/test_extension.py in a fresh interpreter where lmeye_fast._C does not load and setup.py recorded
    that it found no toolchain: (exit status, output)."""
    record = tmp_path / "_build_info.json"
    reason = "no CUDA toolchain found: CUDA_HOME=/nowhere has no bin/nvcc"
    record.write_text(json.dumps({"built": False, "reason": reason}))
    code = BLOCK_EXTENSION + (
        "from pathlib import Path\n"
        "import pytest\n"
        "from lmeye_fast import backends\n"
        f"backends.BUILD_INFO = Path({str(record)!r})\n"
        "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'tests/test_extension.py',\n"
        "                      '-k', 'build_info_recorded or ops_registered or opcheck_on_meta']))\n")
    env = {k: v for k, v in os.environ.items() if k != REQUIRE}
    if required:
        env[REQUIRE] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    return out.returncode, out.stdout + out.stderr, reason


@pytest.mark.slow
@pytest.mark.parametrize("required", [False, True], ids=["laptop", "ci"])
def test_missing_extension_skips_or_fails_with_the_recorded_reason(tmp_path, required):
    status, output, reason = run_extension_tests(tmp_path, required)
    assert reason in output, output
    if required:
        assert status == 1, output
        assert f"({REQUIRE}=1)" in output and " passed" not in output and "skipped" not in output, output
    else:
        assert status == 0, output
        assert "skipped" in output and "failed" not in output and "error" not in output, output
