"""vLLM's processor-cache race, with the cache ``hivtp-vllm serve`` picks.

With vLLM's default ``lru`` processor cache, a non-streaming request can
overtake a streaming one for the same new image and reach the engine
without the image's tensors: vLLM answers it HTTP 500 (stock vLLM too;
``benchmarks/cache_race.py`` measures both caches). The same bursts, on a
pruning server started with :data:`hivtp_vllm.cli.CACHE_TYPE`, must all
succeed.
"""

from __future__ import annotations

import pytest

from benchmarks.cache_race import PER_ROUND, bursts, drift_warnings
from hivtp_vllm.cli import CACHE_TYPE, serve_command

pytestmark = pytest.mark.server

ROUNDS = 25


def test_serve_picks_the_shm_cache_unless_told():
    assert (
        serve_command("m", 0.5, None, [])[-2:] == CACHE_TYPE == ["--mm-processor-cache-type", "shm"]
    )
    for chosen in (["--mm-processor-cache-type", "lru"], ["--mm-processor-cache-type=lru"]):
        cmd = serve_command("m", 0.5, None, chosen)
        assert cmd[-len(chosen) :] == chosen and "shm" not in cmd


def test_streaming_and_plain_requests_for_one_new_image_all_succeed(server_factory, tiny_llava):
    server = server_factory(tiny_llava, *CACHE_TYPE)
    try:
        statuses = bursts(server, ROUNDS, {"hivtp_retain_ratio": 0.5})
        assert statuses == {200: ROUNDS * PER_ROUND}
        assert drift_warnings(server) == 0
    finally:
        server.stop()  # 3-4 GB: not kept for the rest of the session
