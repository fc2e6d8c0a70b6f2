"""The benchmark shape table: real LMEye configurations, and the sets that run them.

A configuration is one frozen vision encoder beside one frozen LLM:

=================  =====================================================
vision             CLIP ViT-L/14 at 224 px: 257 tokens (256 patches +
                   CLS) x 1024; at 336 px: 577 tokens x 1024
LLM width D        2048 (1-3B class, e.g. OPT-1.3B), 4096 (7B: LLaMA /
                   Vicuna-7B), 5120 (13B: LLaMA / Vicuna-13B)
IPN                Di = 768, H = 12, S = 1, R in {1, 5, 16}
batch B            1, 8, 32, 64; sequence T = 512; bfloat16
=================  =====================================================

Sets (``--shape-set``, or ``LMEYE_BENCH_SET``; default ``gpu`` when a CUDA
device is present, else ``cpu``):

- ``gpu``: the 7B / ViT-L-224 configuration swept over B (IPN forward and
  forward+backward), plus the other LLM widths, the 336 px encoder and
  R = 1 / 16 at B = 32 (forward); torch.compile at B = 32 only. Sized so
  that the whole suite fits the few minutes of scripts/gpu_check.sh.
- ``cpu``: small float32 shapes that run every kernel suite on a laptop in
  about a minute (timings there say nothing about a GPU); the schedules
  suite's CPU case is its own (benchmarks/test_bench_schedules.py).
- ``full``: every combination of the table, every case compiled (long).

Every ``Shape`` also carries the cost model of each benchmarked case: the
bytes that must cross memory at least once and the flops that must be done,
from which the harness derives the physical floor.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Dict, FrozenSet, List, Tuple

import torch

VISION = {"ViT-L/14-224": (257, 1024), "ViT-L/14-336": (577, 1024)}
LLM_WIDTHS = {"1-3B": 2048, "7B": 4096, "13B": 5120}
BATCHES = (1, 8, 32, 64)
REQUESTS = (1, 5, 16)
SEQUENCE = 512
INTERACTION_DIM, HEADS, SUB_FEATURES = 768, 12, 1

FORWARD, FORWARD_BACKWARD = "forward", "forward+backward"
OPS = ("request", "attend_decomposed", "transmit_interleave", "interleave")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmarked configuration.

    ``compile_cases`` names the cases (IPN ``forward`` / ``forward+backward``,
    or an op) that also run under torch.compile, which costs a compilation per
    case; ``backward`` says whether the IPN suite also times forward+backward.
    """

    name: str
    B: int
    T: int
    D: int
    Dv: int
    N: int
    Di: int
    R: int
    H: int
    S: int
    dtype: torch.dtype
    compile_cases: FrozenSet[str] = frozenset()
    backward: bool = True

    @property
    def config(self) -> str:
        """The label without the batch size: the x-axis of the plot sweeps B within one config."""
        return f"{self.name} D{self.D} N{self.N} R{self.R} {dtype_name(self.dtype)}"

    @property
    def label(self) -> str:
        return f"{self.config} B{self.B}"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def compiles(self, case: str) -> bool:
        return case in self.compile_cases

    # ---- cost model: minimum bytes moved and flops done per case --------------------------
    # Bytes count each operand read once and each result written once at the storage
    # dtype; a gathered row or a slot row counts, the rest of its sequence does not.

    def op_cost(self, op: str) -> Tuple[int, int]:
        B, T, D, Dv, N, Di, R, S, e = self.B, self.T, self.D, self.Dv, self.N, self.Di, self.R, self.S, self.itemsize
        if op == "request":
            moved = B * D + R * Di * D + R * Di + B * R * Di
            return moved * e + B * 8, 2 * B * D * R * Di
        if op == "attend_decomposed":
            moved = B * N * Dv + S * Di * Dv + S * Di + 2 * B * R * Di
            return moved * e, self.attention_flops(backward=False)
        if op == "transmit_interleave":
            moved = B * R * Di + D * Di + D + R * D + 2 * B * R * D
            return moved * e + B * R * 8, 2 * B * R * Di * D
        if op == "interleave":
            return 3 * B * R * D * e + B * R * 8, B * R * D
        if op == "plan_slots":
            # int64 token ids in; int64 request and slot positions and an int32 status out.
            return B * T * 8 + B * 8 + B * R * 8 + B * 4, 0
        raise ValueError(f"op: expected one of {OPS + ('plan_slots',)}, got {op!r}")

    def attention_flops(self, backward: bool) -> int:
        """Decomposition + attention, by the cheaper of the two ways to compute them: forming
        F = X W_fᵀ (split) or never forming it, the requests pulled through W_f into the vision
        width (folded, lmeye_fast/ops/attend_folded.py: 5x fewer at the 7B shape). The backward
        leaves the image without a gradient (a frozen vision encoder)."""
        B, Dv, N, Di, R, H, S = self.B, self.Dv, self.N, self.Di, self.R, self.H, self.S
        if backward:
            split = 2 * B * N * Dv * S * Di + 8 * B * R * N * S * Di      # d W_f; d r, d F
            folded = 8 * B * R * S * Di * Dv + 4 * B * H * R * S * N * Dv  # d U, d r, d W_f; d A, d Q
        else:
            split = 2 * B * N * Dv * S * Di + 4 * B * R * N * S * Di      # F; scores, A F
            folded = 4 * B * R * S * Di * Dv + 4 * B * H * R * S * N * Dv  # Q, z; scores, U = A X
        return min(split, folded)

    def ipn_cost(self, case: str) -> Tuple[int, int]:
        """The whole IPN, fused: what the forward (and backward) cannot avoid moving and computing.

        The backward produces gradients for every parameter and for the hidden
        states (a trainable prefix); image features and embeddings are frozen.
        """
        moved = flops = 0
        for op in ("request", "attend_decomposed", "transmit_interleave"):
            b, f = self.op_cost(op)
            moved, flops = moved + b, flops + f
        # Fused, r and z never reach memory: drop their write and re-read.
        moved -= 2 * 2 * self.B * self.R * self.Di * self.itemsize
        if case == FORWARD:
            return moved, flops
        if case != FORWARD_BACKWARD:
            raise ValueError(f"case: expected {FORWARD!r} or {FORWARD_BACKWARD!r}, got {case!r}")
        B, T, D, Dv, N, Di, R, S, e = self.B, self.T, self.D, self.Dv, self.N, self.Di, self.R, self.S, self.itemsize
        params = R * Di * D + R * Di + S * Di * Dv + S * Di + D * Di + D + R * D
        # Re-read the two weights the input gradients need and the image for dW_f, read the
        # slot rows of the output gradient, write every parameter gradient and dh (B, T, D).
        back_bytes = (R * Di * D + D * Di + B * N * Dv + B * R * D + params + B * T * D) * e
        back_flops = (2 * B * D * R * Di * 2           # dW_q, dh
                      + self.attention_flops(backward=True)
                      + 2 * B * R * Di * D * 2)         # dW_o, dz
        return moved + back_bytes, flops + back_flops


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def _shape(llm: str, vision: str, B: int, R: int = 5, dtype=torch.bfloat16, compile_cases=(), **overrides) -> Shape:
    N, Dv = VISION[vision]
    fields = dict(name=f"{llm}/{vision}", B=B, T=SEQUENCE, D=LLM_WIDTHS[llm], Dv=Dv, N=N, Di=INTERACTION_DIM,
                  R=R, H=HEADS, S=SUB_FEATURES, dtype=dtype, compile_cases=frozenset(compile_cases))
    fields.update(overrides)
    return Shape(**fields)


