"""The README's usage example runs exactly as written; `python -m lmeye_fast.info` reports."""

import re
import subprocess
import sys
from pathlib import Path

import lmeye_fast
from lmeye_fast import backends

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples save files
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_info_command_reports_versions_and_every_backend():
    out = subprocess.run([sys.executable, "-m", "lmeye_fast.info"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert f"lmeye_fast {lmeye_fast.__version__}" in out
    assert "torch " in out and "triton " in out
    for name in backends.BACKENDS:
        ok, reason = backends.status(name)
        assert re.search(rf"^\s+{name}\s+{'available' if ok else 'missing'}\s+", out, flags=re.M), out
    for op, order in lmeye_fast.ops.AUTO_ORDER.items():
        assert re.search(rf"^\s+{op}\s+{' > '.join(order)}$", out, flags=re.M), out
    from lmeye_fast.info import attention_schedule
    assert f"attention  {attention_schedule()}" in out and attention_schedule().split(":")[0] in ("split", "folded")
    build = backends.build_info()
    if build.get("built"):
        assert "_C         built for " + ", ".join(build["archs"]) in out
    else:
        assert f"_C         not built: {build['reason']}" in out
