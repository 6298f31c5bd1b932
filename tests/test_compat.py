"""The vLLM-release-specific glue: version gate and the request-kwargs gate."""

from __future__ import annotations

import importlib
import re
import sys
import types
from pathlib import Path

import pytest
import tomllib

from hivtp_vllm import vllm_compat

# The modules that call the gate, and the one that defines it, in every
# supported release (docs/vllm-internals.md).
GATE_USERS = ("vllm.renderers.online_renderer", "vllm.entrypoints.pooling.base.serving")
GATE_HOME = "vllm.entrypoints.generate.base.protocol"


def test_supported_version_passes():
    assert vllm_compat.SUPPORTED_VLLM == ("0.32.0", "0.33.0")
    installed = vllm_compat.installed_vllm_version().split("+")[0]
    assert vllm_compat.check_vllm_version() == installed
    assert installed in vllm_compat.SUPPORTED_VLLM


@pytest.mark.parametrize("other", ["0.31.2", "0.34.0", "0.33.1"])
def test_other_version_fails_early_with_the_versions(monkeypatch, other):
    monkeypatch.setattr(vllm_compat, "installed_vllm_version", lambda: other)
    with pytest.raises(
        RuntimeError, match=rf"supports vLLM 0\.32\.0, 0\.33\.0, but vLLM {other} is installed"
    ):
        vllm_compat.check_vllm_version()


def test_register_wraps_the_gate_where_vllm_calls_it():
    import hivtp_vllm

    hivtp_vllm.register()
    home = importlib.import_module(GATE_HOME)
    original = home.validate_request_mm_kwargs
    assert not hasattr(original, "hivtp_original")  # the definition is left alone
    for name in GATE_USERS:
        gate = sys.modules[name].validate_request_mm_kwargs
        assert gate.hivtp_original is original, name


def test_only_the_wrapped_modules_mention_the_gate():
    """Read vLLM's sources: the gate is defined in one module and called from the two
    we wrap, nowhere else (a module that imports it lazily would escape the
    start-up check, which only sees loaded modules). Fails on a release that
    calls it from somewhere new: add that module to ``_VALIDATOR_USERS``."""
    import vllm

    root = Path(vllm.__file__).parent
    mentions = sorted(
        ".".join(("vllm", *path.relative_to(root).with_suffix("").parts))
        for path in root.rglob("*.py")
        if "validate_request_mm_kwargs" in path.read_text(encoding="utf-8", errors="replace")
    )
    assert mentions == sorted([GATE_HOME, *GATE_USERS])
    assert tuple(GATE_USERS) == vllm_compat._VALIDATOR_USERS


def test_the_api_server_loads_no_unwrapped_gate():
    """The server's entry module and all it imports pass the start-up check.

    Fails on a release where a module loaded with the server binds
    ``validate_request_mm_kwargs`` (``check_gate_wrapped`` would then stop
    the server at start-up).
    """
    import vllm.entrypoints.openai.api_server  # noqa: F401

    vllm_compat.allow_hivtp_request_kwargs()
    holders = sorted(
        name
        for name, module in sys.modules.items()
        if name.startswith("vllm.")
        and "validate_request_mm_kwargs" in getattr(module, "__dict__", {})
    )
    assert holders == sorted([GATE_HOME, *GATE_USERS])


def test_a_module_holding_the_unwrapped_gate_is_refused(monkeypatch):
    vllm_compat.allow_hivtp_request_kwargs()
    original = importlib.import_module(GATE_HOME).validate_request_mm_kwargs
    # A release that calls the gate from one more module, bound by name at import.
    fake = types.ModuleType("vllm.entrypoints.speech.serving")
    fake.validate_request_mm_kwargs = original
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    with pytest.raises(RuntimeError) as info:
        vllm_compat.allow_hivtp_request_kwargs()
    message = str(info.value)
    assert "speech.serving holds an unwrapped validate_request_mm_kwargs" in message
    assert "this vLLM release" in message
    assert "is not supported by this hivtp-vllm version" in message
    # register() fails the same way, so vLLM's plugin loader stops the server.
    import hivtp_vllm

    with pytest.raises(RuntimeError, match="speech.serving holds an unwrapped"):
        hivtp_vllm.register()
    # Wrapped, or outside vLLM, the same binding is fine.
    monkeypatch.setattr(fake, "validate_request_mm_kwargs", vllm_compat._wrap(original))
    vllm_compat.allow_hivtp_request_kwargs()
    outside = types.ModuleType("not_vllm.serving")
    outside.validate_request_mm_kwargs = original
    monkeypatch.delitem(sys.modules, fake.__name__)
    monkeypatch.setitem(sys.modules, outside.__name__, outside)
    vllm_compat.allow_hivtp_request_kwargs()


