"""Timing machinery of the benchmark suites.

Two figures per case, because users feel both and launch cost dominates eager
PyTorch on these GPUs:

- **GPU time**: the case is captured once as a CUDA graph and replayed; each
  replay is timed with a pair of CUDA events (median, p20, p80). The replays
  are queued behind a GPU sleep so that host launch cost cannot open gaps
  between them, and L2 is flushed (by reading a buffer twice its size) before
  each replay, as the LLM layers around the IPN would. A case that cannot be
  captured (a host sync inside) is timed with events around each eager call
  instead, and says so in ``timing``.
- **wall time per eager call**: pytest-benchmark's own measurement
  (``benchmark.pedantic``): a round queues ``iterations`` calls and
  synchronizes once at its end, inside the timed region, so a call costs its
  launches or its GPU time, whichever is longer.

On the CPU there is only the wall time. The physical floor of a case is
``max(bytes / copy bandwidth, flops / matmul peak)``, both ceilings measured
in the same run (``measure_ceilings``).

Summary rows
------------
Any benchmark gets a row in the end-of-run summary (benchmarks/conftest.py)
by putting these keys into ``benchmark.extra_info`` (``record`` does it):

====================  ======================================================
suite, case           required: e.g. ``"ipn"``, ``"forward"``
provider              required: e.g. ``"reference-eager"``, ``"triton"``
baseline              ``"eager"`` or ``"compile"`` marks the row that the
                      other providers of the same suite/case/shape are
                      compared against (``x_eager``, ``x_compile``)
shape, config, batch  the shape label, the label without the batch size,
                      and B (the plot's x-axis sweeps B within a config)
dtype, device         e.g. ``"bf16"``, ``"NVIDIA H100 80GB HBM3"``
gpu_median_us,        GPU time per call (graph replay); absent on the CPU
gpu_p20_us,
gpu_p80_us
wall_us               wall time per eager call; when absent, the
                      pytest-benchmark median is taken
bytes, flops          the case's cost model; ``record`` (or else the
                      summary) derives median_us, floor_us, pct_of_floor,
                      tbps and tflops from them and the measured ceilings
peak_mem_mb           peak memory one eager call allocates beyond its inputs
timing                how the GPU time was taken
throughput,           an extra figure such as generated tokens per second
throughput_unit
resolved, note        the backend(s) actually run; anything else to keep
====================  ======================================================

The summary's ``median_us`` is the GPU time where there is one, else the
wall time; ``pct_of_floor`` is ``100 * floor_us / median_us`` (100 = at the
floor). Test modules import this file as ``harness`` (benchmarks/conftest.py
puts benchmarks/ on ``sys.path``); ``run_case`` times a case and records it,
``record`` only records figures measured some other way.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch

PROVIDERS = ("reference-eager", "reference-compile", "triton", "triton-folded", "cuda", "auto")
# The lmeye_fast backend a provider runs: "triton-folded" is the Triton backend with the attention's
# folded schedule (lmeye_fast/ops/attend_folded.py), passed to its layers and ops by ``attention``.
BACKEND_OF = {"reference-eager": "reference", "reference-compile": "reference", "triton": "triton",
              "triton-folded": "triton", "cuda": "cuda", "auto": "auto"}
BASELINE_OF = {"reference-eager": "eager", "reference-compile": "compile"}

GPU_REPLAYS = 100
GPU_ROUND_S, GPU_ROUNDS = 0.01, 7
CPU_ROUND_S, CPU_ROUNDS = 0.02, 5
GPU_MAX_ITERATIONS, CPU_MAX_ITERATIONS = 200, 50


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def percentile(data: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    ordered = sorted(data)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# ---- ceilings -------------------------------------------------------------------------------


@dataclasses.dataclass
class Ceilings:
    """Copy bandwidth and matmul peak of this device, measured in this run (matmul per dtype, on demand)."""

    device: torch.device
    copy_bytes_per_s: float
    matmul_flops_per_s: Dict[str, float] = dataclasses.field(default_factory=dict)

    def matmul(self, dtype: torch.dtype) -> float:
        key = str(dtype).replace("torch.", "")
        if key not in self.matmul_flops_per_s:
            self.matmul_flops_per_s[key] = _measure_matmul(self.device, dtype)
        return self.matmul_flops_per_s[key]

    def floor_s(self, n_bytes: float, flops: float, dtype: torch.dtype) -> float:
        return max(n_bytes / self.copy_bytes_per_s, flops / self.matmul(dtype) if flops else 0.0)

    def as_dict(self) -> dict:
        return {"device": device_name(self.device), "copy_TBps": self.copy_bytes_per_s / 1e12,
                "matmul_TFLOPs": {k: v / 1e12 for k, v in self.matmul_flops_per_s.items()}}


def _best_seconds(fn: Callable[[], None], dev: torch.device, reps: int) -> float:
    """Shortest time of one call of ``fn`` over ``reps`` tries (a ceiling is the best the device does)."""
    fn()
    sync(dev)
    best = float("inf")
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def _measure_copy(dev: torch.device) -> float:
    n = (1 << 30) if dev.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), dev, reps=10)
    return 2 * n / seconds  # read once, written once


def _measure_matmul(dev: torch.device, dtype: torch.dtype) -> float:
    if dev.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # the reference accumulates in float32 there anyway
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b), dev, reps=10 if dev.type == "cuda" else 3)
    return 2 * n ** 3 / seconds


def measure_ceilings(dev: torch.device, dtypes: Iterable[torch.dtype] = ()) -> Ceilings:
    ceilings = Ceilings(dev, _measure_copy(dev))
    for dtype in dtypes:
        ceilings.matmul(dtype)
    release(dev)
    return ceilings


# ---- providers ------------------------------------------------------------------------------


def provider_status(provider: str, dev: torch.device, op: Optional[str] = None) -> Tuple[bool, str]:
    """Whether ``provider`` can run here (for ``op``, when the dispatch table is consulted), and why not."""
    from lmeye_fast import backends, ops

    if provider in ("reference-eager", "auto"):
        return True, ""
    if provider == "reference-compile":
        return True, ""
    if provider not in ("triton", "triton-folded", "cuda"):
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    backend = BACKEND_OF[provider]
    if dev.type != "cuda":
        why = " (the Triton CPU interpreter is for tests, not timing)" if backend == "triton" else ""
        return False, f"{provider} needs a CUDA device{why}"
    ok, reason = backends.status(backend)
    if not ok:
        return False, f"{provider} backend unavailable: {reason}"
    if op is not None and backend not in ops.TABLE[op]:
        return False, f"no {backend} kernel for {op} (the dispatch would run the reference)"
    if op is not None and provider == "triton-folded" and op != "attend_decomposed":
        return False, f"the folded schedule changes attend_decomposed only; {op} is the triton provider's"
    return True, ""


def attention(provider: str) -> str:
    """The attention schedule ``provider`` is timed with (``InteractiveLayer(attention=...)``, the
    ``schedule`` argument of ``attend_decomposed``): folded for "triton-folded", else the default."""
    return "folded" if provider == "triton-folded" else "auto"


def require(provider: str, dev: torch.device, op: Optional[str] = None) -> None:
    ok, reason = provider_status(provider, dev, op)
    if not ok:
        pytest.skip(reason)


def require_compile(shape, case: str) -> None:
    if not shape.compiles(case):
        pytest.skip("torch.compile runs only on the shapes the set names for it "
                    "(a compilation per case; see compile_cases in benchmarks/shapes.py)")


def compile_fn(fn: Callable) -> Callable:
    """``torch.compile`` (mode="default"); it compiles at the first call, in ``warm_up``,
    where a failure skips the case with its reason."""
    # Compiled code is cached per code object: without a reset, the cases of earlier shapes
    # would count towards dynamo's recompile limit and the later ones silently run eager.
    torch._dynamo.reset()
    return torch.compile(fn, mode="default")


# ---- timing ---------------------------------------------------------------------------------


def release(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(index: int) -> torch.Tensor:
    size = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or (64 << 20)
    return torch.zeros(2 * size // 4, dtype=torch.float32, device=torch.device("cuda", index))


def _queue_ahead(replays: int) -> None:
    """Hold the GPU while the host queues ``replays`` timed replays, so launch cost leaves no gaps."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        # 100 us per replay at up to 2 GHz: several times the host's work to queue one.
        sleep(int(replays * 100e-6 * 2e9))


