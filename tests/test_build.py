"""setup.py builds against the installing Python's torch, isolated or not, or stops the install
saying why; the package imports without the extension (or with one built against another torch)
and says why it is off; CI (``LMEYE_FAST_REQUIRE_EXTENSION=1``, exported by .ci/run) fails
without one."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REQUIRE = "LMEYE_FAST_REQUIRE_EXTENSION"
# Run first in a fresh interpreter: lmeye_fast._C then fails to import as a missing one would.
BLOCK_EXTENSION = ("import importlib.abc, sys\n"
                   "class _NoExtension(importlib.abc.MetaPathFinder):\n"
                   "    def find_spec(self, name, path=None, target=None):\n"
                   "        if name == 'lmeye_fast._C':\n"
                   "            raise ImportError('lmeye_fast._C is blocked by the test')\n"
                   "sys.meta_path.insert(0, _NoExtension())\n")


# What pip's build isolation does to the Python that runs setup.py: the installing environment's
# packages leave sys.path (pip points PYTHONPATH at a build environment that holds setuptools).
ISOLATE = ("import setuptools, site, sys\n"
           "hidden = set(site.getsitepackages()) | {site.getusersitepackages()}\n"
           "sys.path[:] = [p for p in sys.path if p not in hidden]\n")
# The same, with the installing Python reporting no torch either.
NO_TORCH = ISOLATE + "NO_TORCH = True\n"


def run_setup(tmp_path, **env):
    """``setup.py --version`` in a copy of the build files: (process, the build record it left or None)."""
    shutil.rmtree(tmp_path / "kernels", ignore_errors=True)
    shutil.rmtree(tmp_path / "lmeye_fast", ignore_errors=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "kernels").mkdir()
    shutil.copy(ROOT / "kernels" / "SOURCES", tmp_path / "kernels" / "SOURCES")
    (tmp_path / "lmeye_fast").mkdir()
    shutil.copy(ROOT / "lmeye_fast" / "__init__.py", tmp_path / "lmeye_fast" / "__init__.py")
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, **env})
    record = tmp_path / "lmeye_fast" / "_build_info.json"
    return out, (json.loads(record.read_text()) if record.exists() else None)


def plan(prelude="", **env):
    """setup.py's plan() (what it would build, and the record it would leave once built) in a fresh
    interpreter after ``prelude``: the record, or the report that stops the install."""
    code = prelude + (
        "import json, runpy\n"
        "setup_py = runpy.run_path('setup.py', run_name='lmeye_setup')\n"
        "if globals().get('NO_TORCH'):\n"
        "    setup_py['import_torch'].__globals__['installing_python_path'] = lambda: list(sys.path)\n"
        "try:\n"
        "    print(json.dumps(setup_py['plan']()[1]))\n"
        "except setup_py['CannotBuild'] as why:\n"
        "    print(json.dumps({'stops': why.report()}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def needs_a_toolkit(record):
    """Skip (or fail, where the extension is required) when this machine cannot build the extension."""
    if "stops" in record:
        why = f"this machine builds no extension: {record['stops']}"
        if os.environ.get(REQUIRE, "0") == "1":
            pytest.fail(f"{why} ({REQUIRE}=1)", pytrace=False)
        pytest.skip(why)


def assert_stops(report, why, command):
    """The install stops with the reason, the command that fixes it, and the way to install without _C."""
    lines = [line.strip() for line in report.splitlines()]  # pip indents a build's output
    assert "lmeye_fast: cannot build the CUDA extension lmeye_fast._C." in lines, report
    assert f"Why: {why}" in lines, report
    # Each command alone on its line, to be copied as it stands.
    assert command in lines and "LMEYE_FAST_SKIP_CUDA_BUILD=1 pip install -e ." in lines, report


def test_skip_flag_builds_nothing_and_says_why(tmp_path):
    out, record = run_setup(tmp_path, LMEYE_FAST_SKIP_CUDA_BUILD="1")
    assert out.returncode == 0, out.stderr
    assert record == {"built": False, "reason": "skipped: LMEYE_FAST_SKIP_CUDA_BUILD=1 at install time; "
                                                "to build it, reinstall without the flag: pip install -e ."}


def test_skip_flag_is_in_the_version_pip_prints(tmp_path):
    """pip hides a passing build's output; the last line it prints names the version it installed."""
    from lmeye_fast import __version__

    out, _ = run_setup(tmp_path, LMEYE_FAST_SKIP_CUDA_BUILD="1")
    assert out.stdout.strip() == f"{__version__}+no.cuda.kernels", out.stdout
    # Without isolation no build requirement is fetched, and `pip wheel` installs nothing.
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "LMEYE_FAST_SKIP_CUDA_BUILD": "1"})
    assert out.returncode == 0, out.stderr
    assert f"lmeye_fast-{__version__}+no.cuda.kernels-" in out.stdout, out.stdout


