"""The compiled extension on any machine: build record, registration, fake/meta shapes, autograd wiring, CPU errors.

Nothing here runs a CUDA kernel; tests/test_cuda_gpu.py does, on a GPU.
Meta tensors stand in for device data: they run the operators' fake
implementations and autograd formulas with shapes only.

Without the extension (installed with ``LMEYE_FAST_SKIP_CUDA_BUILD=1``) its tests skip with
the reason setup.py recorded; with ``LMEYE_FAST_REQUIRE_EXTENSION=1`` (set by .ci/run)
they fail with it instead, so CI cannot pass on a build that produced no ``_C``.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lmeye_fast import backends

ROOT = Path(__file__).resolve().parents[1]

REQUIRE = "LMEYE_FAST_REQUIRE_EXTENSION"
REQUIRED = os.environ.get(REQUIRE, "0") == "1"

OPS = ("interleave", "interleave_", "gather_rows", "scatter_rows", "plan_slots")


def missing(what: str, reason: str):
    """A test that needs ``what`` cannot run: a failure where it is required (CI), a skip elsewhere."""
    if REQUIRED:
        pytest.fail(f"{what}: {reason} ({REQUIRE}=1)", pytrace=False)
    pytest.skip(f"{what}: {reason}")


@pytest.fixture(scope="module")
def extension():
    """``lmeye_fast._C`` loaded, or the reason it is not (setup.py's build record, else the import error)."""
    built, reason = backends.extension_status()
    if not built:
        missing("lmeye_fast._C is not built", reason)


@pytest.fixture(scope="module")
def cuda_ops(extension):
    from lmeye_fast.ops import cuda

    return cuda


def shapes():
    """Odd random sizes: B, T, D, R with R <= T."""
    batch, length, width = random.choice((1, 3)), random.choice((3, 123, 257)), random.choice((1, 3, 95, 257))
    return batch, length, width, random.randint(1, min(length, 5))


def meta_inputs(dtype=torch.float32, index_dtype=torch.int64):
    batch, length, width, count = shapes()
    embeds = torch.empty(batch, length, width, dtype=dtype, device="meta")
    rows = torch.empty(count, batch, width, dtype=dtype, device="meta").transpose(0, 1)  # non-contiguous
    slot_pos = torch.empty(batch, count, dtype=index_dtype, device="meta")
    return embeds, rows, slot_pos


def test_build_info_recorded(extension):
    info = json.loads((ROOT / "lmeye_fast" / "_build_info.json").read_text())
    assert info["built"] is True
    assert {"sm_80", "sm_90"} <= set(info["archs"])
    assert info["torch"] == torch.__version__


def test_every_kernel_source_is_listed():
    listed = {line.strip() for line in (ROOT / "kernels" / "SOURCES").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    on_disk = {p.name for p in (ROOT / "kernels").glob("*.cu")}
    assert listed == on_disk


def test_info_reports_extension(extension):
    out = subprocess.run([sys.executable, "-m", "lmeye_fast.info"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert "_C         built for sm_80, sm_90" in out
    assert "lmeye_fast._C loaded" in out


def test_ops_registered(cuda_ops):
    for name in OPS:
        qualname = f"lmeye_fast::{name}"
        for key in ("CUDA", "CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (qualname, key)
        assert hasattr(torch.ops.lmeye_fast, name)
    assert torch.ops.lmeye_fast.interleave_.default._schema.is_mutable
    assert not torch.ops.lmeye_fast.interleave.default._schema.is_mutable


def test_cpu_call_fails_clearly(cuda_ops):
    batch, length, width, count = shapes()
    embeds, rows = torch.randn(batch, length, width), torch.randn(batch, count, width)
    slot_pos = torch.stack([torch.randperm(length)[:count] for _ in range(batch)])
    message = ("lmeye_fast::interleave: embeds: expected a CUDA tensor (the CUDA backend has no CPU kernels), "
               "got a tensor on cpu")
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        torch.ops.lmeye_fast.interleave(embeds, rows, slot_pos)
    with pytest.raises(RuntimeError, match="lmeye_fast::interleave: embeds: expected a CUDA tensor"):
        cuda_ops.interleave(embeds, rows, slot_pos)
    with pytest.raises(RuntimeError, match="lmeye_fast::gather_rows: seq: expected a CUDA tensor .*got a tensor on cpu"):
        torch.ops.lmeye_fast.gather_rows(embeds, slot_pos)
    with pytest.raises(RuntimeError, match="lmeye_fast::plan_slots: input_ids: expected a CUDA tensor .*got a tensor on cpu"):
        torch.ops.lmeye_fast.plan_slots(slot_pos, 1, 2, count)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_meta_shapes(cuda_ops, dtype):
    ops = torch.ops.lmeye_fast
    embeds, rows, slot_pos = meta_inputs(dtype, random.choice((torch.int32, torch.int64)))
    batch, length, width = embeds.shape
    count = rows.shape[1]
    out = ops.interleave(embeds, rows, slot_pos, torch.empty(count, width, dtype=dtype, device="meta"))
    assert out.shape == embeds.shape and out.dtype == dtype
    gathered = ops.gather_rows(embeds, slot_pos)
    assert gathered.shape == (batch, count, width) and gathered.dtype == dtype
    assert ops.scatter_rows(rows, slot_pos, length + 2).shape == (batch, length + 2, width)
    ids = torch.empty(batch, length, dtype=torch.int64, device="meta")
    request_pos, slots, status = ops.plan_slots(ids, 1, 2, count)
    assert (request_pos.shape, slots.shape, status.shape) == ((batch,), (batch, count), (batch,))
    assert (request_pos.dtype, slots.dtype, status.dtype) == (torch.int64, torch.int64, torch.int32)


def test_fake_tensor_mode_on_cuda_device(cuda_ops):
    batch, length, width, count = shapes()
    with FakeTensorMode():
        embeds = torch.empty(batch, length, width, dtype=torch.bfloat16, device="cuda")
        rows = torch.empty(batch, count, width, dtype=torch.bfloat16, device="cuda")
        slot_pos = torch.zeros(batch, count, dtype=torch.int64, device="cuda")
        out = cuda_ops.interleave(embeds, rows, slot_pos)
        assert out.shape == embeds.shape and out.device.type == "cuda"
        hidden = torch.empty(batch, length, width, dtype=torch.bfloat16, device="cuda")
        w_q = torch.empty(count * 6, width, dtype=torch.bfloat16, device="cuda")
        r = cuda_ops.request(hidden, slot_pos[:, 0], w_q, None, count)
        assert r.shape == (batch, count, 6)


@pytest.mark.parametrize("name", OPS)
def test_opcheck_on_meta(cuda_ops, name):
    # Schema, autograd registration, fake implementation and AOT dispatch;
    # the same check runs against the real kernels in tests/test_cuda_gpu.py.
    index_dtype = random.choice((torch.int32, torch.int64))
    embeds, rows, slot_pos = meta_inputs(index_dtype=index_dtype)
    slot_embed = torch.empty(rows.shape[1], rows.shape[2], device="meta", requires_grad=True)
    input_ids = torch.empty(embeds.shape[:2], dtype=index_dtype, device="meta")
    args = {
        "interleave": (embeds.requires_grad_(), rows.requires_grad_(), slot_pos, slot_embed),
        "interleave_": (embeds, rows, slot_pos, None),
        "gather_rows": (embeds.requires_grad_(), slot_pos),
        "scatter_rows": (rows.requires_grad_(), slot_pos, embeds.shape[1]),
        # As lmeye_fast.planner.plan_slots calls it: ids (B, T), <img-q> id, <img-d> id, R.
        "plan_slots": (input_ids, 3, 5, rows.shape[1]),
    }[name]
    torch.library.opcheck(getattr(torch.ops.lmeye_fast, name), args)


def test_autograd_shapes_on_meta(cuda_ops):
    embeds, rows, slot_pos = meta_inputs()
    embeds.requires_grad_()
    rows.requires_grad_()
    slot_embed = torch.empty(rows.shape[1], rows.shape[2], device="meta", requires_grad=True)
    weight = torch.empty(embeds.shape, device="meta", requires_grad=True)
    out = cuda_ops.interleave(embeds, rows, slot_pos, slot_embed=slot_embed)
    grads = torch.autograd.grad((out * weight).sum(), (embeds, rows, slot_embed), create_graph=True)
    assert [g.shape for g in grads] == [embeds.shape, rows.shape, slot_embed.shape]
    # Gradients are themselves differentiable (gather and scatter are each other's backward).
    (second,) = torch.autograd.grad(grads[1].sum() + grads[2].sum(), weight)
    assert second.shape == embeds.shape

    hidden = torch.empty(embeds.shape, device="meta", requires_grad=True)
    w_q = torch.empty(rows.shape[1] * 4, embeds.shape[2], device="meta", requires_grad=True)
    b_q = torch.empty(rows.shape[1] * 4, device="meta", requires_grad=True)
    request_pos = torch.empty(embeds.shape[0], dtype=torch.int64, device="meta")
    r = cuda_ops.request(hidden, request_pos, w_q, b_q, rows.shape[1])
    assert r.shape == (embeds.shape[0], rows.shape[1], 4)
    grads = torch.autograd.grad(r.sum(), (hidden, w_q, b_q))
    assert [g.shape for g in grads] == [hidden.shape, w_q.shape, b_q.shape]


def test_inplace_interleave_bumps_version_and_tracks_grad(cuda_ops):
    embeds, rows, slot_pos = meta_inputs()
    before = embeds._version
    torch.ops.lmeye_fast.interleave_(embeds, rows, slot_pos)
    assert embeds._version > before
    leaf = torch.empty(embeds.shape, device="meta", requires_grad=True)
    rows.requires_grad_()
    x = leaf * 2
    y = cuda_ops.interleave(x, rows, slot_pos, inplace=True)
    assert y is x and type(y.grad_fn).__name__ == "_InterleaveInplaceBackward"
    grads = torch.autograd.grad(y.sum(), (leaf, rows))
    assert [g.shape for g in grads] == [leaf.shape, rows.shape]


def test_bad_shapes_name_the_argument(cuda_ops):
    batch, length, width, count = shapes()
    embeds = torch.empty(batch, length, width, device="meta")
    rows = torch.empty(batch, count, width, device="meta")
    slot_pos = torch.empty(batch, count, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"rows \(B, R, D\): expected shape"):
        cuda_ops.interleave(embeds, torch.empty(batch, count, width + 1, device="meta"), slot_pos)
    with pytest.raises(ValueError, match=r"slot_pos \(B, R\): expected shape"):
        cuda_ops.interleave(embeds, rows, slot_pos[:, 1:])
    with pytest.raises(TypeError, match=r"slot_pos \(B, R\): expected dtype in \(int32, int64\)"):
        cuda_ops.interleave(embeds, rows, slot_pos.float())
    with pytest.raises(ValueError, match=r"request_pos \(B,\): expected shape"):
        cuda_ops.request(embeds, slot_pos, torch.empty(4, width, device="meta"), None, 1)


@pytest.mark.slow
def test_kernels_compile_standalone_with_werror(tmp_path):
    # The framework-free library from kernels/SOURCES, for sm_80 and sm_90, warnings as errors.
    absent = [name for name, found in (("cmake", shutil.which("cmake")),
                                       ("nvcc", Path("/usr/local/cuda/bin/nvcc").exists() or shutil.which("nvcc")))
              if not found]
    if absent:
        missing("the standalone -Werror compile check needs cmake and a CUDA toolkit",
                f"not found: {', '.join(absent)} (looked on PATH and for /usr/local/cuda/bin/nvcc)")
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DCMAKE_CUDA_ARCHITECTURES=80;90"]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        configure.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
    subprocess.run(configure, check=True, capture_output=True)
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "liblmeye_fast_kernels.a").exists()
