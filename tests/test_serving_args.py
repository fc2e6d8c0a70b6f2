"""lmeye_fast.serving's records for vLLM, checked before vLLM starts (no vLLM needed)."""

import json

import pytest
from saved_tiny_model import save_tiny_model

from lmeye_fast.serving import ARCHITECTURE, ENGINE_ARGS, SCHEDULER, hf_overrides, serve_args


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeye-serving")
    save_tiny_model(root)
    return root


def test_overrides_name_the_model_and_the_llm_architecture(saved):
    overrides = hf_overrides(saved / "llm", saved / "adapter", saved / "vision", " Answer:")
    assert overrides["architectures"] == [ARCHITECTURE]
    assert overrides["lmeye"] == {"llm_architecture": "LlamaForCausalLM", "adapter": str((saved / "adapter").resolve()),
                                  "vision": str((saved / "vision").resolve()), "response_prefix": " Answer:",
                                  "schedule": "auto"}
    args = serve_args(saved / "llm", saved / "adapter", saved / "vision", " Answer:")
    assert json.loads(args[args.index("--hf-overrides") + 1]) == overrides
    assert "--no-enable-prefix-caching" in args and args[args.index("--scheduler-cls") + 1] == SCHEDULER
    assert ENGINE_ARGS == {"enable_prefix_caching": False, "scheduler_cls": SCHEDULER}


@pytest.mark.parametrize("part, named", [("adapter", "adapter:"), ("vision", "vision:"), ("llm", "llm:")])
def test_missing_directories_are_named(saved, tmp_path, part, named):
    paths = {"llm": saved / "llm", "adapter": saved / "adapter", "vision": saved / "vision", part: tmp_path / "absent"}
    with pytest.raises(FileNotFoundError, match=named):
        hf_overrides(**paths)


def test_a_folder_without_an_adapter_is_named(saved):
    with pytest.raises(FileNotFoundError, match="^adapter: .* holds no lmeye_adapter.safetensors"):
        hf_overrides(saved / "llm", saved / "vision", saved / "vision")


def test_a_schedule_the_forward_does_not_run_is_named(saved):
    assert hf_overrides(saved / "llm", saved / "adapter", saved / "vision", schedule="static")["lmeye"]["schedule"] == \
        "static"
    with pytest.raises(ValueError, match=r"^schedule: expected one of \('auto', 'single_pass', 'two_pass', 'static'\), "
                                         r"got 'three_pass'"):
        hf_overrides(saved / "llm", saved / "adapter", saved / "vision", schedule="three_pass")
