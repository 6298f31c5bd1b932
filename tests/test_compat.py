"""The vLLM-release-specific glue: version gate and the request-kwargs gate."""

from __future__ import annotations

import pytest

from hivtp_vllm import vllm_compat


def test_supported_version_passes():
    assert vllm_compat.check_vllm_version() == "0.32.0"


def test_other_version_fails_early_with_the_versions(monkeypatch):
    monkeypatch.setattr(vllm_compat, "installed_vllm_version", lambda: "0.31.2")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.0.*0\.31\.2 is installed"):
        vllm_compat.check_vllm_version()


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
