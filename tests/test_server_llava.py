"""End to end: real vLLM OpenAI servers (subprocesses) with and without the plugin.

LLaVA-1.5's own server tests; the ones every family shares (counts, r = 1.0
as stock, mixed options at once, 400s naming the key) are in
tests/test_served_families.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hivtp_vllm.tools.local_server import image_data_url
from tests.helpers import assert_refused, ok, prompt_tokens

pytestmark = pytest.mark.server

GRID = 576  # 24 x 24 patches per 336 px image
IMAGES = [image_data_url(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def plugin_server(shared_plugin_server):
    return shared_plugin_server  # the plugin with vLLM's defaults


# Stock vLLM on the family's checkpoint, shared with tests/test_served_families.py
# (conftest): the same tiny LLaVA-1.5 as tiny_llava.
SERVED = pytest.mark.parametrize("family_servers", ["llava"], indirect=True)


@pytest.fixture
def stock_server(family_servers):
    return family_servers.stock.server  # every request sent (not remembered)


def test_pruning_changes_what_the_model_sees(plugin_server):
    # Random weights: the text means nothing, but a pruned prompt is another
    # prompt, so greedy outputs are deterministic per ratio.
    a = ok(plugin_server.chat(IMAGES[:1], {"hivtp_retain_ratio": 0.25}, max_tokens=16))
    b = ok(plugin_server.chat(IMAGES[:1], {"hivtp_retain_ratio": 0.25}, max_tokens=16))
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_cache_never_serves_another_ratio(plugin_server):
    """Same image, alternating ratios: the processor, encoder and prefix caches
    must key on the pruning, so each answer keeps its own size and output."""
    image = [image_data_url(99)]
    seen: dict[float, tuple] = {}
    for ratio in (0.5, 0.25, 0.5, 1.0, 0.25, 0.5):
        body = ok(plugin_server.chat(image, {"hivtp_retain_ratio": ratio}, max_tokens=8))
        result = (body["usage"]["prompt_tokens"], body["choices"][0]["message"]["content"])
        seen.setdefault(ratio, result)
        assert result == seen[ratio], ratio
    sizes = {r: seen[r][0] for r in seen}
    assert sizes[1.0] - sizes[0.5] == GRID - 288
    assert sizes[1.0] - sizes[0.25] == GRID - 144


def test_nan_json_literal_is_rejected(plugin_server):
    import requests

    # A raw body: NaN is not valid JSON, so no JSON encoder would write it.
    body = (
        f'{{"model": "{plugin_server.model}", "max_tokens": 1, '
        '"mm_processor_kwargs": {"hivtp_retain_ratio": NaN}, '
        '"messages": [{"role": "user", "content": "hi"}]}'
    )
    response = requests.post(
        plugin_server.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert "hivtp_retain_ratio" in response.text


@SERVED
def test_other_mm_kwargs_stay_rejected_like_stock(plugin_server, stock_server):
    for server in (plugin_server, stock_server):
        for kwargs in ({"do_resize": False}, {"do_resize": False, "hivtp_retain_ratio": 0.5}):
            response = server.chat(IMAGES[:1], kwargs, max_tokens=1)
            if server is stock_server and "hivtp_retain_ratio" in kwargs:
                assert response.status_code == 400
                continue
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "mm_processor_kwargs"
    # Stock vLLM refuses even our keys; the plugin is what admits them.
    assert stock_server.chat(IMAGES[:1], {"hivtp_retain_ratio": 0.5}).status_code == 400


def test_completions_api_accepts_hivtp_keys(plugin_server):
    assert plugin_server.completion("USER: hello ASSISTANT:", {"hivtp_num_tokens": 64}).ok
    bad = plugin_server.completion("hello", {"hivtp_retain_ratio": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "hivtp_retain_ratio"
    other = plugin_server.completion("hello", {"do_resize": False})
    assert other.status_code == 400 and other.json()["error"]["param"] == "mm_processor_kwargs"


@SERVED
def test_server_default_ratio_and_request_override(server_factory, tiny_llava, stock_server):
    server = server_factory(tiny_llava, "--mm-processor-kwargs", '{"hivtp_retain_ratio": 0.5}')
    full = prompt_tokens(stock_server.chat(IMAGES[:1]))
    assert prompt_tokens(server.chat(IMAGES[:1])) == full - (GRID - 288)
    assert prompt_tokens(server.chat(IMAGES[:1], {"hivtp_retain_ratio": 0.25})) == full - (
        GRID - 144
    )
    assert prompt_tokens(server.chat(IMAGES[:1], {"hivtp_num_tokens": 10})) == full - (GRID - 10)
    assert prompt_tokens(server.chat(IMAGES[:1], {"hivtp_retain_ratio": 1.0})) == full
    server.stop()


@SERVED
def test_streamed_timing_reports_the_pruned_prompt(plugin_server, stock_server):
    full = prompt_tokens(stock_server.chat(IMAGES[:1]))
    timed = plugin_server.timed_stream(IMAGES[:1], {"hivtp_retain_ratio": 0.25}, max_tokens=3)
    assert timed["prompt_tokens"] == full - (GRID - 144)
    assert timed["completion_tokens"] == 3
    assert 0 < timed["ttft"] <= timed["latency"]


def test_hivtp_keys_on_an_architecture_not_pruned_are_a_400(server_factory, tmp_path_factory):
    """A model outside the plugin's list (here a text-only Llama) is served as
    stock, but a request that asks it for pruning is told it gets none."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hivtp_vllm.tools.checkpoints import build_tokenizer

    folder = tmp_path_factory.mktemp("text-only") / "tiny-llama"
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    server = server_factory(folder)
    assert server.completion("hello").status_code == 200
    for kwargs, key in (
        ({"hivtp_retain_ratio": 0.5}, "hivtp_retain_ratio"),
        ({"hivtp_num_tokens": 64}, "hivtp_num_tokens"),
    ):
        error = assert_refused(server.completion("hello", kwargs), key)
        assert "LlamaForCausalLM" in error["message"] and "not pruned" in error["message"]
        assert "LlavaForConditionalGeneration" in error["message"]
    assert server.completion("hello").status_code == 200
    server.stop()


