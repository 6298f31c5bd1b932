"""vLLM's multimodal processor with the plugin: counts, fields, cache keys.

No engine and no model weights are run here, so these tests also run against
the GPU build of vLLM (``vllm==0.32.0``) on a machine without a GPU: a
difference between the two builds fails our CI, not a deployment.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import hivtp_vllm

GRID = 576


@pytest.fixture(scope="module")
def make_processor(tiny_llava):
    hivtp_vllm.register()
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    def make(mm_processor_kwargs: dict | None = None):
        config = ModelConfig(
            model=str(tiny_llava), mm_processor_kwargs=mm_processor_kwargs, max_model_len=4096
        )
        return MULTIMODAL_REGISTRY.create_processor(config)

    return make


def image(seed: int, size=(336, 336)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def apply(processor, images, kwargs=None, cache=None):
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.multimodal.processing.context import TimingContext

    token_id = processor.info.get_hf_config().image_token_index
    prompt = [1, 5, 6] + [token_id, 7] * len(images)
    inputs = ProcessorInputs(
        prompt=prompt,
        mm_data_items=processor.info.parse_mm_data({"image": images}),
        hf_processor_mm_kwargs=kwargs or {},
        cache=cache,
    )
    return processor.apply(inputs, TimingContext(enabled=False))


def placeholder_lengths(result) -> list[int]:
    return [r.length for r in result["mm_placeholders"]["image"]]


def test_plugin_processor_is_registered(make_processor):
    from hivtp_vllm.models.llava import HivtpLlavaMultiModalProcessor

    assert isinstance(make_processor(), HivtpLlavaMultiModalProcessor)


@pytest.mark.parametrize(
    ("kwargs", "kept"),
    [
        (None, GRID),
        ({"hivtp_retain_ratio": 1.0}, GRID),
        ({"hivtp_retain_ratio": 0.5}, 288),
        ({"hivtp_retain_ratio": 0.25}, 144),
        ({"hivtp_retain_ratio": 1 / 9}, 64),
        ({"hivtp_num_tokens": 64}, 64),
        ({"hivtp_num_tokens": 1}, 1),
    ],
)
def test_placeholder_counts(make_processor, kwargs, kept):
    processor = make_processor()
    result = apply(processor, [image(0), image(1, (500, 300))], kwargs)
    assert placeholder_lengths(result) == [kept, kept]
    token_id = processor.info.get_hf_config().image_token_index
    assert result["prompt_token_ids"].count(token_id) == 2 * kept
    items = result["mm_kwargs"]["image"]
    assert [int(item["hivtp_num_keep"].data[0]) for item in items] == [kept, kept]


def test_server_default_and_request_override(make_processor):
    processor = make_processor({"hivtp_retain_ratio": 0.5, "hivtp_global_fraction": 0.25})
    result = apply(processor, [image(0)])
    assert placeholder_lengths(result) == [288]
    assert float(result["mm_kwargs"]["image"][0]["hivtp_global_fraction"].data) == 0.25
    assert placeholder_lengths(apply(processor, [image(0)], {"hivtp_num_tokens": 10})) == [10]
    assert placeholder_lengths(apply(processor, [image(0)], {"hivtp_retain_ratio": 1.0})) == [GRID]


def test_bad_budget_is_a_validation_error(make_processor):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as info:
        apply(make_processor(), [image(0)], {"hivtp_num_tokens": GRID + 1})
    assert info.value.parameter == "hivtp_num_tokens"


def test_bad_server_option_fails_at_first_use(make_processor):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="hivtp_retain_ratio"):
        apply(make_processor({"hivtp_retain_ratio": 2.0}), [image(0)])


def test_cache_keys_follow_the_pruning(make_processor):
    """The processor cache returns an image's kwargs by hash: a hit across
    ratios would hand one ratio's K to another request."""
    from vllm.multimodal.cache import MultiModalProcessorOnlyCache

    processor = make_processor()
    cache = MultiModalProcessorOnlyCache(processor.info.ctx.model_config)
    img = image(3)
    seen = {}
    for ratio in (0.5, 0.25, 0.5, 1.0, 0.25):
        result = apply(processor, [img], {"hivtp_retain_ratio": ratio}, cache=cache)
        kept = int(result["mm_kwargs"]["image"][0]["hivtp_num_keep"].data[0])
        assert placeholder_lengths(result) == [kept]
        seen.setdefault(ratio, (kept, result["mm_hashes"]["image"][0]))
        assert (kept, result["mm_hashes"]["image"][0]) == seen[ratio]
    assert {r: k for r, (k, _) in seen.items()} == {0.5: 288, 0.25: 144, 1.0: GRID}
    assert len({h for _, h in seen.values()}) == 3


def test_unpruned_hash_is_stock_vllm_hash(make_processor):
    processor = make_processor()
    img = image(4)
    ours = apply(processor, [img])["mm_hashes"]["image"][0]
    assert apply(processor, [img], {"hivtp_retain_ratio": 1.0})["mm_hashes"]["image"][0] == ours
    from vllm.multimodal.processing import ProcessorInputs

    stock = ProcessorInputs(
        prompt=[], mm_data_items=processor.info.parse_mm_data({"image": [img]})
    ).get_mm_hashes(processor.info.model_id, processor.info.ctx.get_mm_config().mm_hasher_algorithm)
    assert stock["image"][0] == ours
    # Any pruning keys the image apart from the unpruned entry.
    a = apply(processor, [img], {"hivtp_retain_ratio": 0.25})["mm_hashes"]["image"][0]
    b = apply(processor, [img], {"hivtp_num_tokens": 144})["mm_hashes"]["image"][0]
    assert a != ours and b != ours


@pytest.mark.parametrize("key", ["hivtp_dummy", "hivtp_resolved"])
def test_the_processors_own_keys_are_unknown_to_a_request(make_processor, key):
    """The values the processor hands its hooks (the resolved request, the
    warm-up marker) cannot be sent: a request's ``hivtp_dummy`` would keep its
    images out of the metrics. Both are unknown keys, named."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=key) as info:
        apply(make_processor(), [image(0)], {key: True})
    assert info.value.parameter == key


def test_requests_with_new_options_reuse_the_hf_processor(make_processor, monkeypatch):
    """vLLM builds an HF processor (from disk: its tokenizer too) per distinct
    set of processor kwargs it is asked with; requests that differ only in
    their hivtp keys must share one, or every new ratio pays for a load (six
    seconds a request for Gemma 3's 262k-token vocabulary)."""
    from vllm.multimodal.processing import context

    processor = make_processor()
    built = []
    original = context.cached_processor_from_config

    def counting(*args, **kwargs):
        built.append(sorted(kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(context, "cached_processor_from_config", counting)
    options = [
        None,
        {"hivtp_retain_ratio": 0.5},
        {"hivtp_retain_ratio": 0.37},
        {"hivtp_num_tokens": 9},
    ]
    lengths = [
        placeholder_lengths(apply(processor, [image(900 + n)], o)) for n, o in enumerate(options)
    ]
    assert lengths == [[GRID], [288], [213], [9]]
    assert built and all(not any(k.startswith("hivtp_") for k in kw) for kw in built), built
    first = processor.info.get_hf_processor()
    assert processor.info.get_hf_processor(hivtp_retain_ratio=0.2, hivtp_resolved=object()) is first