def test_a_built_extension_keeps_the_plain_version(tmp_path):
    from lmeye_fast import __version__

    out, record = run_setup(tmp_path)
    needs_a_toolkit({"stops": out.stderr} if out.returncode else {})
    assert out.stdout.strip().splitlines()[-1] == __version__, out.stdout


def test_missing_toolchain_stops_the_install_and_says_why(tmp_path):
    missing = tmp_path / "no-toolkit"
    out, record = run_setup(tmp_path, CUDA_HOME=str(missing))
    assert out.returncode == 1 and record is None, out.stderr
    assert_stops(out.stderr, f"no CUDA toolchain found: CUDA_HOME={missing} has no bin/nvcc",
                 f"CUDA_HOME=/usr/local/cuda-{torch.version.cuda} pip install -e .")


def test_cpu_only_torch_stops_the_install_and_says_why():
    record = plan("import torch\ntorch.version.cuda = None\n")
    assert_stops(record["stops"], f"torch {torch.__version__} is not a CUDA build (a CPU-only or ROCm one)",
                 "pip install -e .")


def test_no_torch_anywhere_stops_the_install_and_says_why():
    record = plan(NO_TORCH)
    assert_stops(record["stops"], f"torch is not installed in the Python running this install ({sys.executable})",
                 "pip install torch && pip install -e .")


def test_no_isolation_builds_against_the_importable_torch():
    record = plan()
    needs_a_toolkit(record)
    assert record == {"built": True, "archs": ["sm_80", "sm_90"], "torch": torch.__version__,
                      "cuda": torch.version.cuda, "isolated_build": False}


def test_isolated_build_reaches_the_installing_pythons_torch():
    record = plan(ISOLATE)
    needs_a_toolkit(record)
    assert record == {"built": True, "archs": ["sm_80", "sm_90"], "torch": torch.__version__,
                      "cuda": torch.version.cuda, "isolated_build": True}


def test_architectures_come_from_the_environment_not_the_gpu():
    record = plan(TORCH_CUDA_ARCH_LIST="8.6;9.0")
    needs_a_toolkit(record)
    assert record["archs"] == ["sm_86", "sm_90"]


def test_pip_shows_why_the_install_stopped(tmp_path):
    """pip prints a failing build's output at its default verbosity (and hides a passing one's)."""
    run_setup(tmp_path, LMEYE_FAST_SKIP_CUDA_BUILD="1")
    missing = tmp_path / "no-toolkit"
    # Without isolation no build requirement is fetched, and `pip wheel` installs nothing.
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "CUDA_HOME": str(missing)})
    assert out.returncode != 0
    assert_stops(out.stdout + out.stderr, f"no CUDA toolchain found: CUDA_HOME={missing} has no bin/nvcc",
                 f"CUDA_HOME=/usr/local/cuda-{torch.version.cuda} pip install -e .")


def test_a_built_package_carries_the_record(tmp_path):
    """The record is package data, so a wheel (`pip install .`) has it as an editable install does."""
    run_setup(tmp_path, LMEYE_FAST_SKIP_CUDA_BUILD="1")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", "lib"], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "LMEYE_FAST_SKIP_CUDA_BUILD": "1"})
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "lib" / "lmeye_fast" / "_build_info.json").read_text())
    assert record["built"] is False and "LMEYE_FAST_SKIP_CUDA_BUILD=1" in record["reason"]


