"""GLM-4.1V and GLM-4.5V: the processor's pads and plans, and the model's
scores, kept embeddings and M-RoPE positions.

References are independent of the code under test: transformers' glm4v
``smart_resize`` (an image as two frames) and HF ``Glm4vProcessor`` for the
counts, transformers' own GLM model (eager attention, ``get_rope_index``)
on the same random-weight checkpoint for scores and positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.glm4v.image_processing_glm4v import smart_resize

import hivtp_vllm
from hivtp_vllm.families import FAMILIES, TINY_IMAGE_TOKENS
from hivtp_vllm.pruning import default_band, num_retained, select_tokens, uniform_tokens
from hivtp_vllm.tools.local_server import in_process_llm
from tests.conftest import GLM_ARCHS
from tests.helpers import (
    PAD_OPTIONS,
    assert_pads_per_image,
    assert_pruned_prompt,
    assert_videos_keep_their_layout,
    install_recorders,
    kept_tokens,
    noise,
    process,
    run_recorded,
)
from tests.reference_scores import qwen_transformers_scores

MAX_LEN = 4096
UNIT = 28  # px a merged token's side: patch 14 x 2 x 2 merge
LOW = 12544  # the published shortest_edge
HIGH = 2 * TINY_IMAGE_TOKENS * UNIT * UNIT  # the tiny checkpoints' longest_edge (two frames)
IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
# Two images with text between and after, as GLM's chat template writes them.
PROMPT = f"[gMASK]<sop><|user|>\n{IMAGE}Look at this.{IMAGE}And this one.<|assistant|>\n"
ONE_IMAGE = f"[gMASK]<sop><|user|>\n{IMAGE}Describe it.<|assistant|>\n"
# Multiples of 28 within the tiny bounds (two frames): smart_resize keeps them.
MODEL_SIZES = ((448, 224), (224, 672))
PROMPTS = {
    "two images, text between": (PROMPT, MODEL_SIZES),
    "one tall image": (ONE_IMAGE, MODEL_SIZES[1:]),
}


def merged(width: int, height: int, max_pixels: int = HIGH, min_pixels: int = LOW) -> int:
    """Merged tokens of an image by GLM's resize: two frames, so the bounds hold 2*h*w."""
    h, w = smart_resize(2, height, width, factor=UNIT, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // UNIT) * (w // UNIT)


@pytest.fixture(scope="module", params=GLM_ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, arch):
    from hivtp_vllm.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp(arch) / "tiny", arch=arch)


@pytest.fixture(scope="module")
def processor(checkpoint):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    hivtp_vllm.register()
    return MULTIMODAL_REGISTRY.create_processor(
        ModelConfig(model=str(checkpoint), max_model_len=8192)
    )


def apply(processor, images, kwargs=None, videos=None):
    tokenizer = processor.info.get_tokenizer()
    text = "[gMASK]<sop><|user|>\n" + IMAGE * len(images)
    text += "<|begin_of_video|><|video|><|end_of_video|>" * len(videos or [])
    prompt = tokenizer.encode(text + "Hi<|assistant|>\n", add_special_tokens=False)
    return process(processor, prompt, images, kwargs, videos)


# -- processor ----------------------------------------------------------------


def test_recipe_and_served_classes(processor, checkpoint, arch):
    from hivtp_vllm.models.glm4_1v import HivtpGlm4vMultiModalProcessor

    assert isinstance(processor, HivtpGlm4vMultiModalProcessor)
    size = processor.info.get_image_processor().size
    assert (size["shortest_edge"], size["longest_edge"]) == (LOW, HIGH)
    text = processor.info.get_hf_config().text_config
    assert text.attention_bias  # vLLM's glm4.py reads it; transformers' config lacks it
    if arch == "glm4.5v":
        assert text.head_dim != text.hidden_size // text.num_attention_heads
        assert text.use_qk_norm is False


