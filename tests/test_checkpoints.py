"""The random-weight checkpoints: real layout, real classes, deterministic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from safetensors import safe_open

from hivtp_vllm.families import FAMILIES, QWEN_SPECIALS, TINY_IMAGE_TOKENS
from hivtp_vllm.tools.checkpoints import flops_per_image, make_checkpoint


def test_tiny_llava_layout_and_loading(tiny_llava):
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    with safe_open(str(tiny_llava / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"language_model", "multi_modal_projector", "vision_tower"}
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if "vision" in k)

    config = AutoConfig.from_pretrained(tiny_llava)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert vision.num_hidden_layers >= 12
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"

    processor = AutoProcessor.from_pretrained(tiny_llava)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == config.image_token_index
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>" in prompt and prompt.rstrip().endswith("ASSISTANT:")

    model, info = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_same_seed_same_bytes(tmp_path):
    a = make_checkpoint(tmp_path / "a", size="tiny", image_size=168)
    b = make_checkpoint(tmp_path / "b", size="tiny", image_size=168)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 168


def test_bench_language_model_dominates(tmp_path):
    from transformers import AutoConfig

    from hivtp_vllm.tools.checkpoints import build_config, build_tokenizer

    config = build_config("llava", "bench", 336, build_tokenizer())
    flops = flops_per_image(config)
    assert flops["visual_tokens"] == 576
    assert flops["lm_to_vision"] >= 10
    assert isinstance(config, type(AutoConfig.for_model("llava")))


def test_onevision_bench_language_model_dominates():
    from hivtp_vllm.tools.checkpoints import build_config, build_tokenizer

    config = build_config("llava-onevision", "bench", 384, build_tokenizer(video=True))
    flops = flops_per_image(config)
    assert flops["visual_tokens"] == 729  # 27 x 27 SigLIP patches, no CLS
    assert flops["lm_to_vision"] >= 10


# -- the merged families: Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5(-MoE) ----


class Qwen(NamedTuple):
    """What a merged family's checkpoint must be, written out as published."""

    config: str  # transformers config class
    model: str  # transformers model class (config.architectures)
    processor: str
    video_processor: str
    patch: int
    image_thw: tuple[int, int, int]  # grid_thw of a 500 x 300 image
    video_thw: tuple[int, int, int]  # of 8 frames 320 x 240
    vllm_module: str  # stock vLLM's module of the architecture
    windows: tuple[int, ...] = ()  # full-attention blocks of a windowed tower
    deepstack: tuple[int, ...] = ()  # tower layers feeding DeepStack mergers
    rotary: float = 1.0  # partial rotary factor: rotary dims / head_dim
    hybrid: bool = False  # Gated DeltaNet layers beside full attention
    experts: str | None = None  # MoE experts in the file: "transposed" / "per_expert"
    system_prompt: bool = False  # the chat template's default system prompt


_QWEN3_GRIDS = dict(patch=16, image_thw=(1, 18, 32), video_thw=(4, 16, 20))
QWEN = {
    "qwen2.5-vl": Qwen(
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        "Qwen2VLVideoProcessor",
        patch=14,
        image_thw=(1, 22, 36),
        video_thw=(4, 18, 22),
        vllm_module="qwen2_5_vl",
        windows=(3, 7),
        system_prompt=True,
    ),
    "qwen3-vl": Qwen(
        "Qwen3VLConfig",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen3VLVideoProcessor",
        **_QWEN3_GRIDS,
        vllm_module="qwen3_vl",
        deepstack=(1, 3, 5),
    ),
    "qwen3-vl-moe": Qwen(
        "Qwen3VLMoeConfig",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen3VLVideoProcessor",
        **_QWEN3_GRIDS,
        vllm_module="qwen3_vl_moe",
        deepstack=(1, 3, 5),
        experts="transposed",
    ),
    "qwen3.5": Qwen(
        "Qwen3_5Config",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen3VLVideoProcessor",
        **_QWEN3_GRIDS,
        vllm_module="qwen3_5",
        rotary=0.25,
        hybrid=True,
    ),
    "qwen3.5-moe": Qwen(
        "Qwen3_5MoeConfig",
        "Qwen3_5MoeForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen3VLVideoProcessor",
        **_QWEN3_GRIDS,
        vllm_module="qwen3_5",
        rotary=0.25,
        hybrid=True,
        experts="per_expert",
    ),
}
MOE = [arch for arch, row in QWEN.items() if row.experts]
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def test_qwen_rows_cover_every_merged_family():
    # GLM's rows (merged, GLM's tokens) are checked by tests/test_glm4v.py.
    assert set(QWEN) == {
        n
        for n, f in FAMILIES.items()
        if f.layout == "merged" and f.checkpoint.special_tokens == QWEN_SPECIALS
    }
    for arch, row in QWEN.items():
        assert FAMILIES[arch].architecture == row.model
        assert FAMILIES[arch].dtype == ("bfloat16" if row.hybrid else "float32")