def _small(B: int, T: int = 128, compile_cases=()) -> Shape:
    """Laptop-sized float32 stand-in for the 7B configuration (same structure, widths / 8)."""
    return Shape(name="small", B=B, T=T, D=512, Dv=128, N=65, Di=96, R=5, H=4, S=1, dtype=torch.float32,
                 compile_cases=frozenset(compile_cases))


BOTH = (FORWARD, FORWARD_BACKWARD)


def _gpu_ipn() -> List[Shape]:
    # One compilation costs tens of seconds on a cold machine: compile at B = 32 only.
    sweep = [_shape("7B", "ViT-L/14-224", B, compile_cases=BOTH if B == 32 else ()) for B in BATCHES]
    # The other configurations at B = 32, forward only, to keep the GPU run within its minutes.
    widths = [_shape(llm, "ViT-L/14-224", 32, backward=False) for llm in ("1-3B", "13B")]
    others = [_shape("7B", "ViT-L/14-336", 32, backward=False)]
    requests = [_shape("7B", "ViT-L/14-224", 32, R=r, backward=False) for r in (1, 16)]
    return sweep + widths + others + requests


def _full_ipn() -> List[Shape]:
    return [_shape(llm, vision, B, R=r, compile_cases=BOTH)
            for llm, vision, B, r in itertools.product(LLM_WIDTHS, VISION, BATCHES, REQUESTS)]


SETS: Dict[str, Dict[str, List[Shape]]] = {
    "gpu": {
        "ipn": _gpu_ipn(),
        "ops": [_shape("7B", "ViT-L/14-224", B, compile_cases=OPS if B == 32 else ()) for B in BATCHES],
        "interleave": [_shape("7B", "ViT-L/14-224", B) for B in BATCHES]
        # The static mapping writes one row per image token through the same interleave.
        + [_shape("7B", "ViT-L/14-224", 32, R=257, name="7B/static-map")],
        "planner": [_shape("7B", "ViT-L/14-224", 32, T=2048)],
    },
    "cpu": {
        "ipn": [_small(B, compile_cases=(FORWARD,) if B == 8 else ()) for B in (1, 8, 32, 64)],
        "ops": [_small(B) for B in (1, 8, 32)],
        "interleave": [_small(B) for B in (1, 8, 32, 64)],
        "planner": [_small(32, T=2048)],
    },
    "full": {
        "ipn": _full_ipn(),
        "ops": [_shape(llm, vision, B, R=r, compile_cases=OPS)
                for llm, vision, B, r in itertools.product(LLM_WIDTHS, VISION, BATCHES, REQUESTS)],
        "interleave": [_shape(llm, "ViT-L/14-224", B, R=r)
                       for llm, B, r in itertools.product(LLM_WIDTHS, BATCHES, REQUESTS + (257,))],
        "planner": [_shape("7B", "ViT-L/14-224", B, T=2048) for B in BATCHES],
    },
}


def default_set() -> str:
    chosen = os.environ.get("LMEYE_BENCH_SET") or ("gpu" if torch.cuda.is_available() else "cpu")
    if chosen not in SETS:
        raise ValueError(f"LMEYE_BENCH_SET: expected one of {tuple(SETS)}, got {chosen!r}")
    return chosen