@pytest.mark.parametrize("kwargs", PAD_OPTIONS)
def test_pads_per_image(processor, kwargs):
    items = assert_pads_per_image(apply, processor, merged, kwargs)
    grids = [tuple(item["hivtp_grids"].data[0].tolist()) for item in items]
    # The plan's grid is the HF processor's (image_grid_thw / 2).
    hf = [tuple((item["image_grid_thw"].data[1:] // 2).tolist()) for item in items]
    assert grids == hf


def test_request_size_shapes_the_grid(processor):
    """A request's ``size`` (GLM's processor option; shortest_edge included,
    which vLLM's own GLM count ignores) sizes the grid counted and pruned."""
    image = noise(9, 2000, 1500)
    high = 2 * 256 * UNIT * UNIT
    kwargs = {"size": {"shortest_edge": LOW, "longest_edge": high}, "hivtp_retain_ratio": 0.5}
    (placeholder,) = apply(processor, [image], kwargs)["mm_placeholders"]["image"]
    n = merged(2000, 1500, max_pixels=high)
    assert n < merged(2000, 1500)
    assert placeholder.length == num_retained(n, 0.5)
    small = noise(3, 56, 56)
    low = 2 * 64 * UNIT * UNIT
    kwargs = {"size": {"shortest_edge": low, "longest_edge": HIGH}, "hivtp_retain_ratio": 0.25}
    (placeholder,) = apply(processor, [small], kwargs)["mm_placeholders"]["image"]
    assert placeholder.length == num_retained(merged(56, 56, min_pixels=low), 0.25)
    assert merged(56, 56, min_pixels=low) > merged(56, 56)


def test_bad_budget_is_a_400_naming_the_key(processor):
    from vllm.exceptions import VLLMValidationError

    n = merged(448, 336)
    with pytest.raises(VLLMValidationError) as info:
        apply(processor, [noise(0, 448, 336)], {"hivtp_num_tokens": n + 1})
    assert info.value.parameter == "hivtp_num_tokens" and f"[1, {n}]" in str(info.value)


def test_videos_are_left_as_vllm_lays_them_out(processor):
    assert_videos_keep_their_layout(apply, processor, merged)


@pytest.fixture(scope="module")
def glm_llm(checkpoint):
    with in_process_llm(checkpoint, max_model_len=MAX_LEN, limit_mm_per_prompt={"image": 2}) as llm:
        yield llm


@pytest.mark.parametrize("case", list(PROMPTS))
def test_scores_kept_embeddings_and_positions(glm_llm, checkpoint, arch, case):
    """vLLM's scores equal transformers' eager attention of the GLM tower;
    the kept tokens are the spec's selection on them; kept rows equal the
    unpruned rows; positions equal transformers' ``get_rope_index`` of the
    unpruned prompt at every text and kept image token; decoding continues
    after the unpruned prompt's largest position."""
    from transformers import AutoProcessor

    row = FAMILIES[arch].checkpoint
    model_cls = row.resolve(row.model)
    glm_llm.apply_model(install_recorders)
    prompt, sizes = PROMPTS[case]
    images = [noise(40 + i, w, h) for i, (w, h) in enumerate(sizes)]
    grids = [(h // UNIT, w // UNIT) for w, h in sizes]
    hf = AutoProcessor.from_pretrained(checkpoint)(
        text=[prompt], images=images, return_tensors="pt"
    )
    assert [tuple(g) for g in (hf["image_grid_thw"][:, 1:] // 2).tolist()] == grids
    model = model_cls.from_pretrained(checkpoint, dtype=torch.float32)
    want, _ = model.model.get_rope_index(
        hf["input_ids"],
        hf["mm_token_type_ids"],
        hf["image_grid_thw"],
        attention_mask=hf["attention_mask"],
    )
    want = want[:, 0]
    full_ids = hf["input_ids"][0].tolist()

    ids, prefill, decode, stock = run_recorded(glm_llm, images, {"hivtp_retain_ratio": 1.0}, prompt)
    assert ids == full_ids
    assert torch.equal(prefill, want)
    assert torch.equal(decode[:, 0], want.max() + 1 + torch.zeros(3, dtype=torch.long))

    start, count = default_band(model.config.vision_config.depth)
    band = tuple(range(start, start + count))
    reference = qwen_transformers_scores(
        arch, checkpoint, hf["pixel_values"], hf["image_grid_thw"], band
    )
    ratio = 0.25
    ids, prefill, decode, pruned = run_recorded(
        glm_llm, images, {"hivtp_retain_ratio": ratio}, prompt
    )
    lengths = hf["image_grid_thw"].prod(-1).tolist()
    (vllm_scores,) = glm_llm.apply_model(
        lambda m: m.hivtp_recorder.position_scores(lengths).view(-1, 4).mean(1).cpu()
    )
    assert_pruned_prompt(
        full_ids,
        ids,
        model.config.image_token_id,
        grids,
        vllm_scores,
        stock,
        pruned,
        ratio,
        want,
        prefill,
        decode,
    )
    reference = torch.cat(reference).float()
    torch.testing.assert_close(vllm_scores, reference, rtol=1e-4, atol=1e-7)


def test_uniform_baseline_keeps_the_lattice(glm_llm):
    glm_llm.apply_model(install_recorders)
    images = [noise(60 + i, w, h) for i, (w, h) in enumerate(MODEL_SIZES)]
    kwargs = {"hivtp_retain_ratio": 0.25, "hivtp_selection": "uniform"}
    _, _, _, pruned = run_recorded(glm_llm, images, kwargs, PROMPT)
    for image, (w, h) in enumerate(MODEL_SIZES):
        rows, cols = h // UNIT, w // UNIT
        kept = kept_tokens(pruned[image], cols)
        assert torch.equal(kept, uniform_tokens(rows, cols, num_retained(rows * cols, 0.25)))


def test_video_pruning_rate_is_refused_at_start(checkpoint):
    """vLLM has no video pruning for GLM: the plugin refuses the flag (stock
    accepts and ignores it)."""
    with pytest.raises(Exception, match="video-pruning-rate") as info:
        with in_process_llm(checkpoint, max_model_len=MAX_LEN, video_pruning_rate=0.5):
            pass
    assert "GLM" in str(info.value) or "GLM" in repr(info.getrepr())


def test_explain_scores_and_keeps_as_the_server(checkpoint, arch, tmp_path):
    """``hivtp-vllm explain`` on GLM: transformers' scores of the GLM tower
    (which the server's equal, above) and the spec's selection on them."""
    import json

    from transformers import AutoProcessor

    from hivtp_vllm.tools.explain import explain

    image = noise(33, *MODEL_SIZES[0])
    image.save(tmp_path / "a.png")
    explain(
        str(checkpoint),
        [tmp_path / "a.png"],
        ratios=[0.25],
        out_dir=tmp_path,
        show_progress=False,
        log=lambda _: None,
    )
    document = json.loads((tmp_path / "a.hivtp.json").read_text())
    (view,) = document["views"]
    rows, cols = MODEL_SIZES[0][1] // UNIT, MODEL_SIZES[0][0] // UNIT
    assert view["grid"] == [rows, cols]
    batch = AutoProcessor.from_pretrained(checkpoint).image_processor(
        images=[image], return_tensors="pt"
    )
    row = FAMILIES[arch].checkpoint
    vision = row.resolve(row.config).from_pretrained(checkpoint).vision_config
    start, count = default_band(vision.depth)
    (reference,) = qwen_transformers_scores(
        arch,
        checkpoint,
        batch["pixel_values"],
        batch["image_grid_thw"],
        range(start, start + count),
    )
    torch.testing.assert_close(torch.tensor(view["scores"]), reference, rtol=1e-4, atol=1e-7)
    (selection,) = document["selections"]
    k = num_retained(rows * cols, 0.25)
    assert selection["K"] == k
    assert selection["views"][0]["kept"] == select_tokens(reference.view(rows, cols), k).tolist()
