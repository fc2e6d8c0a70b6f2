"""What the main job shows: the summary starts with the schedules, the plot draws them, and leaves
out the kernel panels whose providers all run the same implementation. Synthetic rows, no timing."""

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness  # noqa: E402
import plot  # noqa: E402

SHAPE = "llama-512x8 B=2 T=384 P=300"
CPU_META = {"device": "cpu", "torch": "2.x", "triton": "3.x", "commit": "abc1234", "date": "today"}
ROUNDS = 7
# How each provider's wall time moves from round to round (its own jitter, not a load that every
# provider of a round shares); the CPU time does not move.
WALL_JITTER = {harness.STATIC_ONLY: (1.0, 1.1, 0.95, 1.05, 1.0, 0.9, 1.1),
               harness.TWO_PASS: (1.05, 0.9, 1.0, 1.1, 0.95, 1.0, 1.0),
               harness.SINGLE_PASS: (0.95, 1.0, 1.1, 1.0, 1.05, 1.0, 0.9)}


def schedule_row(case, provider, seconds, cpu=None, wall=None, **keys):
    """A row timed in ``ROUNDS`` interleaved rounds: CPU time ``seconds`` in every round (or the
    per-round seconds ``cpu``), wall time ``seconds`` jittered per provider (or the per-round ``wall``)."""
    cpu = [seconds * 1e6] * ROUNDS if cpu is None else [t * 1e6 for t in cpu]
    jitter = WALL_JITTER.get(provider, (1.0,) * ROUNDS)
    wall = [seconds * f * 1e6 for f in jitter] if wall is None else [t * 1e6 for t in wall]
    median_wall = harness.percentile(wall, 50)
    return dict(suite="schedules", case=case, provider=provider, shape=SHAPE, config=SHAPE.split(" B=")[0],
                batch=2, dtype="fp32", device="cpu", median_us=median_wall, wall_us=median_wall,
                cpu_us=harness.percentile(cpu, 50), rounds_wall_us=wall, rounds_cpu_us=cpu, threads=1,
                load_avg=[0.3, 0.4, 0.5], cores=2, **keys)


def kernel_row(suite, case, provider, batch, x_eager, **keys):
    return dict(suite=suite, case=case, provider=provider, shape=f"small B{batch}", config="small", batch=batch,
                dtype="fp32", device="cpu", median_us=100.0 / x_eager, wall_us=100.0 / x_eager, x_eager=x_eager,
                **keys)


def rows():
    """Two passes 2x slower for prefill and the frozen-prefix step, 1.5x for the trainable-prefix step."""
    def generate(provider, seconds):  # 16 new tokens for each of 2 rows, throughput at the wall time
        row = schedule_row("generate", provider, seconds, throughput_unit="tokens/s", new_tokens=16)
        return dict(row, throughput=32 / (row["wall_us"] * 1e-6))

    schedules = [
        schedule_row("prefill", harness.STATIC_ONLY, 1.0), schedule_row("prefill", harness.TWO_PASS, 2.0),
        schedule_row("prefill", harness.SINGLE_PASS, 1.0),
        schedule_row("train-step", harness.STATIC_ONLY, 3.0), schedule_row("train-step", harness.TWO_PASS, 6.0),
        schedule_row("train-step", harness.SINGLE_PASS, 4.0),
        schedule_row("train-step-frozen-prefix", harness.TWO_PASS, 4.0),
        schedule_row("train-step-frozen-prefix", harness.SINGLE_PASS, 2.0),
        generate(harness.STATIC_ONLY, 0.5), generate(harness.TWO_PASS, 0.75), generate(harness.SINGLE_PASS, 0.6),
        schedule_row(*harness.IPN_SHARE, 0.2),
    ]
    everywhere_reference = {"request": "reference", "attend_decomposed": "reference"}
    kernels = []
    for batch in (1, 8):
        # On a machine without a GPU, auto resolves to the reference: the same implementation twice.
        kernels += [kernel_row("ops", "request", "reference-eager", batch, 1.0, resolved="reference"),
                    kernel_row("ops", "request", "auto", batch, 1.01, resolved="reference"),
                    kernel_row("ipn", "forward", "reference-eager", batch, 1.0),
                    kernel_row("ipn", "forward", "auto", batch, 0.99, resolved=everywhere_reference),
                    kernel_row("interleave", "interleave", "index_put-copy", batch, 1.0),
                    kernel_row("interleave", "interleave", "index_add_-inplace", batch, 3.0)]
    kernels.append(kernel_row("ipn", "forward", "reference-compile", 8, 2.0))
    return kernels[:6] + schedules + kernels[6:]  # the suites' order in a run does not matter


