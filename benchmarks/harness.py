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

Cases that compare providers of one computation against each other (the
schedules suite) time them together instead, in interleaved rounds
(``time_interleaved``): each round runs every provider once, the order
rotating by one each round, so that a load that comes and goes falls on all of
them alike; a ratio between two providers is the median over rounds of the
ratio within a round, with its p20 and p80 (``Ratio``). On the CPU each call
also gets the process's CPU time, and the rounds run on one thread
(``CPU_ROUND_THREADS``).

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
cpu_us                process CPU time per call (interleaved rounds, CPU)
rounds_wall_us,       the times of each round (interleaved rounds): item i
rounds_cpu_us         of every provider of a case is from the same round
threads, load_avg,    the CPU threads the rounds ran on, the 1/5/15-minute
cores                 load average as they ended, and the machine's cores
bytes, flops          the case's cost model; ``record`` (or else the
                      summary) derives median_us, floor_us, pct_of_floor,
                      tbps and tflops from them and the measured ceilings
peak_mem_mb           peak memory one eager call allocates beyond its inputs
timing                how the GPU time was taken
throughput,           an extra figure such as generated tokens per second
throughput_unit
resolved, note        the backend(s) actually run; anything else to keep
====================  ======================================================

A benchmark that times several providers together puts one such dict per
provider into ``benchmark.extra_info["rows"]`` (``record_rows``).

The summary's ``median_us`` is the GPU time where there is one, else the
wall time; ``pct_of_floor`` is ``100 * floor_us / median_us`` (100 = at the
floor). Test modules import this file as ``harness`` (benchmarks/conftest.py
puts benchmarks/ on ``sys.path``); ``run_case`` times a case and records it,
``record`` only records figures measured some other way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import math
import os
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


# ---- interleaved rounds ---------------------------------------------------------------------

# On the CPU the rounds run on one thread. With as many threads as cores, a competing process
# preempts one of them at every parallel op while the others spin at its barrier: the wall time
# then measures the scheduler, and the process CPU time counts the spinning. One thread's CPU time
# is its own work, whatever else runs.
CPU_ROUND_THREADS = 1


@dataclasses.dataclass(frozen=True)
class ProviderCall:
    """One provider of a case timed in interleaved rounds: ``run`` is the timed call (its result
    dropped), ``prepare`` puts the model into the provider's state before each call, untimed."""

    provider: str
    run: Callable[[], object]
    prepare: Optional[Callable[[], None]] = None


@dataclasses.dataclass(frozen=True)
class RoundTimes:
    """Seconds per call of each provider, round by round: item i of every list is from round i.
    ``cpu_s`` (process CPU time) and ``threads`` are empty on a GPU."""

    wall_s: Dict[str, List[float]]
    cpu_s: Dict[str, List[float]]
    threads: Optional[int]
    load_avg: Optional[Tuple[float, float, float]]

    def keys(self, provider: str) -> dict:
        """The provider's summary keys (module docstring): medians and per-round times in us."""
        keys = {"wall_us": percentile(self.wall_s[provider], 50) * 1e6,
                "rounds_wall_us": [t * 1e6 for t in self.wall_s[provider]],
                "threads": self.threads, "load_avg": self.load_avg, "cores": os.cpu_count()}
        if provider in self.cpu_s:
            keys["cpu_us"] = percentile(self.cpu_s[provider], 50) * 1e6
            keys["rounds_cpu_us"] = [t * 1e6 for t in self.cpu_s[provider]]
        return keys


def round_order(providers: Sequence[str], index: int) -> List[str]:
    """The order of round ``index``: ``providers`` rotated by one per round, so each comes first in turn."""
    shift = index % len(providers)
    return list(providers[shift:]) + list(providers[:shift])


def load_average() -> Optional[Tuple[float, float, float]]:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


@contextlib.contextmanager
def round_threads(dev: torch.device):
    """Run the rounds on ``CPU_ROUND_THREADS`` threads on the CPU (yields the count; None on a GPU)."""
    if dev.type != "cpu":
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_ROUND_THREADS)
    try:
        yield CPU_ROUND_THREADS
    finally:
        torch.set_num_threads(before)


