"""The benchmark plot from a summary JSON: the schedules, then speedup over eager against batch size.

    python benchmarks/plot.py benchmarks/out/summary.json [-o speedup.png] [--table]

The first panel is the schedules suite: median time per call of static-only, two-pass and
single-pass LMEye for each case, the single pass's speed-up over two passes printed on its bars
(both on the clock the summary's ratios use, ``harness.add_schedule_ratios``).
Then one panel per suite/case/configuration that sweeps the batch size, one line per provider:
solid lines are the speedup in GPU time (graph replay), dashed lines in wall time per eager call;
on the CPU there is only the wall time. A panel whose providers all run the same implementation
(on a machine without a GPU, every kernel provider falls back to the PyTorch reference) is left
out. ``--table`` also prints the summary and, from the ``ops`` suite on a GPU, the faster kernel
backend per op.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def implementation(row) -> tuple:
    """What a row's provider actually ran: its resolved backend(s), and how it was launched."""
    provider = row["provider"]
    if provider not in harness.BACKEND_OF:
        return (provider,)  # a suite's own variants (interleave, planner) are distinct by construction
    resolved = row.get("resolved") or harness.BACKEND_OF[provider]
    backends = tuple(sorted(set(resolved.values()))) if isinstance(resolved, dict) else (resolved,)
    # torch.compile and the folded attention schedule change what runs without changing the backend name.
    launched = provider if provider in ("reference-compile", "triton-folded") else ""
    return backends + (launched,)


def sweeps(rows):
    """{(suite/case, config): {provider: [(batch, x_eager, x_eager_wall)]}} for groups with several batch sizes
    and more than one implementation among their providers."""
    groups = defaultdict(lambda: defaultdict(list))
    implementations = defaultdict(set)
    for row in rows:
        if row.get("batch") is None or row.get("x_eager") is None:
            continue
        key = (f"{row['suite']}/{row['case']}", row.get("config", ""))
        groups[key][row["provider"]].append((row["batch"], row["x_eager"], row.get("x_eager_wall")))
        implementations[key].add(implementation(row))
    out = {}
    for key, providers in groups.items():
        if len({b for points in providers.values() for b, _, _ in points}) > 1 and len(implementations[key]) > 1:
            out[key] = {p: sorted(points) for p, points in providers.items()}
    return out


def schedule_bars(rows):
    """{shape: {case: {provider: (seconds, speed-up over two passes or None)}}} of the schedules suite."""
    harness.add_schedule_ratios(rows)
    out = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["suite"] == "schedules" and row["provider"] in harness.SCHEDULE_PROVIDERS:
            out[row.get("shape", "")][row["case"]][row["provider"]] = (harness.schedule_us(row) / 1e6,
                                                                       row.get("speedup_vs_two_pass"))
    return out


def kernel_backends(rows) -> list:
    """Lines naming, per op and shape of the ``ops`` suite, the fastest of the kernel providers (triton,
    triton-folded, cuda) in GPU time: the measurement that ``AUTO_ORDER`` in lmeye_fast/ops/__init__.py
    and the attention's ``"auto"`` schedule in lmeye_fast/ops/__init__.py follow."""
    times = defaultdict(dict)
    kernel_providers = ("triton", "triton-folded", "cuda")
    for row in rows:
        if row["suite"] == "ops" and row["provider"] in kernel_providers and row.get("gpu_median_us") is not None:
            times[(row["case"], row["shape"])][row["provider"]] = row["gpu_median_us"]
    lines = []
    for (case, shape), by_backend in sorted(times.items()):
        ranked = sorted(by_backend.items(), key=lambda item: item[1])
        measured = "  ".join(f"{backend} {us:.1f} us" for backend, us in ranked)
        lines.append(f"{case:<26} {shape:<44} {measured}  -> {ranked[0][0]}")
    return lines


