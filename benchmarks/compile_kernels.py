"""Compile every Triton kernel that InteractiveLayer and StaticVisualMapping launch, for real GPU
architectures, on any machine: no GPU needed.

The Triton interpreter that the CPU tests run never lowers a kernel to GPU code, so a kernel
that fails to compile, or spills registers, only shows on a GPU. This script runs a forward and
a backward of both modules in each dtype with the launches recorded (``launch_capture.py``, the
launch configurations a GPU gets), then compiles each distinct launch ahead of time for each
architecture and prints the registers per thread, spill traffic and shared memory that ptxas
reports.

    python benchmarks/compile_kernels.py                 # sm_90 (H100/H200) and sm_80 (A100)
    python benchmarks/compile_kernels.py --arch 90 --dtype bfloat16

Exit status 1 when a kernel fails to compile or asks for more shared memory than one program
may have. Shapes: the LMEye-7B configuration (D=4096, Dv=1024, Di=768, H=12, R=5, N=257) at a
small batch and sequence, which set every block size and flag that the 7B launches use, and the
same widths with 1, 2, 4 and 16 heads (``HEADS``).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from launch_capture import LAUNCHES, install  # first: before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
           torch.bool: "*i1", torch.int32: "*i32", torch.int64: "*i64"}
OPTIONS = ("num_warps", "num_stages")
# The most shared memory one program may take (the opt-in maximum per block): a kernel over it
# compiles, but its launch fails with "out of resource" on the GPU.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


# The 7B model's 12 heads, and head counts whose head width (Di/H = 768, 384, 192, 48) sets
# other tile widths in the attention kernels (heads over 64 wide take the folded schedule).
HEADS = (12, 1, 2, 4, 16)


def run_modules(dtype: torch.dtype, heads: int) -> None:
    """A forward and backward of InteractiveLayer (attention in both schedules, image mask, in
    place and not, the transmitted tokens; the shared transmission and the per-slot one of one
    request into five slots) and StaticVisualMapping, launches recorded."""
    for schedule in ("split", "folded"):
        run_layers(dtype, heads, schedule)
    run_layers(dtype, heads, "auto", num_requests=1, transmission="per_slot")


def run_layers(dtype: torch.dtype, heads: int, schedule: str, num_requests: int = 5,
               transmission: str = "shared") -> None:
    from lmeye_fast import InteractiveLayer, StaticVisualMapping

    batch, seq, llm, vision, tokens, width, requests = 2, 12, 4096, 1024, 257, 768, 5
    layer = InteractiveLayer(llm, vision, width, num_requests, 1, heads, backend="triton", attention=schedule,
                             dtype=dtype, num_slots=requests, transmission=transmission)
    mapping = StaticVisualMapping(vision, llm, backend="triton", dtype=dtype)
    hidden = torch.randn(batch, seq, llm, dtype=dtype, requires_grad=True)
    image = torch.randn(batch, tokens, vision, dtype=dtype, requires_grad=True)
    mask = torch.rand(batch, tokens) > 0.2
    slots = torch.arange(seq - requests, seq).expand(batch, requests).contiguous()
    request_pos = torch.full((batch,), seq - requests - 1)
    for inplace in (False, True):
        embeds = torch.randn(batch, seq, llm, dtype=dtype, requires_grad=True)
        target = embeds * 1 if inplace else embeds
        out = layer(hidden, image, target, slots, request_pos=request_pos, image_mask=mask, inplace=inplace)
        out.sum().backward()
    layer.transmitted(hidden, image, request_pos=request_pos).sum().backward()
    image_slots = torch.arange(tokens).expand(batch, tokens).contiguous()
    embeds = torch.randn(batch, tokens + 3, llm, dtype=dtype, requires_grad=True)
    mapping(image, embeds, image_slots).sum().backward()


def signature(kernel, args, kwargs):
    """(signature, constexprs, options) of one recorded launch, as ASTSource takes them."""
    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in OPTIONS if name in kwargs}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    sig, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr or value is None:
            sig[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            sig[param.name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            sig[param.name] = "i1"
        elif isinstance(value, int):
            sig[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name}: cannot type {type(value).__name__}")
    return sig, constexprs, options


def ptxas_report(ptx: str) -> str:
    """Registers, spills and stack of the compiled kernel, from ptxas -v on its PTX."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", "--gpu-name", arch, str(src), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (f"{regs.group(1) if regs else '?':>4} regs  "
            f"{(spill.group(1) + '/' + spill.group(2)) if spill else '?':>9} B spilled (st/ld)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float16", "float32"),
                        help="the modules' dtype (default: all three)")
    parser.add_argument("--heads", type=int, action="append",
                        help=f"attention heads at Di=768 (default: {', '.join(map(str, HEADS))})")
    args = parser.parse_args(argv)
    archs = args.arch or [90, 80]
    dtypes = [getattr(torch, name) for name in (args.dtype or ("bfloat16", "float16", "float32"))]
    install()
    launches = {}
    for dtype in dtypes:
        for heads in args.heads or HEADS:
            LAUNCHES.clear()
            run_modules(dtype, heads)
            for kernel, _, call_args, call_kwargs in LAUNCHES:
                sig, constexprs, options = signature(kernel, call_args, call_kwargs)
                key = (kernel.__name__, tuple(sig.items()), tuple(sorted(constexprs.items())),
                       tuple(options.items()))
                launches.setdefault(key, (kernel, sig, constexprs, options, dtype))
    failed = 0
    print(f"{len(launches)} distinct launches; triton {triton.__version__}")
    for arch in archs:
        for (name, *_), (kernel, sig, constexprs, options, dtype) in sorted(launches.items(), key=lambda kv: kv[0][0]):
            label = f"sm_{arch} {name:<22} {str(dtype).replace('torch.', ''):<9}"
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper())
            try:
                compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                                          options=options)
            except Exception as exc:  # a compile error of any kind is the finding
                failed += 1
                print(f"{label} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}  [{flags}]")
                continue
            shared = compiled.metadata.shared
            over = shared > SHARED_LIMIT.get(arch, 227 * 1024)
            failed += over
            print(f"{label} {ptxas_report(compiled.asm['ptx'])}  {shared:>6} B shared  "
                  f"warps={options.get('num_warps')} stages={options.get('num_stages')}  [{flags}]"
                  + ("  EXCEEDS the shared memory of one program" if over else ""))
    if failed:
        print(f"{failed} launch(es) failed to compile or would not launch")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
