"""Prometheus metrics on the server's own /metrics, read back as Prometheus text."""

from __future__ import annotations

import pytest

from hivtp_vllm.tools.local_server import image_data_url
from hivtp_vllm.tools.local_server import metric as value

pytestmark = pytest.mark.server


@pytest.mark.parametrize("api_servers", [1, 2])
def test_counts_are_exact_and_startup_counts_nothing(server_factory, tiny_llava, api_servers):
    server = server_factory(
        tiny_llava,
        "--mm-processor-kwargs",
        '{"hivtp_retain_ratio": 0.5}',
        "--api-server-count",
        str(api_servers),
    )
    model = {"model_name": str(tiny_llava)}
    before = server.scrape()
    assert any(name.startswith("vllm:") for name in before)  # vLLM's own series are intact
    # The start-up warm-up and profiling ran on dummy images: nothing counted.
    assert value(before, "hivtp_images_total", **model) == 0
    assert value(before, "hivtp_pruning_seconds_count", **model) == 0

    sent = [
        ([image_data_url(1)], None, 288),  # server default 0.5
        ([image_data_url(2), image_data_url(3)], {"hivtp_retain_ratio": 0.25}, 144),
        ([image_data_url(4)], {"hivtp_retain_ratio": 1.0}, 576),
        ([image_data_url(5)], {"hivtp_num_tokens": 64}, 64),
        ([image_data_url(7)], {"hivtp_retain_ratio": 0.25, "hivtp_selection": "uniform"}, 144),
    ]
    for images, kwargs, _ in sent:
        assert server.chat(images, kwargs, max_tokens=2).status_code == 200
    assert server.chat([image_data_url(6)], {"hivtp_retain_ratio": 7}).status_code == 400
    assert server.completion("no image here", max_tokens=2).status_code == 200

    after = server.scrape()
    images = sum(len(i) for i, _, _ in sent)
    assert value(after, "hivtp_images_total", **model) == images
    assert value(after, "hivtp_visual_tokens_total", kind="input", **model) == 576 * images
    retained = sum(len(i) * k for i, _, k in sent)
    assert value(after, "hivtp_visual_tokens_total", kind="retained", **model) == retained
    assert value(after, "hivtp_retain_ratio_count", **model) == images
    ratios = [k / 576 for i, _, k in sent for _ in i]
    assert value(after, "hivtp_retain_ratio_sum", **model) == pytest.approx(sum(ratios))
    # Each series says which selection ran: the uniform baseline apart.
    assert value(after, "hivtp_images_total", selection="uniform", **model) == 1
    assert value(after, "hivtp_images_total", selection="hivtp", **model) == images - 1
    uniform_kept = value(after, "hivtp_visual_tokens_total", kind="retained", selection="uniform")
    assert uniform_kept == 144
    # One histogram observation per forward that pruned: four requests
    # pruned (the r = 1.0 one took the stock path), at most one forward per image.
    forwards = value(after, "hivtp_pruning_seconds_count", **model)
    assert 4 <= forwards <= 5
    assert value(after, "hivtp_pruning_seconds_sum", **model) > 0
    inf = value(after, "hivtp_pruning_seconds_bucket", le="+Inf", **model)
    assert inf == forwards
    server.stop()
