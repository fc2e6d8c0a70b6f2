"""Every Triton kernel the modules launch compiles to GPU code, here, without a GPU.

The interpreter that runs the other Triton tests on the CPU never lowers a kernel for a
GPU, so a kernel that only breaks in code generation would pass them all.
benchmarks/compile_kernels.py records the launches of a forward and backward of
InteractiveLayer and StaticVisualMapping with the launch configurations a GPU gets (the
7B widths, with 12 heads and with 1, 2, 4 and 16), and compiles each one ahead of time for
sm_90 (H100/H200), the architecture the benchmarks run on; here in bfloat16 (the dtype the GPU
tests and benchmarks use) and float32 (the exact-product path, DOT_FP32 and IEEE set). The
script fails where a launch would ask for more shared memory than one program may have (one
768-wide head once asked the attention kernels for 270 KB).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("_attend_fwd_kernel", "_attend_bwd_kernel", "_gemm_kernel", "_slots_kernel", "_expand_kernel",
           "_scores_kernel", "_weighted_kernel", "_reduce_kernel", "_image_grad_kernel", "_weight_grad_kernel")


@pytest.mark.slow
def test_every_launched_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "benchmarks/compile_kernels.py", "--arch", "90",
                          "--dtype", "bfloat16", "--dtype", "float32"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    for kernel in KERNELS:
        for dtype in ("bfloat16", "float32"):
            assert any(kernel in line and dtype in line and "regs" in line for line in report.splitlines()), \
                f"{kernel} ({dtype}) was not launched or not compiled:\n{report}"