def noise(width: int, height: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def qwen_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Every tiny merged checkpoint, written through the ``make-model`` CLI."""
    from hivtp_vllm.tools.checkpoints import main

    out = {}
    for arch in QWEN:
        out[arch] = tmp_path_factory.mktemp("qwen") / arch
        assert main([str(out[arch]), "--arch", arch, "--size", "tiny"]) == 0
    return out


@pytest.mark.parametrize("arch", list(QWEN))
def test_qwen_config_tokens_and_chat_template(qwen_ckpts, arch):
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    ckpt, row = qwen_ckpts[arch], QWEN[arch]
    config = AutoConfig.from_pretrained(ckpt)
    assert type(config) is getattr(transformers, row.config)
    assert config.architectures == [row.model]
    v, text = config.vision_config, config.text_config
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (row.patch, 2, 2)
    assert v.depth == 8 and v.out_hidden_size == text.hidden_size
    if row.windows:
        assert list(v.fullatt_block_indexes) == list(row.windows) and v.window_size == 112
    else:
        assert getattr(v, "fullatt_block_indexes", None) is None
    assert list(getattr(v, "deepstack_visual_indexes", None) or ()) == list(row.deepstack)
    # The M-RoPE section covers the rotary half of a head: all of it, or a
    # quarter (Qwen3.5's partial rotary) read from the rope parameters.
    rope = text.rope_parameters
    assert rope.get("partial_rotary_factor", 1.0) == row.rotary
    head_dim = text.hidden_size // text.num_attention_heads
    assert getattr(text, "head_dim", head_dim) == head_dim == 32
    assert sum(rope["mrope_section"]) == head_dim * row.rotary / 2

    layer_types = list(getattr(text, "layer_types", None) or ())
    if row.hybrid:  # one of each; the linear heads vLLM's CPU kernel takes
        assert set(layer_types) == {"linear_attention", "full_attention"}
        assert text.linear_key_head_dim == text.linear_value_head_dim == 128
    else:
        assert "linear_attention" not in layer_types
    on_disk = json.loads((ckpt / "config.json").read_text())["text_config"]
    if row.experts:
        assert (text.num_experts, text.num_experts_per_tok) == (4, 2)
    else:
        assert getattr(text, "num_experts", 0) in (0, None)
    if arch == "qwen3-vl-moe":  # vLLM's qwen3_moe reads it; transformers declares none
        assert on_disk["norm_topk_prob"] is True

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    for token, i in ids.items():  # each one unsplittable token
        assert tok.encode(token, add_special_tokens=False) == [i]
    assert ids["<|image_pad|>"] == config.image_token_id
    assert ids["<|video_pad|>"] == config.video_token_id
    assert ids["<|vision_start|>"] == config.vision_start_token_id
    assert ids["<|vision_end|>"] == config.vision_end_token_id
    assert tok.eos_token == "<|im_end|>" and tok.bos_token is None
    assert tok.encode("hi there")[0] not in tok.all_special_ids  # no BOS added
    assert text.vocab_size == len(tok)

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "video"},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert rendered == (
        (system if row.system_prompt else "")
        + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        + "<|vision_start|><|video_pad|><|vision_end|>What is it?<|im_end|>\n"
        + "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("arch", list(QWEN))
def test_qwen_processor_outputs(qwen_ckpts, arch):
    import transformers
    from transformers import AutoProcessor

    row = QWEN[arch]
    patch = row.patch
    proc = AutoProcessor.from_pretrained(qwen_ckpts[arch])
    assert type(proc) is getattr(transformers, row.processor)
    assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(proc.video_processor) is getattr(transformers, row.video_processor)
    for p in (proc.image_processor, proc.video_processor):
        assert (p.patch_size, p.temporal_patch_size, p.merge_size) == (patch, 2, 2)
    # Published min_pixels; tiny max_pixels (TINY_IMAGE_TOKENS merged tokens per image).
    unit = 2 * patch
    assert proc.image_processor.size["shortest_edge"] == (3136 if patch == 14 else 65536)
    assert proc.image_processor.size["longest_edge"] == TINY_IMAGE_TOKENS * unit * unit

    def pads(text_ids, token):
        return int((text_ids == proc.tokenizer.convert_tokens_to_ids(token)).sum())

    image = noise(500, 300)
    out = proc(
        text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[image], return_tensors="pt"
    )
    thw = out["image_grid_thw"][0]
    assert tuple(thw.tolist()) == row.image_thw
    assert pads(out["input_ids"][0], "<|image_pad|>") == int(thw.prod()) // 4
    assert out["pixel_values"].shape == (int(thw.prod()), 3 * 2 * patch * patch)

    big = proc(text=["<|image_pad|>"], images=[noise(2000, 2000)], return_tensors="pt")
    assert int(big["image_grid_thw"][0].prod()) // 4 <= TINY_IMAGE_TOKENS

    frames = [noise(320, 240, seed) for seed in range(8)]
    out = proc(
        text=["<|vision_start|><|video_pad|><|vision_end|>x"],
        videos=[frames],
        do_sample_frames=False,
        return_tensors="pt",
    )
    thw = out["video_grid_thw"][0]
    assert tuple(thw.tolist()) == row.video_thw
    assert pads(out["input_ids"][0], "<|video_pad|>") == int(thw.prod()) // 4


@pytest.mark.parametrize("arch", list(QWEN))
def test_qwen_hub_key_layout(qwen_ckpts, arch):
    import transformers

    ckpt, row = qwen_ckpts[arch], QWEN[arch]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # transformers 5.x names, which vLLM's hf_to_vllm_mapper maps to
    # visual.* / language_model.model.* / language_model.lm_head.*
    assert {k.split(".")[0] for k in keys} == {"model", "lm_head"}
    assert {k.split(".")[1] for k in keys if k.startswith("model.")} == {
        "visual",
        "language_model",
    }
    deepstack = {
        k.split(".")[3] for k in keys if k.startswith("model.visual.deepstack_merger_list.")
    }
    assert deepstack == {str(i) for i in range(len(row.deepstack))}
    # The tiny hybrid LM: layer 0 Gated DeltaNet, layer 1 full attention.
    layers = "model.language_model.layers."
    assert any(k.startswith(layers + "0.linear_attn.") for k in keys) == row.hybrid
    assert any(k.startswith(layers + "1.self_attn.") for k in keys)
    model_cls = getattr(transformers, row.model)
    _, info = model_cls.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info.get("mismatched_keys")


@pytest.mark.parametrize("arch", MOE)
def test_qwen_moe_experts_in_published_layout(qwen_ckpts, arch):
    """The experts as the hub has them (which vLLM's loader reads as they
    are), and transformers' loader turning them back into its own layout."""
    import torch
    import transformers

    from hivtp_vllm.tools.checkpoints import build_config, tokenizer_for

    ckpt, row = qwen_ckpts[arch], QWEN[arch]
    experts, hidden, inter, layers = 4, 128, 48, 2
    # Neither matrix fits the other orientation: 2I != H, I != H.
    assert 2 * inter != hidden and inter != hidden
    if row.experts == "transposed":  # fused, [E, H, 2I] and [E, I, H]
        want = {
            "gate_up_proj": (experts, hidden, 2 * inter),
            "down_proj": (experts, inter, hidden),
        }
    else:  # experts.N.{gate,up,down}_proj.weight, [out, in] each
        want = {
            f"{e}.{name}.weight": shape
            for e in range(experts)
            for name, shape in (
                ("gate_proj", (inter, hidden)),
                ("up_proj", (inter, hidden)),
                ("down_proj", (hidden, inter)),
            )
        }
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        file = {k: f.get_tensor(k) for k in f.keys()}
    for layer in range(layers):
        stem = f"model.language_model.layers.{layer}.mlp.experts."
        got = {k[len(stem) :]: tuple(t.shape) for k, t in file.items() if k.startswith(stem)}
        assert got == want, layer

    family = FAMILIES[arch]
    config = build_config(arch, "tiny", None, tokenizer_for(family))
    text = config.text_config
    assert (text.num_experts, text.hidden_size, text.moe_intermediate_size) == (
        experts,
        hidden,
        inter,
    )
    model_cls = getattr(transformers, row.model)
    torch.manual_seed(0)
    fresh = model_cls(config).state_dict()
    loaded = model_cls.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    assert fresh.keys() == loaded.keys()
    fused = [k for k in fresh if ".mlp.experts." in k]
    assert len(fused) == 2 * layers  # gate_up_proj [E, 2I, H], down_proj [E, H, I]
    for k in fused:
        shape = (
            (experts, 2 * inter, hidden) if k.endswith("gate_up_proj") else (experts, hidden, inter)
        )
        assert tuple(fresh[k].shape) == shape, k
    differ = [k for k in fresh if not torch.equal(fresh[k], loaded[k])]
    assert not differ


def test_qwen_same_seed_same_bytes(tmp_path):
    a = make_checkpoint(tmp_path / "a", size="tiny", arch="qwen3-vl")
    b = make_checkpoint(tmp_path / "b", size="tiny", arch="qwen3-vl")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with pytest.raises(ValueError):
        make_checkpoint(tmp_path / "c", arch="qwen3-vl", image_size=336)


@pytest.mark.parametrize("arch", list(QWEN))
def test_qwen_bench_language_model_dominates(arch):
    from hivtp_vllm.tools.checkpoints import build_config, build_qwen_tokenizer

    config = build_config(arch, "bench", None, build_qwen_tokenizer())
    flops = flops_per_image(config)  # a 448 px square image
    assert flops["visual_tokens"] == (256 if arch == "qwen2.5-vl" else 196)
    # flops_per_image counts the LM as dense (every layer full attention and
    # a SwiGLU MLP of intermediate_size), MoE and Gated DeltaNet LMs as well:
    # the bench MoE LMs' active experts (2 of 4, of 48) make about a quarter
    # of that, some 5x the tower, which this bound does not see.
    assert flops["lm_to_vision"] >= 10
    assert config.vision_config.depth >= 8
    tiny = build_config(arch, "tiny", None, build_qwen_tokenizer())
    assert tiny.vision_config.patch_size == config.vision_config.patch_size


# Stock vLLM (no plugin: VLLM_PLUGINS names none) in a fresh interpreter, so
# what this session's plugin registered cannot stand in for vLLM's own Qwen
# classes. Per checkpoint, in its family's dtype: vLLM's loader refuses
# missing or unexpected weight names, so loading is the key-name check; a few
# loaded tensors are compared with the file's, cast to the loaded dtype; one
# chat with an image and one with a video (JPEG frames).
STOCK_VLLM_SCRIPT = r"""
import base64, contextlib, io, json, sys, time
import numpy as np, torch
from PIL import Image
from safetensors import safe_open
from hivtp_vllm.tools.local_server import in_process_llm

def noise(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))

def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()

video = "data:video/jpeg;base64," + ",".join(jpeg(noise(320, 240, s)) for s in range(8))
PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."))
results = {}
# Engines stay referenced to the end: a dropped engine tears down vLLM's
# global parallel groups when it is collected, under the next one.
stack, engines = contextlib.ExitStack(), []
for ckpt, dtype in json.loads(sys.argv[1]):
    start = time.perf_counter()
    with safe_open(ckpt + "/model.safetensors", "pt") as f:
        file = {k: f.get_tensor(k) for k in f.keys()}
    if True:
        llm = stack.enter_context(in_process_llm(ckpt, max_model_len=8192, dtype=dtype))
        engines.append(llm)
        def tensors(model):
            params = {k: v.detach().cpu() for k, v in model.named_parameters()}
            return type(model).__module__, params
        (loaded,) = llm.apply_model(tensors)
        module, params = loaded
        # every tensor vLLM keeps under its own name and shape (not the fused
        # q/k/v and gate/up projections or MoE experts, nor the linear weights
        # vLLM's CPU backend repacks and leaves empty) holds the file's values
        same, compared, dtypes = True, [], set()
        for key, value in file.items():
            name = next(new + key[len(old):] for old, new in PREFIXES if key.startswith(old))
            if name in params and params[name].shape == value.shape:
                compared.append(name)
                dtypes.add(str(params[name].dtype))
                same &= bool(torch.equal(params[name], value.to(params[name].dtype)))
        ask = lambda part: llm.chat(
            [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}],
            use_tqdm=False)[0]
        image = ask({"type": "image_pil", "image_pil": noise(500, 300, 0)})
        clip = ask({"type": "video_url", "video_url": {"url": video}})
        results[ckpt] = {"class": module, "same": same, "compared": compared,
                         "dtypes": sorted(dtypes),
                         "image_ids": image.prompt_token_ids,
                         "video_ids": clip.prompt_token_ids,
                         "text": image.outputs[0].text,
                         "seconds": time.perf_counter() - start}
print("RESULTS " + json.dumps(results), flush=True)
stack.close()
"""


@pytest.fixture(scope="module")
def stock_vllm(qwen_ckpts) -> dict[str, dict]:
    import os
    import subprocess
    import sys

    env = dict(os.environ, VLLM_PLUGINS="none-stock-vllm", HF_HUB_OFFLINE="1")
    # MoE checkpoints first: the engines of one process share vLLM's parallel
    # groups, set up by the first one, which makes the expert-parallel group
    # only for a MoE model (a MoE engine after a dense one finds none).
    order = sorted(qwen_ckpts, key=lambda arch: QWEN[arch].experts is None)
    runs = [[str(qwen_ckpts[arch]), FAMILIES[arch].dtype] for arch in order]
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_VLLM_SCRIPT, json.dumps(runs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.server
@pytest.mark.parametrize("arch", list(QWEN))
def test_qwen_stock_vllm_loads_and_counts_like_transformers(qwen_ckpts, stock_vllm, arch):
    from transformers import AutoProcessor

    ckpt = qwen_ckpts[arch]
    got = stock_vllm[str(ckpt)]
    assert got["class"] == f"vllm.model_executor.models.{QWEN[arch].vllm_module}"
    assert got["same"], got["compared"]
    assert f"torch.{FAMILIES[arch].dtype}" in got["dtypes"]  # loaded as the family's
    for name in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"):
        assert name in got["compared"]
    assert sum(n.startswith("visual.") for n in got["compared"]) >= 16
    assert isinstance(got["text"], str)

    proc = AutoProcessor.from_pretrained(ckpt)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    ]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    hf = proc(text=[text], images=[noise(500, 300, 0)], return_tensors="pt")
    assert got["image_ids"] == hf["input_ids"][0].tolist()
    image_pads = got["image_ids"].count(proc.image_token_id)
    assert image_pads == int(hf["image_grid_thw"][0].prod()) // 4

    frames = [noise(320, 240, s) for s in range(8)]
    thw = proc.video_processor(videos=[frames], do_sample_frames=False, return_tensors="pt")[
        "video_grid_thw"
    ][0]
    assert got["video_ids"].count(proc.video_token_id) == int(thw.prod()) // 4
    assert got["video_ids"].count(proc.image_token_id) == 0