def _capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def gpu_time(fn: Callable[[], object], replays: int = GPU_REPLAYS, capture: bool = True,
             flush_l2: bool = True) -> dict:
    """GPU time per call in microseconds (median, p20, p80) and how it was taken."""
    dev = torch.device("cuda", torch.cuda.current_device())
    sync(dev)
    graph, method = None, "CUDA graph replay, CUDA events per replay"
    if capture:
        try:
            graph = _capture(fn)
        except Exception as exc:  # a host sync or an uncapturable op inside the case
            sync(dev)
            method = f"CUDA events per eager call (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
    else:
        method = "CUDA events per eager call (not capturable: host sync inside)"
    run = graph.replay if graph is not None else fn
    flush = _l2_flush_buffer(dev.index) if flush_l2 else None
    if flush is not None:
        method += ", L2 flushed before each"
    run()
    sync(dev)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    _queue_ahead(replays)
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.sum()
        start.record()
        run()
        end.record()
    sync(dev)
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    del graph
    return {"gpu_median_us": percentile(times, 50), "gpu_p20_us": percentile(times, 20),
            "gpu_p80_us": percentile(times, 80), "timing": method}


def peak_memory_mb(fn: Callable[[], object], dev: torch.device) -> Optional[float]:
    """Memory one call allocates beyond what was allocated before it (its temporaries and outputs)."""
    if dev.type != "cuda":
        return None
    sync(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del out
    return peak / 2 ** 20


def wall_time(benchmark, fn: Callable[[], object], dev: torch.device) -> Optional[float]:
    """Wall time per eager call (us), measured by pytest-benchmark; None when benchmarking is disabled."""
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    sync(dev)
    per_call = max((time.perf_counter() - t0) / 3, 1e-7)
    if dev.type == "cuda":
        round_s, rounds, most = GPU_ROUND_S, GPU_ROUNDS, GPU_MAX_ITERATIONS
    else:
        round_s, rounds, most = CPU_ROUND_S, CPU_ROUNDS, CPU_MAX_ITERATIONS
    iterations = max(1, min(most, int(round_s / per_call)))
    calls = [0]

    def target():
        # The sync closes each round of `iterations` queued calls, inside the timed region.
        fn()
        calls[0] += 1
        if calls[0] % iterations == 0:
            sync(dev)

    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=1)
    sync(dev)
    if benchmark.disabled or benchmark.stats is None:
        return None
    return benchmark.stats.stats.median * 1e6


