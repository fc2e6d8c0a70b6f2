"""Backend dispatch (lmeye_fast.ops.resolve / ops.get), on the CPU with the backends'
availability monkeypatched: ``backends._STATUS`` (the probe results, filled once per
process) is replaced by a table per scenario, and ``ops._RESOLVED`` (get's cache) by an
empty dict, both restored after each test, so nothing real is probed or kept.

What is checked: ``backend="auto"`` picks, for a CUDA device and a kernel dtype
(float32, float16, bfloat16), the first backend of ``AUTO_ORDER[op]`` that is available
(and has a kernel for the op); the reference for CPU tensors, for no device and for
float64; an explicitly requested backend that is unavailable raises an error that names it
and says why.
"""

import importlib.util
import itertools

import pytest
import torch

from lmeye_fast import InteractiveLayer, backends, ops

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Availability of (triton, cuda) in each scenario; the reference is always available.
SCENARIOS = {f"triton{int(t)}-cuda{int(c)}": {"triton": t, "cuda": c}
             for t, c in itertools.product((True, False), repeat=2)}


def reason(name, ok):
    return f"{name} available (test)" if ok else f"no {name} in this test scenario"


@pytest.fixture
def availability(monkeypatch):
    """Set which backends exist; the status table and get's cache start empty each time."""

    def set_available(available):
        status = {"reference": (True, "plain PyTorch, any device")}
        status.update({name: (ok, reason(name, ok)) for name, ok in available.items()})
        monkeypatch.setattr(backends, "_STATUS", status)
        monkeypatch.setattr(ops, "_RESOLVED", {})
        assert all(backends.status(name) == value for name, value in status.items())

    return set_available


def loadable(backend):
    """Whether the modules behind ``backend`` import on this machine (to compare get's functions)."""
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None
    if backend == "cuda":
        return backends.extension_status()[0]
    return True


def test_dispatch_table_is_consistent():
    assert set(ops.AUTO_ORDER) == set(ops.TABLE)
    for op, order in ops.AUTO_ORDER.items():
        assert order[-1] == "reference", op
        assert "reference" in ops.TABLE[op], op
        # An order entry without a kernel for the op would be skipped silently.
        assert all(name in ops.TABLE[op] for name in order), (op, order)
        assert set(order) <= set(backends.BACKENDS)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_auto_on_cuda_takes_the_first_available_of_auto_order(availability, scenario, dtype):
    available = {"reference": True, **SCENARIOS[scenario]}
    availability(SCENARIOS[scenario])
    for op, order in ops.AUTO_ORDER.items():
        want = next(name for name in order if available[name])
        assert ops.resolve(op, "auto", CUDA, dtype) == want, (op, scenario)
        assert ops.resolve(op, "auto", CUDA, None) == want, (op, scenario)  # no dtype: a kernel dtype
        if loadable(want):
            assert ops.get(op, "auto", CUDA, dtype) is ops._load(ops.TABLE[op][want])


def test_auto_on_cuda_with_everything_available_is_the_measured_order(availability):
    """With every backend present, auto runs the first entry of AUTO_ORDER, and that is a kernel
    (the reference only where nothing else exists)."""
    availability({"triton": True, "cuda": True})
    for op, order in ops.AUTO_ORDER.items():
        for dtype in KERNEL_DTYPES:
            assert ops.resolve(op, "auto", CUDA, dtype) == order[0] != "reference", op


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_auto_elsewhere_is_the_reference(availability, scenario):
    """CPU tensors (even where the Triton interpreter makes triton available), no device, and float64
    (no kernel takes it) all run on the reference."""
    availability(SCENARIOS[scenario])
    for op in ops.TABLE:
        for dtype in KERNEL_DTYPES + (torch.float64, None):
            assert ops.resolve(op, "auto", CPU, dtype) == "reference", (op, dtype)
            assert ops.resolve(op, "auto", None, dtype) == "reference", (op, dtype)
        assert ops.resolve(op, "auto", CUDA, torch.float64) == "reference", op
        assert ops.get(op, "auto", CPU, torch.float32) is ops._load(ops.TABLE[op]["reference"])
        assert ops.get(op, "auto", CUDA, torch.float64) is ops._load(ops.TABLE[op]["reference"])


def test_get_caches_per_device_type_and_dtype(availability):
    """get resolves once per (op, backend, device type, dtype): a CPU resolution is not reused on CUDA,
    nor a float64 one for float32."""
    availability({"triton": True, "cuda": False})
    reference = ops._load(ops.TABLE["transmit"]["reference"])
    assert ops.get("transmit", "auto", CPU, torch.float32) is reference
    assert ops.get("transmit", "auto", CUDA, torch.float64) is reference
    if loadable("triton"):
        assert ops.get("transmit", "auto", CUDA, torch.float32) is ops._load(ops.TABLE["transmit"]["triton"])
    assert ("transmit", "auto", "cpu", torch.float32) in ops._RESOLVED


