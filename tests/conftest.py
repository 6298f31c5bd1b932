"""Shared fixtures: random-weight checkpoints and real vLLM servers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from hivtp_vllm import families as table
from hivtp_vllm.tools.local_server import VllmServer
from tests.runners import RUNNERS, assert_runs, runner_env

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 checkpoint in the real hub layout (336 px, 24x24)."""
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", size="tiny")


def half_of_the_cores(turn: int) -> str:
    """The first or (odd ``turn``) second half of the cores, as vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND`` takes a list ("0", "2-3")."""
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    chosen = cores[half:] if turn % 2 and len(cores) > 1 else cores[:half]
    return ",".join(map(str, chosen))


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
        env = runner_env(runner)
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's CPU build binds every server's model worker to the same
            # cores (all but the last, kept for the engine): bind them to
            # either half of the machine by turns instead, so servers side by
            # side (a family's three; stock and the plugin answering at once)
            # compute on all of it.
            env["VLLM_CPU_OMP_THREADS_BIND"] = half_of_the_cores(len(started))
        server = VllmServer(model, list(args), plugin=plugin, env=env)
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


# The Qwen-VL families: the rows of the family table with the "merged" layout
# and Qwen's tokens (the modules that use them write Qwen's prompts; GLM's
# rows, merged with their own tokens, are tests/test_glm4v.py's).
QWEN_ARCHS = tuple(
    name
    for name, row in table.FAMILIES.items()
    if row.layout == "merged" and row.checkpoint.special_tokens == table.QWEN_SPECIALS
)
GLM_ARCHS = tuple(
    name
    for name, row in table.FAMILIES.items()
    if row.layout == "merged" and row.checkpoint.special_tokens == table.GLM4V_SPECIALS
)


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


# Stock vLLM runs on V1 only (one server a family fewer, about 25 s of CPU to
# start and every stock request again: CI time). What the family tests take
# from stock is either decided in the API server before any model runner
# (prompt tokens, statuses, 400s, block sizes) or greedy tokens, which
# tests/test_served_families.py's runners-agree test shows equal on V1 and
# V2 for the plugin at every option, r = 1.0 included.
STOCK_RUNNER = "V1"
SERVED_WAYS = [(runner, True) for runner in RUNNERS] + [(STOCK_RUNNER, False)]


class StockServer:
    """Stock vLLM's server with its chat answers remembered: a test that asks
    the same of stock on each runner (the same images, options and
    arguments) gets the first answer again instead of another request."""

    def __init__(self, server: VllmServer) -> None:
        self.server = server
        self._answers: dict[str, object] = {}

    def chat(self, images: list[str], mm_kwargs: dict | None = None, **kwargs: object):
        key = json.dumps([images, mm_kwargs, kwargs], sort_keys=True, default=str)
        if key not in self._answers:
            self._answers[key] = self.server.chat(images, mm_kwargs, **kwargs)
        return self._answers[key]

    def __getattr__(self, name: str) -> object:
        return getattr(self.server, name)


@dataclass
class Served:
    """One family's random checkpoint, served three ways: the plugin on each
    model runner (tests/runners.py), and stock vLLM (plugin not loaded) on
    :data:`STOCK_RUNNER`."""

    family: object  # tests.count_contract.Family (the family table's row, as tests see it)
    checkpoint: Path
    servers: dict[tuple[str, bool], VllmServer]

    def __post_init__(self) -> None:
        self.stock = StockServer(self.servers[(STOCK_RUNNER, False)])

    def pair(self, runner: str = "V1") -> tuple[VllmServer, StockServer]:
        """(plugin on ``runner``, stock)."""
        return self.servers[(runner, True)], self.stock


@pytest.fixture(scope="session")
def family_servers(request, server_factory, tmp_path_factory) -> Served:
    """A family's three servers, started side by side. Parametrize indirectly
    with a family's name (hivtp_vllm/families.py; tests/count_contract.FAMILIES)
    (``@pytest.mark.parametrize("family_servers", ["llava-next"], indirect=True)``):
    pytest then runs every test of every module that asks for one family
    together, on one set of servers, and stops it before the next family's."""
    from hivtp_vllm.tools.checkpoints import make_checkpoint
    from tests.count_contract import FAMILIES

    family = FAMILIES[request.param]
    ckpt = make_checkpoint(
        tmp_path_factory.mktemp(f"served-{family.name}") / "tiny", arch=family.name
    )
    args = ("--max-model-len", str(family.max_model_len), "--dtype", family.dtype)
    # A request may carry its own chat template (a raw prompt ending in an
    # image: tests/test_served_families.py), as vLLM serves with this flag.
    args += ("--trust-request-chat-template",)
    if family.videos:
        args += ("--limit-mm-per-prompt", '{"image": 2, "video": 1}')
    if family.served_kwargs:  # Gemma 3: pan-and-scan on, so images have crop views
        args += ("--mm-processor-kwargs", json.dumps(family.served_kwargs))
    servers = {
        (runner, plugin): server_factory(ckpt, *args, plugin=plugin, runner=runner, wait=False)
        for runner, plugin in SERVED_WAYS
    }
    for (runner, _), server in servers.items():
        server.wait_ready()
        assert_runs(server.log.name, runner)
    yield Served(family, ckpt, servers)
    for server in servers.values():
        server.stop()


# Session-scoped servers hold 3-4 GB each (a family's three about 10 GB), and
# pytest keeps a session fixture until the session ends. Left so, a family's
# servers outlived their tests and shared the machine with the servers of the
# tests after them (the load runner's three: 23 GB in all, which once stalled
# a CI run). Each is stopped once the last test that needs it has run;
# pytest groups the tests of one family together, so none is started twice.
RELEASED_FIXTURES = ("family_servers", "shared_plugin_server")
LAST_USERS = pytest.StashKey[dict]()


def server_keys(item: pytest.Item) -> list[tuple[str, object]]:
    """The session servers ``item`` needs, as (fixture, family or None)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return [(name, params.get(name)) for name in RELEASED_FIXTURES if name in item.fixturenames]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    session = item.session
    if LAST_USERS not in session.stash:  # (fixture, family) -> the last test needing it
        session.stash[LAST_USERS] = {key: it for it in session.items for key in server_keys(it)}
    last = session.stash[LAST_USERS]
    for name, family in server_keys(item):
        if last[(name, family)] is item and name in item.funcargs:
            held = item.funcargs[name]
            for server in held.servers.values() if isinstance(held, Served) else [held]:
                server.stop()
    return result