def warm_up(fn: Callable[[], object], provider: str, dev: torch.device) -> None:
    """Two calls (compilation, autotuning, lazy init); a torch.compile failure skips the case with its reason."""
    try:
        fn()
        fn()
        sync(dev)
    except Exception as exc:
        if provider == "reference-compile":
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:200]}")
        raise


def run_case(benchmark, ceilings: Ceilings, fn: Callable[[], object], *, suite: str, case: str, provider: str,
             shape, n_bytes: int, flops: int, capture: bool = True, **keys) -> None:
    """Warm up, then time ``fn`` both ways, and record the case (``record``).

    ``shape`` needs ``label``, ``config``, ``B`` and ``dtype`` (a ``shapes.Shape`` has them);
    ``capture=False`` for a case with a host sync inside; ``keys`` go to extra_info as they are.
    """
    dev = ceilings.device
    warm_up(fn, provider, dev)
    peak = peak_memory_mb(fn, dev)
    gpu = gpu_time(fn, capture=capture) if dev.type == "cuda" and not benchmark.disabled else {}
    wall = wall_time(benchmark, fn, dev)
    record(benchmark, suite=suite, case=case, provider=provider, shape=shape.label, config=shape.config,
           batch=shape.B, dtype=_dtype_name(shape.dtype), device=device_name(dev), n_bytes=n_bytes, flops=flops,
           ceilings=ceilings, wall_us=wall, peak_mem_mb=peak, **gpu, **keys)
    release(dev)


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def record(benchmark, *, suite: str, case: str, provider: str, n_bytes: Optional[int] = None,
           flops: Optional[int] = None, ceilings: Optional[Ceilings] = None, dtype: Optional[str] = None,
           **keys) -> None:
    """Put the standard keys (module docstring) into ``benchmark.extra_info``, with the floor,
    % of floor, TB/s and TFLOP/s derived from the costs and the ceilings when they are known."""
    info = {"suite": suite, "case": case, "provider": provider, "dtype": dtype,
            "baseline": BASELINE_OF.get(provider)}
    info.update({k: v for k, v in keys.items() if v is not None})
    if n_bytes is not None:
        info["bytes"] = int(n_bytes)
    if flops is not None:
        info["flops"] = int(flops)
    derive(info, ceilings)
    benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})


def _torch_dtype(name: Optional[str]) -> torch.dtype:
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    return by_name.get(name or "", torch.float32)