def cells(line):
    """A table line's cells: the columns are at least two spaces apart, a cell has single spaces."""
    return re.split(r"\s{2,}", line.strip())


def test_summary_starts_with_single_pass_against_two_passes_and_static_only():
    lines = harness.format_summary(rows(), CPU_META).splitlines()
    assert lines[0].startswith("LMEye schedules, single pass against two passes and static-only: " + SHAPE)
    # CPU time, the steadier clock here (the wall time jitters), and the rounds it was taken over.
    assert "7 interleaved rounds on 1 thread, median process CPU time per call" in lines[0]
    assert "on process CPU time, the steadier here (widest spread ±0%; wall time ±" in lines[0]
    assert cells(lines[1]) == ["case", *harness.SCHEDULE_PROVIDERS, "single vs two-pass", "single / static-only"]
    table = [cells(line) for line in lines[3:7]]
    assert table == [
        ["prefill", "1 s", "2 s", "1 s", "2.00x (2.00-2.00)", "1.00 (1.00-1.00)"],
        ["train step, prefix trainable", "3 s", "6 s", "4 s", "1.50x (1.50-1.50)", "1.33 (1.33-1.33)"],
        ["train step, prefix frozen", "-", "4 s", "2 s", "2.00x (2.00-2.00)", "-"],
        ["generate 16 tokens", "500 ms (64 tokens/s)", "750 ms (42.7 tokens/s)", "600 ms (53.3 tokens/s)",
         "1.25x (1.25-1.25)", "1.20 (1.20-1.20)"],
    ]
    assert lines[7] == "the IPN's own forward+backward: 200 ms; its share of the single-pass train step: 5.0% (5.0-5.0)"
    assert lines[8] == harness.NO_GPU_LINE and "benchmarks/RESULTS.md" in lines[8]
    rest = "\n".join(lines[9:])
    assert "schedules/" not in rest  # the schedules are not repeated in the kernel table
    assert rest.index("device: cpu") < rest.index("ops/request") and "interleave/interleave" in rest


def single_vs_two_pass(**rounds):
    """The prefill rows of two passes and the single pass with these per-round seconds, through the summary."""
    case = [schedule_row("prefill", harness.TWO_PASS, 0, **{k: v[0] for k, v in rounds.items()}),
            schedule_row("prefill", harness.SINGLE_PASS, 0, **{k: v[1] for k, v in rounds.items()})]
    lines = harness.format_schedules(case)
    return lines, next(cells(line) for line in lines if line.startswith("prefill"))[-2]


def test_a_ratio_is_the_median_of_the_ratios_within_rounds():
    # A slow phase (x5) starts in round 3 between the two providers' calls. Their medians taken
    # apart give 2 s against 5 s, the single pass the slower; within rounds it is 2x faster in 6 of 7.
    two = (2, 2, 2, 2, 10, 10, 10)
    single = (1, 1, 1, 5, 5, 5, 5)
    lines, ratio = single_vs_two_pass(cpu=(two, single), wall=(two, single))
    assert ratio == "2.00x (2.00-2.00)"
    assert cells(lines[3])[2:4] == ["2 s", "5 s"]


def test_the_ratios_use_the_steadier_clock_and_say_which():
    steady, jittery = (2, 2, 2, 2, 2, 2, 2), (2, 2.6, 1.6, 2, 2.4, 1.8, 2)
    lines, ratio = single_vs_two_pass(cpu=(jittery, (1,) * 7), wall=(steady, (1,) * 7))
    assert ratio == "2.00x (2.00-2.00)"
    assert "median wall time per call" in lines[0] and "on wall time, the steadier here" in lines[0]
    assert "process CPU time ±" in lines[0]
    lines, ratio = single_vs_two_pass(cpu=(steady, (1,) * 7), wall=(jittery, (1,) * 7))
    assert ratio == "2.00x (2.00-2.00)" and "on process CPU time, the steadier here" in lines[0]