def time_interleaved(benchmark, calls: Sequence[ProviderCall], dev: torch.device, rounds: int,
                     warmup: int) -> RoundTimes:
    """Time ``calls`` in ``rounds`` interleaved rounds after ``warmup`` untimed ones: each round runs
    every provider once, in ``round_order``; each call is synchronised inside its timed region.

    pytest-benchmark drives the rounds (its own figure is the time of a whole round); skips the
    test when benchmarking is disabled.
    """
    by_name = {call.provider: call for call in calls}
    if len(by_name) != len(calls):
        raise ValueError(f"calls: expected distinct providers, got {[c.provider for c in calls]}")
    on_cpu = dev.type == "cpu"
    measured: List[Dict[str, Tuple[float, float]]] = []

    def one_round():
        times = {}
        for name in round_order(list(by_name), len(measured)):
            call = by_name[name]
            if call.prepare is not None:
                call.prepare()
            sync(dev)
            # No collection inside a timed call: it would land on whichever provider triggers it.
            collecting = gc.isenabled()
            gc.disable()
            try:
                wall, cpu = time.perf_counter(), time.process_time()
                call.run()
                sync(dev)
                times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
            finally:
                if collecting:
                    gc.enable()
        measured.append(times)

    with round_threads(dev) as threads:
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if benchmark.disabled or benchmark.stats is None:
        pytest.skip("benchmarking is disabled (--benchmark-disable)")
    timed = measured[warmup:warmup + rounds]  # --benchmark-cprofile runs more rounds after these
    wall = {name: [r[name][0] for r in timed] for name in by_name}
    cpu = {name: [r[name][1] for r in timed] for name in by_name} if on_cpu else {}
    return RoundTimes(wall, cpu, threads, load_average())


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def row_info(*, suite: str, case: str, provider: str, n_bytes: Optional[int] = None, flops: Optional[int] = None,
             ceilings: Optional[Ceilings] = None, dtype: Optional[str] = None, **keys) -> dict:
    """The standard keys (module docstring) of one summary row, with the floor, % of floor, TB/s
    and TFLOP/s derived from the costs and the ceilings when they are known; no None values."""
    info = {"suite": suite, "case": case, "provider": provider, "dtype": dtype,
            "baseline": BASELINE_OF.get(provider)}
    info.update({k: v for k, v in keys.items() if v is not None})
    if n_bytes is not None:
        info["bytes"] = int(n_bytes)
    if flops is not None:
        info["flops"] = int(flops)
    derive(info, ceilings)
    return {k: v for k, v in info.items() if v is not None}


def record(benchmark, **keys) -> None:
    """Put one row's keys (``row_info``) into ``benchmark.extra_info``."""
    benchmark.extra_info.update(row_info(**keys))


def record_rows(benchmark, rows: Sequence[dict]) -> None:
    """Put several rows (``row_info`` dicts) into ``benchmark.extra_info["rows"]``: a benchmark
    that times several providers together."""
    benchmark.extra_info["rows"] = list(rows)


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


def summary_rows(extra_info: dict, stats_median_s: Optional[float], ceilings: Optional[Ceilings]) -> List[dict]:
    """The summary rows of one benchmark: those under ``rows`` (``record_rows``; each has its own
    times), else the one of the extra_info itself."""
    if "rows" in extra_info:
        found = [summary_row(dict(info), None, ceilings) for info in extra_info["rows"]]
    else:
        found = [summary_row(dict(extra_info), stats_median_s, ceilings)]
    return [row for row in found if row is not None]


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


# The clocks a schedules ratio can use, steadier first on a tie: the summary keys of the median
# per call and of the per-round times, and the clock's name.
@dataclasses.dataclass(frozen=True)
class Clock:
    name: str
    median_key: str
    rounds_key: str
    label: str


CLOCKS = (Clock("cpu", "cpu_us", "rounds_cpu_us", "process CPU time"),
          Clock("wall", "wall_us", "rounds_wall_us", "wall time"))