def derive(info: dict, ceilings: Optional[Ceilings]) -> None:
    """Fill ``median_us`` (GPU time, else wall time), ``floor_us``, ``pct_of_floor``, ``tbps``, ``tflops``."""
    median = info.get("gpu_median_us", info.get("wall_us"))
    if median is None:
        return
    info["median_us"] = median
    if info.get("floor_us") is None and ceilings is not None and info.get("bytes") is not None:
        dtype = _torch_dtype(info.get("dtype"))
        info["floor_us"] = ceilings.floor_s(info["bytes"], info.get("flops") or 0, dtype) * 1e6
    if info.get("floor_us") is not None:
        info["pct_of_floor"] = 100.0 * info["floor_us"] / median
    if info.get("bytes") is not None:
        info["tbps"] = info["bytes"] / (median * 1e-6) / 1e12
    if info.get("flops"):
        info["tflops"] = info["flops"] / (median * 1e-6) / 1e12


# ---- summary --------------------------------------------------------------------------------


def summary_row(info: dict, stats_median_s: Optional[float], ceilings: Optional[Ceilings]) -> Optional[dict]:
    """One summary row from a benchmark's extra_info, or None when it lacks the required keys."""
    if not all(info.get(k) for k in ("suite", "case", "provider")):
        return None
    row = dict(info)
    if row.get("wall_us") is None and stats_median_s is not None:
        row["wall_us"] = stats_median_s * 1e6
    derive(row, ceilings)
    return row if "median_us" in row else None


def add_speedups(rows: List[dict]) -> List[dict]:
    """``x_eager`` / ``x_compile`` (and their wall-time twins) against the baseline rows of each group."""
    def key(row):
        return row["suite"], row["case"], row.get("shape")

    base = {}
    for row in rows:
        if row.get("baseline") in ("eager", "compile"):
            base[key(row) + (row["baseline"],)] = row
    for row in rows:
        for kind in ("eager", "compile"):
            ref = base.get(key(row) + (kind,))
            if ref is None:
                continue
            row[f"x_{kind}"] = ref["median_us"] / row["median_us"]
            if ref.get("wall_us") and row.get("wall_us"):
                row[f"x_{kind}_wall"] = ref["wall_us"] / row["wall_us"]
    return rows


COLUMNS = (
    ("suite/case", lambda r: f"{r['suite']}/{r['case']}"),
    ("shape", lambda r: r.get("shape", "")),
    ("provider", lambda r: r["provider"]),
    ("median us", lambda r: _num(r.get("median_us"))),
    ("p20-p80 us", lambda r: f"{_num(r['gpu_p20_us'])}-{_num(r['gpu_p80_us'])}" if "gpu_p20_us" in r else ""),
    ("wall us", lambda r: _num(r.get("wall_us"))),
    ("x eager", lambda r: _num(r.get("x_eager"))),
    ("x compile", lambda r: _num(r.get("x_compile"))),
    ("x eager wall", lambda r: _num(r.get("x_eager_wall"))),
    ("% floor", lambda r: _num(r.get("pct_of_floor"))),
    ("TB/s", lambda r: _num(r.get("tbps"))),
    ("TFLOP/s", lambda r: _num(r.get("tflops"))),
    ("peak MB", lambda r: _num(r.get("peak_mem_mb"))),
    ("other", lambda r: f"{_num(r['throughput'])} {r.get('throughput_unit', '')}" if "throughput" in r else ""),
)


def _num(value) -> str:
    """Three significant figures, without exponents for the usual magnitudes."""
    if value is None:
        return ""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.3g}"
    return f"{value:.2g}" if magnitude >= 1e-3 else f"{value:.1e}"


def meta_lines(meta: Optional[dict]) -> List[str]:
    """The run's device, versions, commit and date, and the ceilings it measured."""
    if not meta:
        return []
    lines = [" | ".join(f"{k}: {v}" for k, v in meta.items() if k != "ceilings")]
    if meta.get("ceilings"):
        c = meta["ceilings"]
        peaks = ", ".join(f"{k} {_num(v)}" for k, v in c.get("matmul_TFLOPs", {}).items())
        lines.append(f"ceilings measured in this run: copy {_num(c['copy_TBps'])} TB/s; matmul TFLOP/s: {peaks}")
    return lines