# In a fresh interpreter: what import, the backend table, an explicit backend="cuda" and the cuda
# ops module say about the extension, and whether it was loaded.
OBSERVE = ("import json, sys, warnings\n"
           "with warnings.catch_warnings(record=True) as caught:\n"
           "    warnings.simplefilter('always')\n"
           "    import lmeye_fast\n"
           "from lmeye_fast import backends, ops\n"
           "seen = {'import warnings': [str(w.message) for w in caught], 'cuda': backends.status('cuda')[1]}\n"
           "try:\n"
           "    ops.get('interleave', 'cuda')\n"
           "except RuntimeError as exc:\n"
           "    seen['backend=cuda'] = str(exc)\n"
           "try:\n"
           "    import lmeye_fast.ops.cuda\n"
           "except ImportError as exc:\n"
           "    seen['import ops.cuda'] = str(exc)\n"
           "seen['loaded'] = 'lmeye_fast._C' in sys.modules\n"
           "print(json.dumps(seen))\n")


def observe_installed(tmp_path, record):
    """OBSERVE, and the info command, on a copy of the package (its extension too, where built) whose
    build record is ``record``."""
    shutil.copytree(ROOT / "lmeye_fast", tmp_path / "lmeye_fast", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "lmeye_fast" / "_build_info.json").write_text(json.dumps(record))
    seen = subprocess.run([sys.executable, "-c", OBSERVE], cwd=tmp_path, capture_output=True, text=True, check=True)
    info = subprocess.run([sys.executable, "-m", "lmeye_fast.info"], cwd=tmp_path, capture_output=True, text=True,
                          check=True)
    return json.loads(seen.stdout), info.stdout


def assert_reported(seen, info, reason):
    """``reason`` reaches the backend table, an explicit backend="cuda", the cuda ops and info; _C stays unloaded."""
    assert seen["cuda"] == reason
    assert seen["backend=cuda"] == f"backend 'cuda' is not available here: {reason} (see `python -m lmeye_fast.info`)"
    assert seen["import ops.cuda"] == f"the cuda backend needs lmeye_fast._C: {reason}"
    assert not seen["loaded"]
    assert re.search(rf"^  cuda +missing +{re.escape(reason)}$", info, flags=re.M), info


def test_skipped_build_keeps_import_quiet_and_reports_the_fix(tmp_path):
    reason = ("skipped: LMEYE_FAST_SKIP_CUDA_BUILD=1 at install time; "
              "to build it, reinstall without the flag: pip install -e .")
    seen, info = observe_installed(tmp_path, {"built": False, "reason": reason})
    assert seen["import warnings"] == []
    assert_reported(seen, info, reason)
    assert f"_C         not built: {reason}" in info


def test_extension_built_against_another_torch_is_refused_with_the_fix(tmp_path):
    """An upgraded torch: the extension is not loaded (an undefined symbol at best), import warns once,
    and every report names the two versions and the rebuild command."""
    seen, info = observe_installed(tmp_path, {"built": True, "archs": ["sm_90"], "torch": "2.6.0+cu124",
                                              "cuda": "12.4", "isolated_build": True})
    reason = (f"lmeye_fast._C was built against torch 2.6.0+cu124, but torch {torch.__version__} is running; "
              "the CUDA backend is off until it is rebuilt against this torch: "
              "reinstall lmeye_fast from its source folder: pip install -e .")
    assert seen["import warnings"] == [reason]
    assert_reported(seen, info, reason)
    assert f"_C         built for sm_90 against torch 2.6.0+cu124 (CUDA 12.4); loads: {reason}" in info


def test_ci_requires_the_extension():
    """.ci/run turns a missing extension from a skip into a failure, for the README's test command."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    export = lines.index(f"export {REQUIRE}=1")
    command = next(i for i, line in enumerate(lines) if line.endswith("&& pytest tests") or line == "pytest tests")
    assert export < command


def run_extension_tests(tmp_path, required):
    """tests/test_extension.py in a fresh interpreter where lmeye_fast._C does not load and its build record
    gives a reason: (exit status, output)."""
    record = tmp_path / "_build_info.json"
    # Free of the word "skipped", which the caller looks for in pytest's summary.
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
