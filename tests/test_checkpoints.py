"""The random-weight checkpoints: real layout, real classes, deterministic."""

from __future__ import annotations

import json

from safetensors import safe_open

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