def test_the_ipn_share_does_not_pick_the_clock():
    # A call of a few ms beside one of seconds: its share is noisy, the comparisons are not.
    ipn = schedule_row(*harness.IPN_SHARE, 0, cpu=(0.1, 0.3, 0.2, 0.1, 0.3, 0.2, 0.2))
    lines = harness.format_schedules([r for r in rows() if r["case"] != harness.IPN_SHARE[0]] + [ipn])
    assert "on process CPU time, the steadier here (widest spread ±0%" in lines[0]
    assert lines[7] == ("the IPN's own forward+backward: 200 ms; its share of the single-pass train step: "
                        "5.0% (3.0-7.0) noisy, load 0.3")
    assert lines[8].startswith("noisy: ")


def test_a_ratio_spread_past_20_percent_is_marked_noisy_with_the_load_average():
    wide = (1.5, 2.5, 1.5, 2.0, 2.5, 1.5, 2.5)  # p20 1.5, p80 2.5: ±25% of 2.0
    lines, ratio = single_vs_two_pass(cpu=(wide, (1,) * 7), wall=(wide, (1,) * 7))
    assert ratio == "2.00x (1.50-2.50) noisy, load 0.3"
    note = [line for line in lines if line.startswith("noisy:")]
    assert len(note) == 1 and "±20% of the median" in note[0] and "on 2 cores" in note[0]
    assert "benchmarks/schedules_under_load.py" in note[0]
    within = (1.65, 2.35, 1.65, 2.0, 2.35, 1.65, 2.35)  # ±17.5%: printed with its spread, not marked
    lines, ratio = single_vs_two_pass(cpu=(within, (1,) * 7), wall=(within, (1,) * 7))
    assert ratio == "2.00x (1.65-2.35)" and not any(line.startswith("noisy:") for line in lines)


def test_ratio_of_rounds_needs_matching_rounds():
    assert harness.Ratio.of_rounds([2.0, 4.0], [1.0, 2.0]) == harness.Ratio(2.0, 2.0, 2.0)
    assert harness.Ratio.of_rounds([2.0, 4.0], [1.0]) is None
    assert harness.Ratio.of_rounds([], []) is None
    assert harness.Ratio.of_rounds([2.0], [0.0]) is None
    assert harness.Ratio(2.0, 1.6, 2.4).spread == pytest.approx(0.2) and not harness.Ratio(2.0, 1.6, 2.4).noisy
    assert harness.Ratio(2.0, 1.59, 2.1).noisy


def test_rounds_rotate_so_each_provider_comes_first_in_turn():
    providers = ["a", "b", "c"]
    orders = [harness.round_order(providers, i) for i in range(7)]
    assert orders[:4] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert all(sorted(order) == providers for order in orders)


def test_a_benchmark_of_several_providers_gives_a_row_each():
    info = {"rows": [harness.row_info(suite="schedules", case="prefill", provider=p, wall_us=us, cpu_us=us,
                                      note=None) for p, us in ((harness.TWO_PASS, 2e6), (harness.SINGLE_PASS, 1e6))]}
    found = harness.summary_rows(info, stats_median_s=3.0, ceilings=None)
    assert [(r["provider"], r["median_us"]) for r in found] == [(harness.TWO_PASS, 2e6), (harness.SINGLE_PASS, 1e6)]
    assert all("note" not in r for r in found)  # None values are left out
    one = harness.summary_rows({"suite": "ops", "case": "request", "provider": "auto"}, 5e-6, None)
    assert [r["wall_us"] for r in one] == [5.0]


def test_gpu_rows_have_the_wall_time_only():
    def gpu(row):
        return {k: v for k, v in row.items() if k not in ("cpu_us", "rounds_cpu_us", "threads")}

    gpu_rows = [dict(gpu(r), device="NVIDIA H200") for r in rows() if r["suite"] == "schedules"]
    lines = harness.format_schedules(gpu_rows)
    assert "7 interleaved rounds, median wall time per call; each ratio the median" in lines[0]
    assert "steadier" not in lines[0] and "thread" not in lines[0]
    # Within rounds: 2 x the two jitters' quotient, 1.80 to 2.22 (p20 1.81, p80 2.21).
    assert cells(lines[3])[-2] == "2.00x (1.81-2.21)"


