"""pytest-benchmark plumbing: shape sets, the measured ceilings, and the end-of-run summary.

Options:
  --shape-set {gpu,cpu,full}  which shapes run (benchmarks/shapes.py); default ``LMEYE_BENCH_SET``,
                              else ``gpu`` with a CUDA device and ``cpu`` without
  --bench-summary PATH        the summary JSON, rewritten after every case so that an interrupted
                              run keeps what it measured (default benchmarks/out/summary.json)
  --bench-budget SECONDS      skip, with that reason, the cases that would start after this many
                              seconds (0 = no limit), so a capped run still ends with its summary

A test module declares ``SUITE = "<name of a shape-table suite>"`` and takes a ``bench_shape``
argument to be parametrized over that suite's shapes. Every benchmark whose ``extra_info``
carries the standard keys (benchmarks/harness.py), or a list of such rows under ``rows``, gets
its summary rows, whoever wrote it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the suites import harness/shapes whatever pytest's import mode
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import shapes  # noqa: E402
ROWS = pytest.StashKey[list]()
CEILINGS = pytest.StashKey[harness.Ceilings]()
STARTED = pytest.StashKey[float]()
# Order of the suites in a run: under a time budget the headline cases come first.
SUITE_ORDER = ("test_bench_ipn", "test_bench_interleave", "test_bench_planner", "test_bench_schedules",
               "test_bench_ops")


def pytest_addoption(parser):
    group = parser.getgroup("lmeye_fast benchmarks")
    group.addoption("--shape-set", default=None, choices=sorted(shapes.SETS),
                    help="shape set of benchmarks/shapes.py (default: LMEYE_BENCH_SET, else gpu/cpu by device)")
    group.addoption("--bench-summary", default=str(HERE / "out" / "summary.json"),
                    help="where the summary JSON is written")
    group.addoption("--bench-budget", type=float, default=0.0,
                    help="seconds after which the remaining cases are skipped (0 = no limit)")


def pytest_configure(config):
    config.stash[ROWS] = []
    config.stash[STARTED] = time.monotonic()
    overridden = os.environ.pop("LMEYE_FAST_BACKEND", None)
    if overridden:
        # The variable would force one backend onto every provider and make the comparison void.
        print(f"lmeye_fast benchmarks: ignoring LMEYE_FAST_BACKEND={overridden}; each case picks its provider")


def shape_set(config) -> str:
    try:
        return config.getoption("--shape-set") or shapes.default_set()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc):
    suite = getattr(metafunc.module, "SUITE", None)
    chosen = shapes.SETS[shape_set(metafunc.config)]
    if suite not in chosen or "bench_shape" not in metafunc.fixturenames:
        return
    selected = chosen[suite]
    metafunc.parametrize("bench_shape", selected, ids=[s.label.replace(" ", "-") for s in selected])


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = getattr(getattr(item, "module", None), "__name__", "")
        return SUITE_ORDER.index(name) if name in SUITE_ORDER else len(SUITE_ORDER)

    items.sort(key=rank)  # stable: each module keeps its own order


def pytest_runtest_setup(item):
    budget = item.config.getoption("--bench-budget")
    if budget and time.monotonic() - item.config.stash[STARTED] > budget:
        pytest.skip(f"benchmark time budget of {budget:.0f} s is spent (--bench-budget)")


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return harness.device()


@pytest.fixture(scope="session")
def ceilings(request, bench_device) -> harness.Ceilings:
    """Copy bandwidth and matmul peak, measured once per run on the benchmark device."""
    measured = harness.measure_ceilings(bench_device)
    request.config.stash[CEILINGS] = measured
    return measured


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if bench is not None and bench.stats is not None:
        stats = bench.stats.stats
        rows = harness.summary_rows(dict(bench.extra_info), stats.median if stats else None,
                                    item.config.stash.get(CEILINGS, None))
        for row in rows:
            row["test"] = item.nodeid
        item.config.stash[ROWS].extend(rows)
        if rows:
            write_summary(item.config)
    return result


def _git(*args) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def meta(config) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not importable"
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    info = {
        "device": harness.device_name(harness.device()),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),  # what a CPU timing (or the host side of a GPU one) ran on
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "shape_set": shape_set(config),
    }
    ceilings = config.stash.get(CEILINGS, None)
    if ceilings is not None:
        info["ceilings"] = ceilings.as_dict()
    return info


def write_summary(config) -> Path:
    rows = harness.add_schedule_ratios(harness.add_speedups(config.stash[ROWS]))
    path = Path(config.getoption("--bench-summary"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta(config), "rows": rows}, indent=1, default=str) + "\n")
    return path


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(ROWS, None)
    if not rows:
        return
    path = write_summary(config)
    terminalreporter.write_sep("=", "lmeye_fast benchmark summary")
    terminalreporter.write_line(harness.format_summary(rows, meta(config)))
    terminalreporter.write_line(f"summary JSON: {path}  (plot: python benchmarks/plot.py {path})")
