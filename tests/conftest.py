"""Shared fixtures: random-weight checkpoints and real vLLM servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hivtp_vllm.tools.local_server import VllmServer
from tests.runners import runner_env

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 checkpoint in the real hub layout (336 px, 24x24)."""
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", size="tiny")


@pytest.fixture(scope="session")
def server_factory():
    """Start real ``vllm.entrypoints.openai.api_server`` subprocesses; stop them at the end."""
    started: list[VllmServer] = []

    def start(
        model: Path, *args: str, plugin: bool = True, runner: str = "V1", wait: bool = True
    ) -> VllmServer:
        """``runner``: vLLM's model runner (tests/runners.py); ``wait=False``
        returns once launched, for servers that start side by side
        (``server.wait_ready()``)."""
        server = VllmServer(model, list(args), plugin=plugin, env=runner_env(runner))
        started.append(server)
        server.launch()
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def shared_plugin_server(server_factory, tiny_llava) -> VllmServer:
    """One server with the plugin and vLLM's defaults, shared by the modules
    that only send it requests (each server start costs tens of seconds)."""
    return server_factory(tiny_llava)


QWEN_ARCHS = ("qwen2.5-vl", "qwen3-vl")


@pytest.fixture(scope="module", params=QWEN_ARCHS)
def qwen_arch(request) -> str:
    """Each Qwen-VL family in turn: a module's tests run for one, then the other."""
    return request.param


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory, qwen_arch: str) -> Path:
    """A tiny random-weight checkpoint of that family (``make-model --size tiny``)."""
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    out = tmp_path_factory.mktemp(qwen_arch) / f"tiny-{qwen_arch}"
    make_checkpoint(out, size="tiny", arch=qwen_arch)
    return out
