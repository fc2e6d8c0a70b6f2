"""The schedules benchmarks idle and beside a competing CPU-bound process, side by side.

    python benchmarks/schedules_under_load.py [--competitors 1] [--out benchmarks/out/under_load]
                                              [--tolerance 15] [-- PYTEST-ARGS]
    python benchmarks/schedules_under_load.py --compare IDLE.json LOADED.json

Runs ``pytest benchmarks/test_bench_schedules.py --benchmark-only`` twice: first with nothing of
this script's beside it (the idle run; the machine's load average is printed before it, since
other work on the machine is not this script's to stop), then with ``--competitors`` processes
spinning on the CPU for the whole run. It prints both summaries, then for each shape one
Markdown table, ready for the README, with every time and ratio as "idle / under load" and how far
the load moved each speed-up over two passes (single pass against two passes; the encoder-decoder
schedule against two full passes), against ``--tolerance`` percent. ``PYTEST-ARGS`` go to both
runs (``-- -k prefill`` for a quick look). ``--compare`` prints the same from two summary JSONs
that earlier runs wrote. A measurement, not a test: it exits 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

SPIN = "while True: pass"  # one core's worth of CPU-bound work, in any Python
# The providers as the tables' columns name them.
COLUMNS = {harness.STATIC_ONLY: "static-only", harness.TWO_PASS: "two passes", harness.SINGLE_PASS: "single pass",
           harness.SEQ2SEQ_NAIVE: "two full encoder-decoder passes",
           harness.SEQ2SEQ: "two encoder passes + one decoder pass"}
# The speed-ups the comparison is about: (provider whose row carries it, ratio key).
SPEEDUPS = ((harness.SINGLE_PASS, "speedup_vs_two_pass"), (harness.SEQ2SEQ, "speedup_vs_two_full_passes"))


def run_schedules(summary: Path, log: Path, pytest_args: Sequence[str]) -> None:
    """One pytest run of the schedules file; says how long it took, in wall and in CPU time."""
    command = [sys.executable, "-m", "pytest", str(HERE / "test_bench_schedules.py"), "--benchmark-only", "-q",
               "-p", "no:cacheprovider", "--bench-summary", str(summary), *pytest_args]
    wall, cpu = time.perf_counter(), children_cpu_s()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=HERE.parent, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); its output is in {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-30:]))
    print(f"  took {time.perf_counter() - wall:.0f} s wall, {children_cpu_s() - cpu:.0f} s CPU "
          f"(log: {log})", flush=True)


def children_cpu_s() -> float:
    """CPU seconds of the finished child processes (the pytest runs; the competitors are waited for last)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(out: Path, competitors: int, pytest_args: Sequence[str]) -> Tuple[Path, Path]:
    """The idle run, then the run beside ``competitors`` spinning processes; their summary JSONs."""
    out.mkdir(parents=True, exist_ok=True)
    idle, loaded = out / "idle.json", out / "loaded.json"
    before = harness.load_average()
    print(f"idle run: load average {format_load(before)} before it, on {os.cpu_count()} cores"
          + (" (the machine is not idle: its figures are under that load)"
             if before and before[0] > 0.5 else ""), flush=True)
    run_schedules(idle, out / "idle.log", pytest_args)
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(competitors)]
    try:
        time.sleep(2)  # the competitors are on the CPU before the first call
        print(f"under load: {competitors} CPU-bound process{'es' if competitors > 1 else ''} beside it "
              f"(pid {', '.join(str(s.pid) for s in spinners)}); load average {format_load(harness.load_average())}",
              flush=True)
        run_schedules(loaded, out / "loaded.log", pytest_args)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return idle, loaded


def format_load(load: Optional[Sequence[float]]) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + " (1 / 5 / 15 min)" if load else "unknown"


def load(path: Path) -> dict:
    summary = json.loads(path.read_text())
    harness.add_schedule_ratios(summary["rows"])
    return summary


def both(idle: Optional[str], loaded: Optional[str]) -> str:
    return "—" if idle is None and loaded is None else f"{idle or '—'} / {loaded or '—'}"


def ratio_cell(row: Optional[dict], name: str, **style) -> Optional[str]:
    text = harness.ratio_text(row, name, **style) if row else "-"
    return None if text == "-" else text.replace("x (", "× (").replace("-", "–").replace(" noisy", ", noisy")


def time_cell(row: Optional[dict]) -> Optional[str]:
    return harness.duration_text(harness.schedule_us(row)) if row else None


def change(idle_row: Optional[dict], loaded_row: Optional[dict], name: str) -> Optional[float]:
    if not idle_row or not loaded_row or idle_row.get(name) is None or loaded_row.get(name) is None:
        return None
    return 100.0 * (loaded_row[name] / idle_row[name] - 1.0)