def test_summary_on_a_gpu_machine_leaves_out_the_no_gpu_line():
    text = harness.format_summary(rows(), dict(CPU_META, device="NVIDIA H200"))
    assert harness.NO_GPU_LINE not in text
    assert text.startswith("LMEye schedules")


def test_summary_without_schedules_is_the_kernel_table():
    kernels = [r for r in rows() if r["suite"] != "schedules"]
    lines = harness.format_summary(kernels, CPU_META).splitlines()
    assert lines[0] == harness.NO_GPU_LINE and lines[2].startswith("device: cpu")


def test_plot_draws_the_schedules_and_leaves_out_identical_providers(tmp_path):
    summary = {"meta": CPU_META, "rows": rows()}
    fig, titles = plot.figure(summary)
    assert titles[0].startswith(f"schedules: {SHAPE}")
    # ipn/forward keeps its panel (torch.compile is another implementation); ops/request runs the
    # reference under both of its providers and has none.
    assert sorted(t.split("\n")[0] for t in titles[1:]) == ["interleave/interleave", "ipn/forward"]
    bars = fig.axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == [
        "prefill", "train step,\nprefix trainable", "train step,\nprefix frozen", "generate"]
    assert [t.get_text() for t in bars.texts] == ["2.00x", "1.50x", "2.00x", "1.25x"]
    heights = sorted(round(p.get_height(), 6) for p in bars.patches)
    assert heights == sorted([1.0, 2.0, 1.0, 3.0, 6.0, 4.0, 4.0, 2.0, 0.5, 0.75, 0.6])
    plot.plt.close(fig)

    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    plot.main([str(path), "-o", str(tmp_path / "out.png")])
    assert (tmp_path / "out.png").stat().st_size > 0


def test_plot_refuses_a_summary_of_identical_providers_only():
    only_reference = [r for r in rows() if r["suite"] == "ops"]
    with pytest.raises(SystemExit, match="nothing to plot"):
        plot.figure({"meta": CPU_META, "rows": only_reference})


def test_summary_puts_the_encoder_decoder_rows_in_a_table_of_their_own():
    seq2seq_shape = "t5-512x4+4 B=2 T=320 L=32"

    def seq2seq_row(case, provider, seconds, **keys):
        return dict(schedule_row(case, provider, seconds, **keys), shape=seq2seq_shape,
                    config=seq2seq_shape.split(" B=")[0])

    extra = [seq2seq_row("prefill", harness.SEQ2SEQ_NAIVE, 2.2), seq2seq_row("prefill", harness.SEQ2SEQ, 2.0),
             seq2seq_row("train-step", harness.SEQ2SEQ_NAIVE, 4.4, peak_mem_mb=100.0),
             seq2seq_row("train-step", harness.SEQ2SEQ, 4.0, peak_mem_mb=90.0)]
    lines = harness.format_summary(rows() + extra, CPU_META).splitlines()
    assert lines[0].startswith("LMEye schedules, single pass against two passes and static-only: " + SHAPE)
    start = next(i for i, line in enumerate(lines) if line.startswith("LMEye on an encoder-decoder LLM"))
    assert seq2seq_shape in lines[start] and start > 7
    assert cells(lines[start + 1]) == ["case", *harness.SEQ2SEQ_PROVIDERS, "speed-up"]
    assert [cells(line) for line in lines[start + 3:start + 5]] == [
        ["prefill", "2.2 s", "2 s", "1.10x (1.10-1.10)"],
        ["train step, adapter trainable", "4.4 s", "4 s", "1.10x (1.10-1.10)"]]
    assert "7 interleaved rounds on 1 thread, median process CPU time per call" in lines[start]
    assert lines[start + 5].startswith("peak memory beyond the inputs: train step, adapter trainable, "
                                       f"{harness.SEQ2SEQ_NAIVE}: 100 MB")
    # The plot draws the decoder-only schedules panel as before and no encoder-decoder panel.
    fig, titles = plot.figure({"meta": CPU_META, "rows": rows() + extra})
    assert [t for t in titles if t.startswith("schedules:")] == [titles[0]] and seq2seq_shape not in titles[0]
    plot.plt.close(fig)