@SERVED
def test_uniform_baseline_served_exactly(plugin_server, stock_server):
    """hivtp_selection = uniform: the same K, a different selection, its own
    cache entries, and a 400 for a bad value."""
    full = prompt_tokens(stock_server.chat(IMAGES[:1]))
    image = [image_data_url(77)]
    for kwargs, kept in (
        ({"hivtp_retain_ratio": 0.25, "hivtp_selection": "uniform"}, 144),
        ({"hivtp_num_tokens": 64, "hivtp_selection": "uniform"}, 64),
        ({"hivtp_retain_ratio": 1.0, "hivtp_selection": "uniform"}, GRID),
    ):
        assert prompt_tokens(plugin_server.chat(image, kwargs)) == full - (GRID - kept), kwargs
    # Same image and K, alternating selections: each keeps its own answer.
    answers = {}
    for selection in ("uniform", "hivtp", "uniform", "hivtp"):
        kwargs = {"hivtp_retain_ratio": 0.25, "hivtp_selection": selection}
        body = ok(plugin_server.chat(image, kwargs, max_tokens=8))
        answers.setdefault(selection, body["choices"][0]["message"]["content"])
        assert body["choices"][0]["message"]["content"] == answers[selection]
    bad = plugin_server.chat(image, {"hivtp_selection": "random"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "hivtp_selection"
    assert "'hivtp', 'uniform'" in bad.json()["error"]["message"]


def test_a_worker_the_plugin_has_not_checked_is_refused_at_start(tiny_llava):
    """A platform's own worker (here a stand-in named by ``--worker-cls``)
    runs a model runner whose internals the plugin has not checked: the
    server does not start, and says which workers the plugin knows."""
    from hivtp_vllm.tools.local_server import VllmServer

    server = VllmServer(tiny_llava, ["--worker-cls", "tests.unknown_worker.UnknownWorker"])
    with pytest.raises(RuntimeError, match="exited early"):
        server.start(timeout=240)
    message = Path(server.log.name).read_text()
    assert "the worker tests.unknown_worker.UnknownWorker runs a model runner" in message
    assert "vllm.v1.worker.cpu_worker.CPUWorker (V1, V2)" in message
