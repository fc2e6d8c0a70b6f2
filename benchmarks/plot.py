"""Speedup over eager PyTorch against batch size, one line per provider, from a benchmark summary JSON.

    python benchmarks/plot.py benchmarks/out/summary.json [-o speedup.png] [--table]

One panel per suite/case/configuration that sweeps the batch size. Solid lines are the
speedup in GPU time (graph replay), dashed lines in wall time per eager call; on the CPU
there is only the wall time. ``--table`` also prints the summary table and, from the ``ops`` suite on a
GPU, the faster kernel backend per op.
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
from harness import format_table  # noqa: E402


def sweeps(rows):
    """{(suite/case, config): {provider: [(batch, x_eager, x_eager_wall)]}} for groups with several batch sizes."""
    groups = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("batch") is None or row.get("x_eager") is None:
            continue
        key = (f"{row['suite']}/{row['case']}", row.get("config", ""))
        groups[key][row["provider"]].append((row["batch"], row["x_eager"], row.get("x_eager_wall")))
    out = {}
    for key, providers in groups.items():
        if len({b for points in providers.values() for b, _, _ in points}) > 1:
            out[key] = {p: sorted(points) for p, points in providers.items()}
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


def plot(summary: dict, path: Path) -> int:
    rows, meta = summary["rows"], summary.get("meta", {})
    panels = sweeps(rows)
    if not panels:
        raise SystemExit("no suite in this summary sweeps the batch size with an eager baseline: nothing to plot")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    colors = {}
    for ax, ((case, config), providers) in zip(axes.flat, sorted(panels.items())):
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
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"lmeye_fast on {meta.get('device', '?')} — torch {meta.get('torch', '?')}, "
                 f"triton {meta.get('triton', '?')}, commit {meta.get('commit', '?')}, {meta.get('date', '')}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(panels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="summary JSON written by `pytest benchmarks/ --benchmark-only`")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: <summary>-speedup.png)")
    parser.add_argument("--table", action="store_true", help="also print the summary table")
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    if args.table:
        print(format_table(summary["rows"], summary.get("meta")))
        backends = kernel_backends(summary["rows"])
        if backends:
            print("\nfaster kernel backend per op (GPU time), for AUTO_ORDER in lmeye_fast/ops/__init__.py:")
            print("\n".join(backends))
    output = args.output or args.summary.with_name(args.summary.stem + "-speedup.png")
    panels = plot(summary, output)
    print(f"wrote {output} ({panels} panel{'s' if panels != 1 else ''})")


if __name__ == "__main__":
    main()