CLOCK_OF = {clock.name: clock for clock in CLOCKS}
# A ratio whose p20 or p80 lies further than this from its median is printed as noisy.
NOISY_SPREAD = 0.20


@dataclasses.dataclass(frozen=True)
class Ratio:
    """A ratio between two providers of a case: the median over rounds of the ratio within a round,
    and the p20 and p80 of those ratios."""

    median: float
    p20: float
    p80: float

    @classmethod
    def of_rounds(cls, numerator: Sequence[float], denominator: Sequence[float], scale: float = 1.0
                  ) -> Optional["Ratio"]:
        """None unless both have the same rounds, every one of them measured."""
        if not numerator or len(numerator) != len(denominator) or not all(t > 0 for t in denominator):
            return None
        within = [scale * a / b for a, b in zip(numerator, denominator)]
        return cls(percentile(within, 50), percentile(within, 20), percentile(within, 80))

    @property
    def spread(self) -> float:
        """How far p20 or p80 lies from the median, relative to it (0.1 = ±10%)."""
        return max(self.median - self.p20, self.p80 - self.median) / self.median

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


@dataclasses.dataclass(frozen=True)
class RatioSpec:
    """A ratio of a schedules group: ``numerator`` / ``denominator`` (x ``scale``), rows named by
    (case, provider), stored on row ``on`` under ``name`` (its p20 and p80 under ``name_p20``, ``name_p80``).
    ``picks_clock``: whether its spread counts when the group's clock is chosen (the schedules'
    comparisons do; the IPN's share, a call of a few ms beside one of seconds, does not)."""

    name: str
    on: Tuple[str, str]
    numerator: Tuple[str, str]
    denominator: Tuple[str, str]
    scale: float = 1.0
    picks_clock: bool = True


def schedule_groups(rows: List[dict]) -> Dict[str, Dict[Tuple[str, str], dict]]:
    """{shape: {(case, provider): row}} of the schedules suite's rows, shapes in the order they ran."""
    groups: Dict[str, Dict[Tuple[str, str], dict]] = {}
    for row in rows:
        if row["suite"] == "schedules":
            groups.setdefault(row.get("shape", ""), {})[(row["case"], row["provider"])] = row
    return groups


def _ratio_specs(by_key: Dict[Tuple[str, str], dict]) -> List[RatioSpec]:
    """The ratios whose rows are all there: the encoder-decoder schedule against two full passes;
    the single pass against two passes and against static-only; the IPN's share of the single-pass step."""
    specs = [RatioSpec("speedup_vs_two_full_passes", (case, SEQ2SEQ), (case, SEQ2SEQ_NAIVE), (case, SEQ2SEQ))
             for case in SEQ2SEQ_CASES]
    for case in SCHEDULE_CASES:
        single = (case, SINGLE_PASS)
        specs += [RatioSpec("speedup_vs_two_pass", single, (case, TWO_PASS), single),
                  RatioSpec("ratio_to_static_only", single, single, (case, STATIC_ONLY))]
    specs.append(RatioSpec("share_of_single_pass_step_pct", IPN_SHARE, IPN_SHARE, ("train-step", SINGLE_PASS), 100.0,
                           picks_clock=False))
    return [s for s in specs if all(key in by_key for key in (s.on, s.numerator, s.denominator))]