@pytest.mark.parametrize("missing", ["triton", "cuda"])
def test_an_explicit_unavailable_backend_raises_naming_it(availability, missing):
    availability({name: name != missing for name in ("triton", "cuda")})
    for op in ops.TABLE:
        for device in (CUDA, CPU):
            with pytest.raises(RuntimeError, match=f"backend '{missing}' is not available here: "
                                                   f"{reason(missing, False)}"):
                ops.resolve(op, missing, device, torch.float32)
            with pytest.raises(RuntimeError, match=f"'{missing}'"):
                ops.get(op, missing, device, torch.float32)
    assert not ops._RESOLVED  # a failed resolution is not cached
    with pytest.raises(RuntimeError, match=f"backend '{missing}' is not available here"):
        InteractiveLayer(16, 8, 8, 2, num_heads=2, backend=missing)


def test_an_explicit_available_backend_is_used_or_falls_to_the_reference(availability):
    """An explicit backend runs where it has a kernel for the op, whatever the device; an op it has no
    kernel for runs on the reference rather than failing."""
    availability({"triton": True, "cuda": True})
    for op, table in ops.TABLE.items():
        for name in backends.BACKENDS:
            for device in (CUDA, CPU):
                want = name if name in table else "reference"
                assert ops.resolve(op, name, device, torch.float32) == want, (op, name, device)
    assert "cuda" not in ops.TABLE["attend_decomposed"]  # the fall-back above was exercised


def test_unknown_names_are_rejected(availability):
    availability({"triton": True, "cuda": True})
    with pytest.raises(ValueError, match="op: expected one of"):
        ops.resolve("attend", "auto", CUDA, torch.float32)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.resolve("request", "tpu", CUDA, torch.float32)


def test_environment_variable_overrides_the_argument(monkeypatch):
    monkeypatch.setenv(backends.ENV_BACKEND, "reference")
    assert backends.requested("triton") == "reference"
    assert InteractiveLayer(16, 8, 8, 2, num_heads=2, backend="cuda").backend == "reference"
    monkeypatch.setenv(backends.ENV_BACKEND, "gpu")
    with pytest.raises(ValueError, match=backends.ENV_BACKEND):
        backends.requested("auto")
    monkeypatch.delenv(backends.ENV_BACKEND)
    assert backends.requested(None) == "auto"


def test_attention_schedule_is_a_layer_argument_and_refuses_unknown_names():
    """Two layers with different schedules in one process each run their own: the schedule is an
    argument of the op and part of its launch plan's key, not process state."""
    pytest.importorskip("triton", reason="the attention schedules are the Triton backend's")
    from lmeye_fast.ops import attend
    from lmeye_fast.ops.attend_folded import FoldedPlan

    hidden, image, embeds = torch.randn(2, 8), torch.randn(2, 4, 6), torch.randn(2, 5, 8)
    slots = torch.tensor([[1, 3], [0, 4]])
    layers = {schedule: InteractiveLayer(8, 6, 8, 2, 1, 2, backend="triton", attention=schedule)
              for schedule in ("folded", "split")}
    layers["split"].load_state_dict(layers["folded"].state_dict())
    want = InteractiveLayer(8, 6, 8, 2, 1, 2, backend="reference")
    want.load_state_dict(layers["folded"].state_dict())
    attend._PLANS.clear()
    for schedule in ("folded", "split", "folded"):
        with torch.no_grad():
            out = layers[schedule](hidden, image, embeds, slots)
            torch.testing.assert_close(out, want(hidden, image, embeds, slots), rtol=1e-4, atol=1e-4)
        assert layers[schedule].attention == schedule
    # One plan per schedule, both kept.
    assert sorted(isinstance(p, FoldedPlan) for p in attend._PLANS.values()) == [False, True]
    with pytest.raises(ValueError, match="attention"):
        InteractiveLayer(8, 6, 8, 2, 1, 2, attention="fused")


def test_a_layer_takes_the_split_schedules_tile_options():
    """The tile options are the layer's, like its schedule: an ``AttentionSchedule`` record passed as
    ``attention``; a bad option is refused at construction, naming the argument."""
    pytest.importorskip("triton", reason="the attention schedules are the Triton backend's")
    from lmeye_fast.ops import AttentionSchedule

    schedule = AttentionSchedule("split", forward_features="on_chip", backward_features="on_chip",
                                 heads_per_program=2)
    layer = InteractiveLayer(8, 6, 8, 2, 1, 2, backend="triton", attention=schedule)
    assert layer.attention == schedule
    want = InteractiveLayer(8, 6, 8, 2, 1, 2, backend="reference", attention=schedule)
    want.load_state_dict(layer.state_dict())
    hidden, image, embeds = torch.randn(2, 8), torch.randn(2, 4, 6), torch.randn(2, 5, 8)
    slots = torch.tensor([[1, 3], [0, 4]])
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden, image, embeds, slots), want(hidden, image, embeds, slots),
                                   rtol=1e-4, atol=1e-4)
    for bad in (AttentionSchedule("split", backward_features="fused"), AttentionSchedule("fused"),
                AttentionSchedule("split", heads_per_program=0)):
        with pytest.raises(ValueError, match="attention"):
            InteractiveLayer(8, 6, 8, 2, 1, 2, attention=bad)