def run_line(summary: dict) -> str:
    """The clock the run's ratios use, its threads and the load average its cases ended at."""
    rows = [r for r in summary["rows"] if r["suite"] == "schedules"]
    loads = sorted(r["load_avg"][0] for r in rows if r.get("load_avg"))
    clocks = sorted({harness.schedule_clock(r).label for r in rows})
    threads = sorted({r["threads"] for r in rows if r.get("threads")})
    return (", ".join(clocks)
            + (f", {'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''}" if threads else "")
            + (f", 1-minute load average {loads[0]:.1f}–{loads[-1]:.1f} as its cases ended" if loads else ""))


def tables(idle: dict, loaded: dict, tolerance: float) -> Tuple[List[str], List[str]]:
    """The README-ready Markdown tables, and a line per speed-up: how far the load moved it."""
    markdown, verdicts = [], []
    idle_groups, loaded_groups = harness.schedule_groups(idle["rows"]), harness.schedule_groups(loaded["rows"])
    for shape, idle_rows in idle_groups.items():
        loaded_rows = loaded_groups.get(shape, {})
        seq2seq = any(provider in harness.SEQ2SEQ_PROVIDERS for _, provider in idle_rows)
        providers = harness.SEQ2SEQ_PROVIDERS if seq2seq else harness.SCHEDULE_PROVIDERS
        cases = harness.SEQ2SEQ_CASES if seq2seq else harness.SCHEDULE_CASES
        ours, speedup = SPEEDUPS[1] if seq2seq else SPEEDUPS[0]
        ratios = [(speedup, "speed-up" if seq2seq else "single pass vs two passes", {})]
        if not seq2seq:
            ratios.append(("ratio_to_static_only", "single pass / static-only", {"unit": ""}))
        header = [shape, *(COLUMNS[p] for p in providers), *(label for _, label, _ in ratios), "change under load"]
        markdown += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for case, label in cases.items():
            if not any((case, p) in idle_rows for p in providers):
                continue
            tokens = idle_rows.get((case, harness.SINGLE_PASS), {}).get("new_tokens")
            cells = [f"{label} {tokens} tokens" if tokens else label]
            cells += [both(time_cell(idle_rows.get((case, p))), time_cell(loaded_rows.get((case, p))))
                      for p in providers]
            carrier_idle, carrier_loaded = idle_rows.get((case, ours)), loaded_rows.get((case, ours))
            cells += [both(ratio_cell(carrier_idle, name, **style), ratio_cell(carrier_loaded, name, **style))
                      for name, _, style in ratios]
            moved = change(carrier_idle, carrier_loaded, speedup)
            cells.append("—" if moved is None else f"{moved:+.1f}%")
            markdown.append("| " + " | ".join(cells) + " |")
            if moved is not None:
                verdicts.append(f"{shape}, {label}: {'within' if abs(moved) <= tolerance else 'OUTSIDE'} "
                                f"±{tolerance:g}% ({moved:+.1f}%: {carrier_idle[speedup]:.2f}x idle, "
                                f"{carrier_loaded[speedup]:.2f}x under load)")
        markdown.append("")
    return markdown, verdicts


def report(idle_path: Path, loaded_path: Path, tolerance: float) -> None:
    idle, loaded = load(idle_path), load(loaded_path)
    meta = idle.get("meta", {})
    print(" | ".join(f"{k}: {v}" for k, v in meta.items() if k in ("device", "torch", "commit", "date")))
    for name, summary in (("idle", idle), ("under load", loaded)):
        print(f"\n== {name} ({run_line(summary)})")
        print("\n".join(harness.format_schedules(summary["rows"])))
    markdown, verdicts = tables(idle, loaded, tolerance)
    print(f"\n== side by side, idle / under load (Markdown)\nidle: {run_line(idle)}; "
          f"under load: {run_line(loaded)}\n")
    print("\n".join(markdown))
    print(f"== speed-ups under load against idle (goal: within ±{tolerance:g}%)")
    print("\n".join(verdicts) or "no speed-up measured in both runs")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--competitors", type=int, default=1, help="CPU-bound processes beside the loaded run")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "under_load",
                        help="folder of the two runs' summary JSONs and logs")
    parser.add_argument("--tolerance", type=float, default=15.0, help="the goal, in percent of the idle speed-up")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("IDLE", "LOADED"),
                        help="print the comparison of two summary JSONs instead of measuring")
    parser.add_argument("pytest_args", nargs="*", help="after --: arguments for both pytest runs")
    args = parser.parse_args(argv)
    if args.competitors < 1:
        parser.error(f"--competitors: expected at least 1, got {args.competitors}")
    idle, loaded = args.compare if args.compare else measure(args.out, args.competitors, args.pytest_args)
    report(idle, loaded, args.tolerance)


if __name__ == "__main__":
    main()