def add_schedule_ratios(rows: List[dict]) -> List[dict]:
    """Each schedules group's ratios (``_ratio_specs``) on the rows that carry them, from the rounds
    of the steadier clock: the one whose widest p20-p80 spread (of the ratios that pick the clock)
    is the smaller, CPU time on a tie. Every row of the group gets that ``clock`` and
    ``clock_spreads`` ({clock: widest spread})."""
    for by_key in schedule_groups(rows).values():
        specs = _ratio_specs(by_key)
        by_clock = {}
        for clock in CLOCKS:
            ratios = [Ratio.of_rounds(by_key[s.numerator].get(clock.rounds_key),
                                      by_key[s.denominator].get(clock.rounds_key), s.scale) for s in specs]
            if specs and all(r is not None for r in ratios):
                by_clock[clock.name] = ratios
        if not by_clock:
            continue
        widest = {name: max((r.spread for r, s in zip(ratios, specs) if s.picks_clock), default=0.0)
                  for name, ratios in by_clock.items()}
        chosen = min(widest, key=widest.get)
        for spec, ratio in zip(specs, by_clock[chosen]):
            row = by_key[spec.on]
            row[spec.name], row[f"{spec.name}_p20"], row[f"{spec.name}_p80"] = ratio.median, ratio.p20, ratio.p80
        for row in by_key.values():
            row["clock"], row["clock_spreads"] = chosen, widest
    return rows


def schedule_clock(row: dict) -> Clock:
    """The clock of a schedules row's group (``add_schedule_ratios``); without ratios, the first it has."""
    if row.get("clock") in CLOCK_OF:
        return CLOCK_OF[row["clock"]]
    return next((c for c in CLOCKS if row.get(c.median_key) is not None), CLOCK_OF["wall"])


def schedule_us(row: dict) -> float:
    """A schedules row's median per call on its group's clock, in us."""
    return row.get(schedule_clock(row).median_key, row["median_us"])


def duration_text(us: float) -> str:
    if us >= 1e6:
        return f"{_num(us / 1e6)} s"
    return f"{_num(us / 1e3)} ms" if us >= 1e3 else f"{_num(us)} us"


def ratio_text(row: dict, name: str, unit: str = "x", number: Callable[[float], str] = "{:.2f}".format) -> str:
    """``1.73x (1.70-1.78)``, marked ``noisy`` with the load average past ±NOISY_SPREAD; ``-`` if absent."""
    if row.get(name) is None:
        return "-"
    ratio = Ratio(row[name], row[f"{name}_p20"], row[f"{name}_p80"])
    text = f"{number(ratio.median)}{unit} ({number(ratio.p20)}-{number(ratio.p80)})"
    if ratio.noisy:
        text += " noisy" + (f", load {row['load_avg'][0]:.1f}" if row.get("load_avg") else "")
    return text


def _percent(value: float) -> str:
    """A share in percent: one decimal, two below 1% (a small IPN beside a large LLM)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _is_noisy(row: dict, name: str) -> bool:
    return row.get(name) is not None and Ratio(row[name], row[f"{name}_p20"], row[f"{name}_p80"]).noisy


def _header(title: str, shape: str, by_key: Dict[Tuple[str, str], dict]) -> str:
    """The table's title line: what it compares, the shape, and how the times and ratios were taken."""
    first = next(iter(by_key.values()))
    clock = schedule_clock(first)
    rounds = len(first.get(clock.rounds_key) or [])
    threads = first.get("threads")
    how = f"{rounds} interleaved rounds" if rounds else "one figure per provider"
    if threads:
        how += f" on {threads} thread" + ("s" if threads > 1 else "")
    line = (f"{title}: {shape}, {first.get('dtype', '')}, {first.get('device', '')}; {how}, median "
            f"{clock.label} per call")
    spreads = first.get("clock_spreads") or {}
    if spreads:
        line += "; each ratio the median over rounds of the ratio within a round (p20-p80)"
    if len(spreads) > 1:
        others = "; ".join(f"{CLOCK_OF[n].label} ±{100 * s:.0f}%" for n, s in spreads.items() if n != clock.name)
        line += (f", on {clock.label}, the steadier here (widest spread ±{100 * spreads[clock.name]:.0f}%; "
                 f"{others})")
    return line


def _noisy_note(by_key: Dict[Tuple[str, str], dict], names: Sequence[str]) -> List[str]:
    if not any(_is_noisy(row, name) for row in by_key.values() for name in names):
        return []
    cores = next((row["cores"] for row in by_key.values() if row.get("cores")), None)
    return [f"noisy: p20-p80 over the rounds wider than ±{100 * NOISY_SPREAD:.0f}% of the median; load: the "
            "1-minute load average as that case's rounds ended" + (f", on {cores} cores" if cores else "")
            + ". Rerun on an idle machine; benchmarks/schedules_under_load.py shows how load moves the ratios"]