def format_table(rows: List[dict], meta: Optional[dict] = None) -> str:
    """The summary as a plain-text table, one row per shape x provider."""
    cells = [[name for name, _ in COLUMNS]] + [[get(r) for _, get in COLUMNS] for r in rows]
    return "\n".join(meta_lines(meta) + aligned(cells, labels=3))


def aligned(cells: List[List[str]], labels: int) -> List[str]:
    """A header row and data rows as text columns: the first ``labels`` left-aligned, the numbers right-aligned."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for i, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(w) if j < labels else cell.rjust(w)
                               for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# ---- the schedules summary ------------------------------------------------------------------
# The end-to-end comparison a user comes for (benchmarks/test_bench_schedules.py), printed first.

STATIC_ONLY, TWO_PASS, SINGLE_PASS = "static-only", "lmeye-two-pass", "lmeye-single-pass"
SCHEDULE_PROVIDERS = (STATIC_ONLY, TWO_PASS, SINGLE_PASS)
IPN_SHARE = ("ipn-share", "ipn-forward-backward")
# The schedules suite's cases in the summary's order, with what each one times.
SCHEDULE_CASES = {"prefill": "prefill", "train-step": "train step, prefix trainable",
                  "train-step-frozen-prefix": "train step, prefix frozen", "generate": "generate"}
# The encoder-decoder rows (LMEyeSeq2SeqModel, their own shape): the schedule's two encoder passes and
# one decoder pass against two full encoder-decoder passes, and the cases they time.
SEQ2SEQ_NAIVE, SEQ2SEQ = "seq2seq-two-full-passes", "seq2seq-two-encoder-passes"
SEQ2SEQ_PROVIDERS = (SEQ2SEQ_NAIVE, SEQ2SEQ)
SEQ2SEQ_CASES = {"prefill": "prefill", "train-step": "train step, adapter trainable"}
NO_GPU_LINE = ("no CUDA GPU here: kernel timings need one (the triton and cuda providers skip, auto runs the "
               "PyTorch reference); recorded GPU runs are in benchmarks/RESULTS.md")


def _schedule_groups(rows: List[dict]) -> Dict[str, Dict[Tuple[str, str], dict]]:
    """{shape: {(case, provider): row}} of the schedules suite's rows, shapes in the order they ran."""
    groups: Dict[str, Dict[Tuple[str, str], dict]] = {}
    for row in rows:
        if row["suite"] == "schedules":
            groups.setdefault(row.get("shape", ""), {})[(row["case"], row["provider"])] = row
    return groups


def add_schedule_ratios(rows: List[dict]) -> List[dict]:
    """On each single-pass row, ``speedup_vs_two_pass`` (two-pass time / single-pass time) and
    ``ratio_to_static_only``; on the IPN's own row, its share of the single-pass training step; on
    each encoder-decoder schedule row, ``speedup_vs_two_full_passes``."""
    for by_key in _schedule_groups(rows).values():
        for case in SEQ2SEQ_CASES:
            ours, naive = by_key.get((case, SEQ2SEQ)), by_key.get((case, SEQ2SEQ_NAIVE))
            if ours is not None and naive is not None:
                ours["speedup_vs_two_full_passes"] = naive["median_us"] / ours["median_us"]
        for case in SCHEDULE_CASES:
            single = by_key.get((case, SINGLE_PASS))
            if single is None:
                continue
            for name, other, ratio in (("speedup_vs_two_pass", TWO_PASS, lambda o, s: o / s),
                                       ("ratio_to_static_only", STATIC_ONLY, lambda o, s: s / o)):
                if (case, other) in by_key:
                    single[name] = ratio(by_key[(case, other)]["median_us"], single["median_us"])
        ipn, step = by_key.get(IPN_SHARE), by_key.get(("train-step", SINGLE_PASS))
        if ipn is not None and step is not None:
            ipn["share_of_single_pass_step_pct"] = 100.0 * ipn["median_us"] / step["median_us"]
    return rows


def _duration(us: float) -> str:
    if us >= 1e6:
        return f"{_num(us / 1e6)} s"
    return f"{_num(us / 1e3)} ms" if us >= 1e3 else f"{_num(us)} us"


def _peak_memory(by_key: Dict[Tuple[str, str], dict], labels: Dict[str, str]) -> List[str]:
    peaks = [f"{labels[case]}, {provider}: {_num(row['peak_mem_mb'])} MB"
             for (case, provider), row in by_key.items() if row.get("peak_mem_mb") is not None]
    return ["peak memory beyond the inputs: " + "; ".join(peaks)] if peaks else []