def draw_schedules(ax, shape: str, cases: dict) -> None:
    """Grouped bars: one group per case, one bar per provider, the speed-up over two passes on the single pass."""
    names = [c for c in harness.SCHEDULE_CASES if c in cases]
    width = 0.8 / len(harness.SCHEDULE_PROVIDERS)
    for i, provider in enumerate(harness.SCHEDULE_PROVIDERS):
        xs = [n + (i - 1) * width for n, case in enumerate(names) if provider in cases[case]]
        measured = [cases[case][provider] for case in names if provider in cases[case]]
        bars = ax.bar(xs, [seconds for seconds, _ in measured], width, color=f"C{i}", label=provider)
        for bar, (_, speedup) in zip(bars, measured):
            if speedup is not None:
                ax.annotate(f"{speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, fontweight="bold")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([harness.SCHEDULE_CASES[c].replace(", ", ",\n") for c in names], fontsize=8)
    ax.set_ylabel("median time per call (s)")
    ax.set_title(f"schedules: {shape}\nsingle pass's speed-up over two passes on its bars", fontsize=9)
    ax.margins(y=0.12)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")  # over the prefill, the shortest group


def draw_sweep(ax, rows, case: str, config: str, providers: dict, colors: dict) -> None:
    for provider, points in sorted(providers.items()):
        color = colors.setdefault(provider, f"C{len(colors) % 10}")
        batches = [p[0] for p in points]
        ax.plot(batches, [p[1] for p in points], "o-", color=color, label=provider)
        wall = [p[2] for p in points]
        has_gpu_time = any(r.get("gpu_median_us") is not None for r in rows if r["provider"] == provider)
        is_baseline = all(abs(p[1] - 1.0) < 1e-12 for p in points)
        if has_gpu_time and not is_baseline and all(w is not None for w in wall):
            ax.plot(batches, wall, "s--", color=color, alpha=0.6, label=f"{provider} (wall)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({b for pts in providers.values() for b, _, _ in pts}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("batch size B")
    ax.set_ylabel("speedup vs eager reference")
    ax.set_title(f"{case}\n{config}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def figure(summary: dict):
    """The figure and the titles of its panels, schedules first."""
    rows, meta = summary["rows"], summary.get("meta", {})
    schedules = schedule_bars(rows)
    panels = sweeps(rows)
    count = len(schedules) + len(panels)
    if not count:
        raise SystemExit("nothing to plot: no schedules rows, and no suite sweeps the batch size with an eager "
                         "baseline and more than one implementation")
    cols = min(3, count)
    nrows = math.ceil(count / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, (shape, cases) in zip(flat, schedules.items()):
        draw_schedules(ax, shape, cases)
    colors = {}
    for ax, ((case, config), providers) in zip(flat[len(schedules):], sorted(panels.items())):
        draw_sweep(ax, rows, case, config, providers, colors)
    for ax in flat[count:]:
        ax.axis("off")
    fig.suptitle(f"lmeye_fast on {meta.get('device', '?')} — torch {meta.get('torch', '?')}, "
                 f"triton {meta.get('triton', '?')}, commit {meta.get('commit', '?')}, {meta.get('date', '')}",
                 fontsize=10)
    fig.tight_layout()
    return fig, [ax.get_title() for ax in flat[:count]]


def plot(summary: dict, path: Path) -> list:
    """Write the figure to ``path``; the titles of its panels."""
    fig, titles = figure(summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return titles


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="summary JSON written by `pytest benchmarks/ --benchmark-only`")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: <summary>-speedup.png)")
    parser.add_argument("--table", action="store_true", help="also print the summary table")
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    if args.table:
        print(harness.format_summary(summary["rows"], summary.get("meta")))
        backends = kernel_backends(summary["rows"])
        if backends:
            print("\nfaster kernel backend per op (GPU time), for AUTO_ORDER in lmeye_fast/ops/__init__.py:")
            print("\n".join(backends))
    output = args.output or args.summary.with_name(args.summary.stem + "-speedup.png")
    panels = len(plot(summary, output))
    print(f"wrote {output} ({panels} panel{'s' if panels != 1 else ''})")


if __name__ == "__main__":
    main()