def _peak_memory(by_key: Dict[Tuple[str, str], dict], labels: Dict[str, str]) -> List[str]:
    peaks = [f"{labels[case]}, {provider}: {_num(row['peak_mem_mb'])} MB"
             for (case, provider), row in by_key.items() if row.get("peak_mem_mb") is not None]
    return ["peak memory beyond the inputs: " + "; ".join(peaks)] if peaks else []


def _time_text(row: Optional[dict]) -> str:
    """The median per call on the group's clock, and the throughput at that time where there is one."""
    if row is None:
        return "-"
    us = schedule_us(row)
    if "throughput" not in row:
        return duration_text(us)
    throughput = row["throughput"] * row["wall_us"] / us  # recorded at the wall time
    return f"{duration_text(us)} ({_num(throughput)} {row.get('throughput_unit', '')})"


SEQ2SEQ_TITLE = ("LMEye on an encoder-decoder LLM, two encoder passes + one decoder pass against two full "
                 "encoder-decoder passes")
SCHEDULES_TITLE = "LMEye schedules, single pass against two passes and static-only"


def _seq2seq_table(shape: str, by_key: Dict[Tuple[str, str], dict]) -> List[str]:
    lines = [_header(SEQ2SEQ_TITLE, shape, by_key)]
    cells = [["case", *SEQ2SEQ_PROVIDERS, "speed-up"]]
    for case, label in SEQ2SEQ_CASES.items():
        if not any((case, p) in by_key for p in SEQ2SEQ_PROVIDERS):
            continue
        times = [_time_text(by_key.get((case, p))) for p in SEQ2SEQ_PROVIDERS]
        cells.append([label, *times, ratio_text(by_key.get((case, SEQ2SEQ), {}), "speedup_vs_two_full_passes")])
    lines += aligned(cells, labels=1)
    return lines + _noisy_note(by_key, ["speedup_vs_two_full_passes"]) + _peak_memory(by_key, SEQ2SEQ_CASES)


def format_schedules(rows: List[dict]) -> List[str]:
    """Single pass against two passes and against static-only, one table per shape, and the
    encoder-decoder schedule against two full passes for its own shape; no lines without schedules
    rows. Times are medians per call on the clock the ratios use; generation is also given in tokens/s."""
    lines: List[str] = []
    for shape, by_key in schedule_groups(add_schedule_ratios(rows)).items():
        if any(provider in SEQ2SEQ_PROVIDERS for _, provider in by_key):
            lines += _seq2seq_table(shape, by_key)
            continue
        lines.append(_header(SCHEDULES_TITLE, shape, by_key))
        cells = [["case", *SCHEDULE_PROVIDERS, "single vs two-pass", "single / static-only"]]
        for case, label in SCHEDULE_CASES.items():
            if not any((case, p) in by_key for p in SCHEDULE_PROVIDERS):
                continue
            times = [_time_text(by_key.get((case, provider))) for provider in SCHEDULE_PROVIDERS]
            single = by_key.get((case, SINGLE_PASS), {})
            if case == "generate" and "new_tokens" in single:
                label = f"{label} {single['new_tokens']} tokens"
            cells.append([label, *times, ratio_text(single, "speedup_vs_two_pass"),
                          ratio_text(single, "ratio_to_static_only", unit="")])
        lines += aligned(cells, labels=1)
        ipn = by_key.get(IPN_SHARE)
        if ipn is not None:
            share = ratio_text(ipn, "share_of_single_pass_step_pct", unit="%", number=_percent)
            lines.append(f"the IPN's own forward+backward: {duration_text(schedule_us(ipn))}"
                         + (f"; its share of the single-pass train step: {share}" if share != "-" else ""))
        lines += _noisy_note(by_key, ["speedup_vs_two_pass", "ratio_to_static_only", "share_of_single_pass_step_pct"])
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
