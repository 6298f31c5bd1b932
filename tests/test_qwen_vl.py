"""The merged (Qwen-VL) families: scores, kept embeddings, M-RoPE positions.

References are independent of the code under test: transformers' own model
of the family (the row's ``checkpoint.model``: eager attention,
``get_rope_index``) on the same random-weight checkpoint, in the dtype the
engine serves it in (``Family.dtype``). The server tests are every family's
(tests/test_served_families.py).
"""

from __future__ import annotations

import pytest
import torch

from hivtp_vllm.families import FAMILIES
from hivtp_vllm.pruning import (
    default_band,
    num_retained,
    select_tokens,
    uniform_tokens,
    windowed_band,
)
from hivtp_vllm.tools.local_server import in_process_llm
from tests.count_contract import FAMILIES as CONTRACT
from tests.helpers import assert_pruned_prompt, install_recorders, kept_tokens, noise, run_recorded
from tests.reference_scores import qwen_model_class, qwen_transformers_scores

MAX_LEN = 4096

# vLLM's scores against transformers' eager attention, per family dtype.
# float32: the same arithmetic up to summation order. bfloat16 (Qwen3.5, whose
# CPU Gated DeltaNet kernel takes nothing else): both towers round their
# activations to 8 bits of mantissa, by different kernels (vLLM's fused ops
# and float32 scores of bfloat16 q and k; transformers' bfloat16 q @ k and
# softmax weights cast back to bfloat16). The random tower's attention is
# near uniform (scores about 2.6e-3, small logits), and a score averages
# thousands of weights whose rounding errors mostly cancel: measured on the
# tiny Qwen3.5 and Qwen3.5-MoE checkpoints (the same tower), max abs error
# 1.5e-7, max relative 5.9e-5 (two images), 7.8e-8 and 4.6e-5 (one image),
# far under bfloat16's 2^-8. rtol 3e-4 is five times the largest measured.
SCORE_TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-7),
    torch.bfloat16: dict(rtol=3e-4, atol=1e-7),
}
# Two images with text between and after, as a chat prompt.
PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Look at this."
    "<|vision_start|><|image_pad|><|vision_end|>And this one.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Multiples of 224 (28 and 32 both divide it) within the tiny checkpoints'
# pixel bounds: smart_resize leaves them as they are.
SIZES = ((448, 224), (224, 672))
# The same checks with one image and a tall one (rows > cols moves the text after it).
ONE_IMAGE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROMPTS = {"two images, text between": (PROMPT, SIZES), "one tall image": (ONE_IMAGE, SIZES[1:])}


@pytest.fixture(scope="module")
def arch(qwen_arch) -> str:
    return qwen_arch


def dtype(arch: str) -> torch.dtype:
    """The engine's dtype for the family (float32 but where vLLM's CPU kernels need bfloat16)."""
    return getattr(torch, FAMILIES[arch].dtype)