def test_a_caller_that_lost_the_gate_is_refused(monkeypatch):
    module = importlib.import_module(GATE_USERS[1])
    monkeypatch.delattr(module, "validate_request_mm_kwargs")
    with pytest.raises(RuntimeError, match=r"pooling\.base\.serving no longer holds"):
        vllm_compat.allow_hivtp_request_kwargs()


def test_gate_admits_hivtp_keys_and_keeps_the_rest_rejected():
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers import online_renderer

    vllm_compat.allow_hivtp_request_kwargs()
    vllm_compat.allow_hivtp_request_kwargs()  # idempotent: wrapped once
    gate = online_renderer.validate_request_mm_kwargs
    assert not hasattr(gate.hivtp_original, "hivtp_original")

    gate(
        mm_processor_kwargs={"hivtp_retain_ratio": 0.5},
        media_io_kwargs=None,
        trust_request_mm_kwargs=False,
    )
    with pytest.raises(VLLMValidationError) as info:
        gate(
            mm_processor_kwargs={"hivtp_retain_ratio": 0.5, "do_resize": False},
            media_io_kwargs=None,
            trust_request_mm_kwargs=False,
        )
    assert info.value.parameter == "mm_processor_kwargs"
    with pytest.raises(VLLMValidationError) as info:
        gate(
            mm_processor_kwargs={"hivtp_retain_ratio": 7},
            media_io_kwargs=None,
            trust_request_mm_kwargs=True,
        )
    assert info.value.parameter == "hivtp_retain_ratio"
    # Trusted servers still accept other keys, as in stock vLLM.
    gate(
        mm_processor_kwargs={"do_resize": False}, media_io_kwargs=None, trust_request_mm_kwargs=True
    )


def test_every_supported_release_is_installed_and_tested():
    """A release added to SUPPORTED_VLLM is also one the `[gpu]` extra admits, one
    scripts/setup.sh builds (with its torch pins) and one scripts/test.sh tests."""
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    supported = vllm_compat.SUPPORTED_VLLM
    (extra,) = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["gpu"]
    spec = Requirement(extra).specifier
    assert all(spec.contains(v) for v in supported)
    assert not any(spec.contains(v) for v in ("0.31.2", "0.33.1", "0.34.0"))
    setup = (root / "scripts" / "setup.sh").read_text()
    for version in supported:
        assert re.search(rf'^\s*{re.escape(version)}\) torch_pins=\("torch===', setup, re.M)
    test_sh = (root / "scripts" / "test.sh").read_text()
    (builds,) = re.findall(r"^GPU_BUILDS=\((.*)\)$", test_sh, re.M)
    assert tuple(builds.split()) == supported


class _Caller:
    """Stands in for vLLM's online renderer: a method that calls the gate,
    on an object holding ``model_config`` (as both real callers are)."""

    def __init__(self, architectures: list[str] | None) -> None:
        self.model_config = types.SimpleNamespace(architectures=architectures)

    def preprocess(self, gate, kwargs: dict) -> None:
        gate(mm_processor_kwargs=kwargs, media_io_kwargs=None, trust_request_mm_kwargs=False)


def test_hivtp_keys_on_a_model_not_pruned_are_a_400_naming_the_key():
    from vllm.exceptions import VLLMValidationError

    import hivtp_vllm

    hivtp_vllm.register()
    gate = sys.modules[GATE_USERS[0]].validate_request_mm_kwargs
    with pytest.raises(VLLMValidationError) as info:
        _Caller(["Qwen2ForCausalLM"]).preprocess(gate, {"hivtp_retain_ratio": 0.5})
    assert info.value.parameter == "hivtp_retain_ratio"
    message = str(info.value)
    assert "Qwen2ForCausalLM" in message and "not pruned by hivtp-vllm" in message
    assert all(arch in message for arch in hivtp_vllm.MODELS)
    # The architectures the plugin prunes pass, and so does a caller that
    # names no model (the processor then decides).
    _Caller(["LlavaForConditionalGeneration"]).preprocess(gate, {"hivtp_retain_ratio": 0.5})
    _Caller(None).preprocess(gate, {"hivtp_retain_ratio": 0.5})
    # Without hivtp keys nothing changes for any model.
    _Caller(["Qwen2ForCausalLM"]).preprocess(gate, {})