def _seq2seq_table(shape: str, by_key: Dict[Tuple[str, str], dict]) -> List[str]:
    first = next(iter(by_key.values()))
    lines = [f"LMEye on an encoder-decoder LLM, two encoder passes + one decoder pass against two full "
             f"encoder-decoder passes: {shape}, {first.get('dtype', '')}, {first.get('device', '')}; "
             "median time per call"]
    cells = [["case", *SEQ2SEQ_PROVIDERS, "speed-up"]]
    for case, label in SEQ2SEQ_CASES.items():
        if not any((case, p) in by_key for p in SEQ2SEQ_PROVIDERS):
            continue
        times = [_duration(by_key[(case, p)]["median_us"]) if (case, p) in by_key else "-" for p in SEQ2SEQ_PROVIDERS]
        speedup = by_key.get((case, SEQ2SEQ), {}).get("speedup_vs_two_full_passes")
        cells.append([label, *times, f"{speedup:.2f}x" if speedup else "-"])
    lines += aligned(cells, labels=1)
    return lines + _peak_memory(by_key, SEQ2SEQ_CASES)


def format_schedules(rows: List[dict]) -> List[str]:
    """Single pass against two passes and against static-only, one table per shape, and the
    encoder-decoder schedule against two full passes for its own shape; no lines without schedules
    rows. Times are medians per call; generation is also given in tokens/s."""
    lines: List[str] = []
    for shape, by_key in _schedule_groups(add_schedule_ratios(rows)).items():
        if any(provider in SEQ2SEQ_PROVIDERS for _, provider in by_key):
            lines += _seq2seq_table(shape, by_key)
            continue
        first = next(iter(by_key.values()))
        lines.append(f"LMEye schedules, single pass against two passes and static-only: {shape}, "
                     f"{first.get('dtype', '')}, {first.get('device', '')}; median time per call")
        cells = [["case", *SCHEDULE_PROVIDERS, "single vs two-pass", "single / static-only"]]
        for case, label in SCHEDULE_CASES.items():
            if not any((case, p) in by_key for p in SCHEDULE_PROVIDERS):
                continue
            times = []
            for provider in SCHEDULE_PROVIDERS:
                row = by_key.get((case, provider))
                if row is None:
                    times.append("-")
                elif "throughput" in row:
                    times.append(f"{_duration(row['median_us'])} ({_num(row['throughput'])} "
                                 f"{row.get('throughput_unit', '')})")
                else:
                    times.append(_duration(row["median_us"]))
            single = by_key.get((case, SINGLE_PASS), {})
            speedup, ratio = single.get("speedup_vs_two_pass"), single.get("ratio_to_static_only")
            if case == "generate" and "new_tokens" in single:
                label = f"{label} {single['new_tokens']} tokens"
            cells.append([label, *times, f"{speedup:.2f}x" if speedup else "-", f"{ratio:.2f}" if ratio else "-"])
        lines += aligned(cells, labels=1)
        ipn = by_key.get(IPN_SHARE)
        if ipn is not None:
            share = ipn.get("share_of_single_pass_step_pct")
            lines.append(f"the IPN's own forward+backward: {_duration(ipn['median_us'])}"
                         + (f", {share:.1f}% of the single-pass train step" if share is not None else ""))
        lines += _peak_memory(by_key, SCHEDULE_CASES)
    return lines


def format_summary(rows: List[dict], meta: Optional[dict] = None) -> str:
    """What the main job prints last: the schedules first, then (after a line saying that kernel
    timings need a GPU, on a machine without one) the table of every other suite."""
    lines = format_schedules(rows)
    if meta and meta.get("device") == "cpu":
        lines.append(NO_GPU_LINE)
    kernel_rows = [r for r in rows if r["suite"] != "schedules"]
    if lines:
        lines.append("")
    lines.append(format_table(kernel_rows, meta) if kernel_rows else "\n".join(meta_lines(meta)))
    return "\n".join(lines)


def check_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """A sanity check that a provider computes the benchmarked thing (tests/ hold the real parity tests)."""
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(out.dtype, 5e-3)  # float32: room for TF32 dots
    err = (out.float() - ref.float()).abs().max()
    scale = ref.float().abs().max().clamp_min(1e-6)
    assert bool(err <= tol * scale), (f"{what}: max |out - reference| = {float(err):.3g} "
                                      f"exceeds {tol} x max |reference| = {tol * float(scale):.3g}")