def merged_grid(arch: str, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of merged tokens of an image of one of ``SIZES``."""
    return height // CONTRACT[arch].unit, width // CONTRACT[arch].unit


def model_class(arch: str):
    """transformers' class of the family (its row's ``checkpoint.model``)."""
    return qwen_model_class(arch)


def scored_layers(vision_config) -> tuple[int, ...]:
    band = default_band(vision_config.depth)
    full = getattr(vision_config, "fullatt_block_indexes", None)
    return windowed_band(*band, full) if full else tuple(range(band[0], sum(band)))


def test_band_is_the_full_attention_layer_nearest_the_middle():
    # Qwen2.5-VL-7B: 32 layers, full attention at 7, 15, 23, 31: band (8, 4).
    assert default_band(32) == (8, 4)
    assert windowed_band(8, 4, [7, 15, 23, 31]) == (7,)
    assert windowed_band(6, 12, [7, 15, 23, 31]) == (7, 15)
    assert windowed_band(11, 1, [7, 15]) == (7,)  # tie: the lower
    assert windowed_band(2, 1, [3, 7]) == (3,)  # the tiny checkpoint's band


# -- model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_llm(tiny_qwen, arch):
    with in_process_llm(
        tiny_qwen,
        max_model_len=MAX_LEN,
        limit_mm_per_prompt={"image": 2},
        dtype=FAMILIES[arch].dtype,
    ) as engine:
        yield engine


@pytest.mark.parametrize("case", list(PROMPTS))
def test_scores_kept_embeddings_and_positions(qwen_llm, tiny_qwen, arch, case):
    """One pruned prompt, checked against transformers on every count:

    - vLLM's scores equal transformers' eager attention, per image segment,
      merged 2 x 2 and put back in raster order (in the engine's dtype: to
      float32's last bits, or within bfloat16's rounding, SCORE_TOLERANCE);
    - the kept tokens are the spec's selection on those scores;
    - the kept embeddings equal the unpruned ones at the kept tokens;
    - the positions the language model gets equal the unpruned prompt's
      positions (transformers' ``get_rope_index``) at every text token and
      every kept image token, and decoding continues where it would.
    """
    from transformers import AutoProcessor

    qwen_llm.apply_model(install_recorders)
    prompt, sizes = PROMPTS[case]
    images = [noise(40 + i, w, h) for i, (w, h) in enumerate(sizes)]
    grids = [merged_grid(arch, w, h) for w, h in sizes]
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    hf = processor(text=[prompt], images=images, return_tensors="pt")
    assert [tuple(g) for g in (hf["image_grid_thw"][:, 1:] // 2).tolist()] == grids
    model = model_class(arch).from_pretrained(tiny_qwen, dtype=torch.float32)
    want, want_delta = model.model.get_rope_index(
        hf["input_ids"],
        hf["mm_token_type_ids"],
        hf["image_grid_thw"],
        attention_mask=hf["attention_mask"],
    )
    want = want[:, 0]  # [3, N] unpruned positions
    full_ids = hf["input_ids"][0].tolist()

    # Unpruned: vLLM's positions are transformers' exactly.
    ids, prefill, decode, stock = run_recorded(
        qwen_llm, images, {"hivtp_retain_ratio": 1.0}, prompt
    )
    assert ids == full_ids
    assert torch.equal(prefill, want)
    assert torch.equal(decode[:, 0], want.max() + 1 + torch.zeros(3, dtype=torch.long))

    band = scored_layers(model.config.vision_config)
    reference = qwen_transformers_scores(
        arch, tiny_qwen, hf["pixel_values"], hf["image_grid_thw"], band, dtype=dtype(arch)
    )
    ratio = 0.25
    ids, prefill, decode, pruned = run_recorded(
        qwen_llm, images, {"hivtp_retain_ratio": ratio}, prompt
    )

    # vLLM's own scores of that run, merged and in raster order.
    lengths = (hf["image_grid_thw"].prod(-1)).tolist()

    def scores(model):
        per_position = model.hivtp_recorder.position_scores(lengths)
        merged = per_position.view(-1, 4).mean(1)
        if hasattr(model.visual, "fullatt_block_indexes"):  # Qwen2.5-VL's window order
            metadata = model.visual.prepare_encoder_metadata(hf["image_grid_thw"].tolist())
            merged = merged[metadata["reverse_indices"]]
        return merged.cpu()

    (vllm_scores,) = qwen_llm.apply_model(scores)
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

    # vLLM's own scores, merged and in raster order, equal transformers'.
    reference = torch.cat(reference).float()
    error = (vllm_scores - reference).abs()
    print(
        f"{arch} scores ({dtype(arch)}): max abs error {float(error.max()):.3g}, "
        f"max rel error {float((error / reference.abs()).max()):.3g}"
    )
    torch.testing.assert_close(vllm_scores, reference, **SCORE_TOLERANCE[dtype(arch)])
    # The selection on transformers' scores keeps mostly the same tokens
    # (near-uniform random attention has near-ties, which rounding reorders:
    # bfloat16 measured 23 of 25, 36 of 37, 35 of 37 shared).
    sizes = [r * c for r, c in grids]
    for (rows, cols), mine, theirs in zip(
        grids, vllm_scores.split(sizes), reference.split(sizes), strict=True
    ):
        k = num_retained(rows * cols, ratio)
        ours = set(select_tokens(mine.view(rows, cols), k).tolist())
        same = len(ours & set(select_tokens(theirs.view(rows, cols), k).tolist()))
        print(f"{arch} image {rows}x{cols}: selections share {same} of {k}")
        assert same >= 0.75 * k, (rows, cols, same, k)


def test_uniform_baseline_keeps_the_lattice(qwen_llm, arch):
    qwen_llm.apply_model(install_recorders)
    images = [noise(60 + i, w, h) for i, (w, h) in enumerate(SIZES)]
    kwargs = {"hivtp_retain_ratio": 0.25, "hivtp_selection": "uniform"}

    def forget(model) -> None:
        model.hivtp_recorder._sum = None

    qwen_llm.apply_model(forget)
    _, _, _, pruned = run_recorded(qwen_llm, images, kwargs, PROMPT)
    # No attention was recorded: the uniform baseline computes no scores.
    assert qwen_llm.apply_model(lambda m: m.hivtp_recorder._sum) == [None]
    for image, (w, h) in enumerate(SIZES):
        rows, cols = merged_grid(arch, w, h)
        kept = kept_tokens(pruned[image], cols)
        assert torch.equal(kept, uniform_tokens(rows, cols, num_retained(rows * cols, 0.25)))


def test_explain_scores_and_keeps_as_the_server(tiny_qwen, arch, tmp_path):
    """``hivtp-vllm explain`` on Qwen2.5-VL: transformers' scores (which the
    server's equal, above) and the spec's selection on them."""
    import json

    from transformers import AutoProcessor

    from hivtp_vllm.tools.explain import explain

    image = noise(33, *SIZES[0])
    image.save(tmp_path / "a.png")
    explain(
        str(tiny_qwen),
        [tmp_path / "a.png"],
        ratios=[0.25],
        out_dir=tmp_path,
        show_progress=False,
        log=lambda _: None,
    )
    document = json.loads((tmp_path / "a.hivtp.json").read_text())
    (view,) = document["views"]
    rows, cols = merged_grid(arch, *SIZES[0])
    assert view["grid"] == [rows, cols]
    batch = AutoProcessor.from_pretrained(tiny_qwen).image_processor(
        images=[image], return_tensors="pt"
    )
    vision = model_class(arch).config_class.from_pretrained(tiny_qwen).vision_config
    (reference,) = qwen_transformers_scores(
        arch, tiny_qwen, batch["pixel_values"], batch["image_grid_thw"], scored_layers(vision)
    )
    torch.testing.assert_close(torch.tensor(view["scores"]), reference, rtol=1e-4, atol=1e-7)
    (selection,) = document["selections"]
    k = num_retained(rows * cols, 0.25)
    assert selection["K"] == k
    kept = select_tokens(reference.view(rows, cols), k)
    assert selection["views"][0]["kept"] == kept.tolist()


def test_encoder_cuda_graphs_capture_nothing(qwen_llm):
    """Graph replay would bypass the selection and the position columns."""
    (modalities,) = qwen_llm.apply_model(lambda m: m.get_encoder_cudagraph_config().modalities)
    assert modalities == []


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ({"compilation_config": {"compile_mm_encoder": True}}, "compile_mm_encoder"),
    ],
)
def test_conflicting_server_options_are_refused_at_start(tiny_qwen, option, says):
    with pytest.raises(Exception, match="hivtp") as info:
        with in_process_llm(tiny_qwen, max_model_len=MAX_LEN, **option):
            pass
    assert says in str(info.value) or says in repr(info.getrepr())
