"""Random-weight LLaVA checkpoints that vLLM can load and serve, built offline.

HIVTP is tested and benchmarked without downloading a real LLaVA: this module
writes a checkpoint directory with the *real* transformers classes and the
*real* Hugging Face hub file layout of ``llava-hf/llava-1.5-7b-hf`` (or
``llava-hf/llava-v1.6-mistral-7b-hf``), only smaller and with random weights.
Everything that decides how many visual tokens an image gets is kept as in
the originals (CLIP patch 14, ``vision_feature_layer=-2``, the "default"
feature strategy that drops CLS, LLaVA-NeXT's grid pinpoints), so token
counts, placeholder handling and the vision/LM cost split behave like the
real models while weights stay small enough for a 2-core CPU.

Nothing touches the network: the tokenizer is a byte-level BPE trained on
Python's own docstrings, and weights come from the model's own initialiser
under a fixed seed, so the same command writes byte-identical files.

Qwen2.5-VL and Qwen3-VL (``--arch qwen2.5-vl|qwen3-vl``) are written the
same way, with Qwen's own tokens, chat template and processors (see
``make_qwen_checkpoint``).

CLI: ``make-model OUT_DIR --size tiny|bench --arch llava|llava-next|
llava-onevision|qwen2.5-vl|qwen3-vl --image-size 336 --seed 0``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
)

__all__ = [
    "SIZES",
    "ARCHS",
    "QWEN_SIZES",
    "QWEN_ARCHS",
    "make_checkpoint",
    "flops_per_image",
    "main",
]

PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# 4094 trained tokens + <image> + <pad> = 4096, like llava-hf's 32000 + 2.
BPE_VOCAB = 4094
CORPUS_MODULES = (
    "builtins",
    "argparse",
    "collections",
    "functools",
    "inspect",
    "json",
    "pathlib",
    "re",
)

# LLaVA-1.5 prompt format ("USER: <image>\n... ASSISTANT:"). It loops over
# message['content'], which is what makes vLLM detect the "openai" content
# format and pass parts as {"type": "image"} / {"type": "text"}; plain string
# content (vLLM's "string" format, with "<image>" already in the text) works
# too. "image_url" is accepted for callers that render raw OpenAI messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url'] %}{{ '<image>\n' }}"
    "{% elif part['type'] in ['video', 'video_url'] %}{{ '<video>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Tower shapes. "tiny" is for functional tests (vLLM starts in seconds);
# "bench" keeps LLaVA-1.5's property that the LM, not the vision tower,
# dominates per-image prefill cost (>= 10x in FLOPs, see flops_per_image).
# CLIP keeps 12 layers in both so layer-indexed logic (feature layer -2,
# middle-band scoring) has real depth to work with.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 12,
        },
        "text": {
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
    },
    "bench": {
        "vision": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_attention_heads": 2,
            "num_hidden_layers": 12,
        },
        "text": {
            "hidden_size": 768,
            "intermediate_size": 2048,
            "num_attention_heads": 12,
            "num_hidden_layers": 8,
        },
    },
    # CLIP-L/14 as in LLaVA-1.5-7B with a tiny LM: for measuring the vision
    # tower at full size (its weights file is about 1.2 GB).
    "clip-l": {
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
        },
        "text": {
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
    },
}


@dataclass(frozen=True)
class Arch:
    """What differs between LLaVA-1.5 and LLaVA-NeXT: classes and extra config."""

    config_cls: type[PreTrainedConfig]
    model_cls: type[PreTrainedModel]
    processor_cls: type
    image_processor_cls: type
    # LLaVA-NeXT "anyres" grids in units of tiles (rows, cols); scaled by the
    # tile size so 336px gives exactly llava-v1.6's image_grid_pinpoints.
    grid_tiles: tuple[tuple[int, int], ...] = ()
    # LLaVA-OneVision: a SigLIP tower (no CLS, every position a patch, the
    # last layer's features) and a Qwen2 language model, 384 px tiles.
    siglip: bool = False
    image_size: int = 336


ARCHS: dict[str, Arch] = {
    "llava": Arch(LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, CLIPImageProcessor),
    "llava-next": Arch(
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaNextImageProcessor,
        grid_tiles=((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)),
    ),
    # llava-onevision-qwen2-*-ov-hf: every grid of 1..6 x 1..6 tiles of 384 px.
    "llava-onevision": Arch(
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        LlavaOnevisionImageProcessor,
        grid_tiles=tuple((r, c) for r in range(1, 7) for c in range(1, 7)),
        siglip=True,
        image_size=384,
    ),
}

# transformers >= 4.52 names modules model.vision_tower.* etc. in memory (and
# 5.x saves the vision tower as vision_tower.embeddings.*, without
# "vision_model."). The hub checkpoints - and vLLM's CLIPVisionModel, which
# has a vision_model submodule - use the older layout below, so keys are
# renamed to it explicitly. First matching prefix wins.
HUB_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def _corpus() -> list[str]:
    """English-ish training text that ships with Python: stdlib docstrings.

    Deterministic for a given interpreter and needs no download; a few
    hundred KB is plenty for a 4k-token BPE.
    """
    texts = []
    for mod in map(importlib.import_module, CORPUS_MODULES):
        for name in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, name, None))
            if doc:
                texts.append(doc)
    return texts


def _train_bpe(vocab_size: int, special_tokens: list[str], unk: str | None) -> Tokenizer:
    """Byte-level BPE trained on ``_corpus()`` (deterministic, no download)."""
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(video: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama's special ids (<unk>=0, <s>=1, </s>=2).

    ``<image>`` and ``<pad>`` are added after training, as in llava-hf, so
    the image token is a single unsplittable special token at the end of the
    vocab. Byte-level means any text encodes without <unk>.
    """
    tok = _train_bpe(BPE_VOCAB, [UNK, BOS, EOS], unk=UNK)
    # Prepend BOS on plain encode (like LlamaTokenizer); the chat template
    # writes {{ bos_token }} itself and vLLM tokenises chats without specials.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=32768 if video else 4096,
        padding_side="left",
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN] if video else [IMAGE_TOKEN]}
    )
    fast.add_special_tokens({"pad_token": PAD})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pinpoints(arch: str, image_size: int) -> dict[str, list[list[int]]]:
    """``image_grid_pinpoints`` kwarg (config and image processor) for anyres archs."""
    tiles = ARCHS[arch].grid_tiles
    if not tiles:
        return {}
    return {"image_grid_pinpoints": [[r * image_size, c * image_size] for r, c in tiles]}


def build_config(
    arch: str, size: str, image_size: int, tokenizer: PreTrainedTokenizerFast
) -> PreTrainedConfig:
    """LLaVA config: a CLIP-L/14-style tower + Llama LM (OneVision: SigLIP +
    Qwen2), shapes from SIZES."""
    if image_size % PATCH_SIZE and not ARCHS[arch].siglip:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    spec, shape = ARCHS[arch], SIZES[size]
    grid = image_size // PATCH_SIZE
    if spec.siglip:
        vision = SiglipVisionConfig(**shape["vision"], image_size=image_size, patch_size=PATCH_SIZE)
    else:
        vision = CLIPVisionConfig(
            **shape["vision"],
            image_size=image_size,
            patch_size=PATCH_SIZE,
            projection_dim=shape["vision"]["hidden_size"],
        )
    text = (Qwen2Config if spec.siglip else LlamaConfig)(
        **shape["text"],
        num_key_value_heads=shape["text"]["num_attention_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=32768 if spec.siglip else 4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    tower = (
        {"vision_feature_layer": -1, "vision_feature_select_strategy": "full"}
        if spec.siglip
        else {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    )
    extra = {}
    if spec.siglip:
        extra = {
            "video_token_index": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
            "vision_aspect_ratio": "anyres_max_9",
        }
    else:
        extra = {"image_seq_length": grid * grid}
    return spec.config_cls(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **tower,
        **extra,
        **_pinpoints(arch, image_size),
    )


def build_processor(
    arch: str, image_size: int, tokenizer: PreTrainedTokenizerFast
) -> ProcessorMixin:
    """LlavaProcessor / LlavaNextProcessor that inserts grid**2 tokens per tile.

    ``num_additional_image_tokens=1`` (CLIP's CLS) with the "default" strategy
    (drop CLS) gives exactly (image_size / 14)**2 tokens, as llava-hf does.
    OneVision's processor (SigLIP, "full": no CLS to drop) also gets a video
    processor, as llava-onevision-qwen2-*-ov-hf ships one.
    """
    spec = ARCHS[arch]
    if spec.siglip:
        square = {"height": image_size, "width": image_size}
        return spec.processor_cls(
            image_processor=spec.image_processor_cls(size=square, **_pinpoints(arch, image_size)),
            video_processor=LlavaOnevisionVideoProcessor(size=square),
            tokenizer=tokenizer,
            num_image_tokens=(image_size // PATCH_SIZE) ** 2,
            vision_feature_select_strategy="full",
            image_token=IMAGE_TOKEN,
            video_token=VIDEO_TOKEN,
            vision_aspect_ratio="anyres_max_9",
            chat_template=CHAT_TEMPLATE,
        )
    image_processor = spec.image_processor_cls(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **_pinpoints(arch, image_size),
    )
    return spec.processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict renamed to the hub layout vLLM's llava loaders expect."""
    out = {}
    for name, tensor in model.state_dict().items():
        new = next(
            (hub + name[len(mem) :] for mem, hub in HUB_PREFIXES if name.startswith(mem)), None
        )
        if new is None:
            raise KeyError(f"no hub prefix for parameter {name!r}")
        out[new] = tensor.detach().contiguous()
    return out


def flops_per_image(config: PreTrainedConfig) -> dict[str, int | float]:
    """Forward FLOPs (2 per multiply-add) for one image tile at full tokens.

    Vision: CLS + grid**2 tokens through the CLIP layers that actually run
    (up to ``vision_feature_layer``, i.e. L-1 for -2), with full
    bidirectional attention, plus the patch embedding. LM: the grid**2 visual
    tokens through every decoder layer (GQA-aware projections, SwiGLU MLP,
    causal attention counted as half the T x T scores). LM head excluded:
    prefill only needs logits for the last position.

    Qwen2.5-VL / Qwen3-VL configs: ``qwen_flops_per_image`` at a
    QWEN_FLOPS_IMAGE px square image.
    """
    if config.model_type in ("qwen2_5_vl", "qwen3_vl"):
        return qwen_flops_per_image(config)
    v, t = config.vision_config, config.text_config
    grid = v.image_size // v.patch_size
    # CLIP adds a CLS position to the tower's sequence; SigLIP has none.
    n_vis, n_lm = grid * grid + int(isinstance(v, CLIPVisionConfig)), grid * grid
    layer = config.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    v_layers = max(x if x >= 0 else v.num_hidden_layers + x + 1 for x in layers)
    d, i = v.hidden_size, v.intermediate_size
    vision_layer = 8 * n_vis * d * d + 4 * n_vis * d * i + 4 * n_vis * n_vis * d
    vision = v_layers * vision_layer + 2 * grid * grid * v.num_channels * v.patch_size**2 * d
    h, hd = t.hidden_size, getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    lm_layer = (
        2 * n_lm * (h * q + 2 * h * kv + q * h)
        + 6 * n_lm * h * t.intermediate_size
        + 2 * n_lm * n_lm * q
    )
    lm = t.num_hidden_layers * lm_layer
    projector = 2 * n_lm * (d * len(layers) * h + h * h)
    return {
        "visual_tokens": n_lm,
        "vision_layers_run": v_layers,
        "vision_flops": vision,
        "projector_flops": projector,
        "lm_flops": lm,
        "lm_to_vision": lm / vision,
    }


# --------------------------------------------------------------------------
# Qwen2.5-VL and Qwen3-VL
#
# Same idea as above: the real transformers classes, the real hub layout
# (transformers 5.x saves model.visual.*, model.language_model.*, lm_head.*,
# which vLLM 0.32's hf_to_vllm_mapper reads as is), and everything that
# decides token counts kept as published: patch 14 (Qwen2.5-VL) / 16
# (Qwen3-VL), temporal patch 2, 2 x 2 merge, smart_resize bounds. Images get
# grid_thw = (1, H/p, W/p) patches and prod // 4 <|image_pad|> tokens.
# --------------------------------------------------------------------------

# Qwen's special tokens, in the order of the real vocab (151643 ...): the
# vision ones are what the processors and vLLM look up by name.
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"

# Qwen2.5-VL-*-Instruct's chat_template (verbatim): a default system prompt,
# <|vision_start|><|image_pad|><|vision_end|> per image, <|video_pad|> per video.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-*-Instruct's chat_template without the tool-calling branches: no
# default system prompt; images and videos rendered exactly as the original.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class QwenArch:
    """What differs between Qwen2.5-VL and Qwen3-VL."""

    config_cls: type[PreTrainedConfig]
    model_cls: type[PreTrainedModel]
    processor_cls: type
    video_processor_cls: type
    patch_size: int
    chat_template: str
    # Published preprocessor_config.json / video_preprocessor_config.json:
    # size = {shortest_edge: min_pixels, longest_edge: max_pixels}.
    image_pixels: tuple[int, int]
    video_pixels: tuple[int, int]
    # Image normalisation (Qwen2.5-VL: CLIP's mean/std; Qwen3-VL: 0.5).
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rope_theta: float
    mrope_interleaved: bool
    # mrope_section for head_dim 128 (scaled to the checkpoint's head_dim).
    mrope_section_128: tuple[int, int, int]


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

QWEN_ARCHS: dict[str, QwenArch] = {
    # Qwen/Qwen2.5-VL-7B-Instruct: min_pixels 3136, max_pixels 12845056 for
    # images; no video_preprocessor_config.json, so transformers builds the
    # video processor from the same file (same bounds).
    "qwen2.5-vl": QwenArch(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
        patch_size=14,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        image_pixels=(3136, 12845056),
        video_pixels=(3136, 12845056),
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        rope_theta=1000000.0,
        mrope_interleaved=False,
        mrope_section_128=(16, 24, 24),
    ),
    # Qwen/Qwen3-VL-8B-Instruct: images 65536..16777216 px; videos
    # 4096..25165824 px in total over the sampled frames.
    "qwen3-vl": QwenArch(
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
        patch_size=16,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
        image_pixels=(65536, 16777216),
        video_pixels=(4096, 25165824),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        rope_theta=5000000.0,
        mrope_interleaved=True,
        mrope_section_128=(24, 20, 20),
    ),
}

# "tiny" lowers the published max_pixels: vLLM profiles the encoder with the
# largest image and video they allow (Qwen2.5-VL: 16384 merged tokens, 65536
# patches in one full-attention sequence), minutes on a CPU. Tiny images stop
# at 1280 merged tokens (the "max_pixels = 1280 * 28 * 28" of the Qwen model
# cards, transformers' Qwen2VLImageProcessor default), tiny videos at 768 per
# frame pair (qwen-vl-utils' VIDEO_MAX_TOKEN_NUM). Qwen2.5-VL's video bound is
# per frame, Qwen3-VL's is the total over the sampled frames (t * h * w).
# min_pixels stay as published.
QWEN_TINY_MAX_PIXELS = {
    "qwen2.5-vl": {"image": 1280 * 28 * 28, "video": 768 * 28 * 28},
    "qwen3-vl": {"image": 1280 * 32 * 32, "video": 2 * 768 * 32 * 32},
}

# Vision towers deep enough for a band (section 1/5 of the spec): Qwen2.5-VL
# keeps full attention every 4th layer (7B: 7, 15, 23, 31 of 32), Qwen3-VL
# takes deepstack features from three early/middle layers (8B: 8, 16, 24 of
# 27). "bench" keeps the LM >= 10x the whole tower (blocks and mergers) per
# image, like the LLaVA bench size: 33x (Qwen2.5-VL) and 18x (Qwen3-VL) at
# QWEN_FLOPS_IMAGE, still 25x / 11x at 672 px. Full attention is quadratic in
# the patches, so the ratio falls for larger images (1344 px: 11x / 4x).
QWEN_SIZES: dict[str, dict[str, dict[str, object]]] = {
    "tiny": {
        "qwen2.5-vl": {
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_heads": 4,
            "depth": 8,
            "fullatt_block_indexes": [3, 7],
        },
        "qwen3-vl": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_heads": 4,
            "depth": 8,
            "deepstack_visual_indexes": [1, 3, 5],
        },
        "text": {
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
        },
    },
    "bench": {
        "qwen2.5-vl": {
            "hidden_size": 64,
            "intermediate_size": 176,
            "num_heads": 2,
            "depth": 8,
            "fullatt_block_indexes": [3, 7],
        },
        "qwen3-vl": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_heads": 2,
            "depth": 8,
            "deepstack_visual_indexes": [1, 3, 5],
        },
        "text": {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "num_hidden_layers": 10,
        },
    },
}
# Image size at which flops_per_image reports Qwen checkpoints: a multiple
# of both 28 and 32, so neither processor resizes it (32 x 32 patches for
# Qwen2.5-VL, 28 x 28 for Qwen3-VL).
QWEN_FLOPS_IMAGE = 448


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The module's byte-level BPE with Qwen's special tokens after it.

    As in the real Qwen tokenizers: no BOS is ever added, ``<|im_end|>`` is
    EOS, ``<|endoftext|>`` is padding, and every ``<|...|>`` token is a
    single unsplittable special token at the end of the vocab.
    """
    tok = _train_bpe(BPE_VOCAB + 2 - len(QWEN_SPECIALS), [], unk=None)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    return fast


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids(QWEN_IMAGE_TOKEN),
        "video_token_id": ids(QWEN_VIDEO_TOKEN),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def build_qwen_config(arch: str, size: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedConfig:
    """Qwen2_5_VLConfig / Qwen3VLConfig with the shapes of QWEN_SIZES."""
    spec, shape = QWEN_ARCHS[arch], QWEN_SIZES[size]
    text_shape = dict(shape["text"])
    head_dim = text_shape["hidden_size"] // text_shape["num_attention_heads"]
    section = [s * head_dim // 128 for s in spec.mrope_section_128]
    section[0] += head_dim // 2 - sum(section)  # sums to head_dim / 2 exactly
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": section}
    if spec.mrope_interleaved:
        rope["mrope_interleaved"] = True
    tokens = _qwen_token_ids(tokenizer)
    text = dict(
        **text_shape,
        vocab_size=len(tokenizer),
        max_position_embeddings=128000 if arch == "qwen2.5-vl" else 262144,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        rope_parameters=rope,
        bos_token_id=tokenizer.pad_token_id,  # <|endoftext|>, as published
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = dict(
        **shape[arch],
        out_hidden_size=text_shape["hidden_size"],
        in_channels=3,
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        spatial_merge_size=2,
    )
    if arch == "qwen2.5-vl":
        vision.update(hidden_act="silu", window_size=112, tokens_per_second=2)
        text.update(use_sliding_window=False, sliding_window=32768, max_window_layers=28)
    else:
        text["head_dim"] = head_dim
        vision.update(hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304)
    return spec.config_cls(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens
    )


def _qwen_pixels(arch: str, size: str, modality: str) -> tuple[int, int]:
    spec = QWEN_ARCHS[arch]
    low, high = spec.image_pixels if modality == "image" else spec.video_pixels
    if size == "tiny":
        high = min(high, QWEN_TINY_MAX_PIXELS[arch][modality])
    return low, high


def build_qwen_processor(
    arch: str, size: str, tokenizer: PreTrainedTokenizerFast
) -> ProcessorMixin:
    """Qwen2_5_VLProcessor / Qwen3VLProcessor with image AND video processors."""
    spec = QWEN_ARCHS[arch]
    common = dict(
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )
    lo, hi = _qwen_pixels(arch, size, "image")
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": lo, "longest_edge": hi}, **common
    )
    lo, hi = _qwen_pixels(arch, size, "video")
    video_processor = spec.video_processor_cls(
        size={"shortest_edge": lo, "longest_edge": hi}, **common
    )
    return spec.processor_cls(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=spec.chat_template,
    )


def _qwen_window_attention_flops(h: int, w: int, v: PreTrainedConfig) -> int:
    """Score + weighted-sum FLOPs of one windowed Qwen2.5-VL layer over an
    h x w patch grid: the windows of ``get_window_index`` (window_size px
    square in merged tokens, cut at the right and bottom edges)."""
    merge = v.spatial_merge_size
    side = v.window_size // merge // v.patch_size  # merged tokens per window side
    hm, wm = h // merge, w // merge
    total = 0
    for r in range(0, hm, side):
        for c in range(0, wm, side):
            n = min(side, hm - r) * min(side, wm - c) * merge * merge
            total += 4 * n * n * v.hidden_size
    return total


def qwen_flops_per_image(
    config: PreTrainedConfig, height: int = QWEN_FLOPS_IMAGE, width: int = QWEN_FLOPS_IMAGE
) -> dict[str, int | float]:
    """Forward FLOPs (2 per multiply-add) of one Qwen-VL image at full tokens.

    Assumes height and width are already multiples of patch_size * 2 (no
    resize). Vision: the Conv3d patch embedding (2 temporal copies of the
    image), every block (QKV + output projections, the MLP: SwiGLU in
    Qwen2.5-VL, GELU in Qwen3-VL, attention over the whole image in the
    full-attention layers and over each window in the others). Projector:
    the 2 x 2 merger, plus Qwen3-VL's deepstack mergers. LM: the merged
    tokens through every decoder layer (as for LLaVA). ``lm_to_vision`` is
    LM / (vision + projector): the whole ``visual`` module.
    """
    v, t = config.vision_config, config.text_config
    merge = v.spatial_merge_size
    h, w = height // v.patch_size, width // v.patch_size
    n_vis = h * w
    n_lm = n_vis // (merge * merge)
    d, i = v.hidden_size, v.intermediate_size
    qwen3 = config.model_type == "qwen3_vl"
    mlp = (4 if qwen3 else 6) * n_vis * d * i
    block = 8 * n_vis * d * d + mlp
    full_attn = 4 * n_vis * n_vis * d
    if qwen3:
        full_layers, window_attn = v.depth, 0
    else:
        full_layers = len(v.fullatt_block_indexes)
        window_attn = (v.depth - full_layers) * _qwen_window_attention_flops(h, w, v)
    embed = 2 * n_vis * v.in_channels * v.temporal_patch_size * v.patch_size**2 * d
    vision = v.depth * block + full_layers * full_attn + window_attn + embed
    merged = d * merge * merge
    mergers = 1 + (len(v.deepstack_visual_indexes) if qwen3 else 0)
    projector = mergers * 2 * n_lm * (merged * merged + merged * v.out_hidden_size)
    hid = t.hidden_size
    hd = getattr(t, "head_dim", None) or hid // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    lm_layer = (
        2 * n_lm * (hid * q + 2 * hid * kv + q * hid)
        + 6 * n_lm * hid * t.intermediate_size
        + 2 * n_lm * n_lm * q
    )
    lm = t.num_hidden_layers * lm_layer
    return {
        "visual_tokens": n_lm,
        "vision_layers_run": v.depth,
        "vision_flops": vision,
        "projector_flops": projector,
        "lm_flops": lm,
        "lm_to_vision": lm / (vision + projector),
    }


def make_qwen_checkpoint(
    out_dir: str | Path, size: str = "tiny", arch: str = "qwen2.5-vl", seed: int = 0
) -> Path:
    """Write a servable random-weight Qwen2.5-VL / Qwen3-VL checkpoint.

    Files: config.json, generation_config.json, model.safetensors (the key
    names transformers 5.x saves: model.visual.*, model.language_model.*,
    lm_head.*), tokenizer.json / tokenizer_config.json, chat_template.jinja,
    processor_config.json, preprocessor_config.json and
    video_preprocessor_config.json. Deterministic for a given seed.
    """
    if arch not in QWEN_ARCHS or size not in QWEN_SIZES:
        raise ValueError(f"arch must be one of {list(QWEN_ARCHS)}, size one of {list(QWEN_SIZES)}")
    spec = QWEN_ARCHS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    config = build_qwen_config(arch, size, tokenizer)
    torch.manual_seed(seed)
    model = spec.model_cls(config).eval()
    state = {k: t.detach().contiguous() for k, t in model.state_dict().items()}
    weights = out / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)
    config.architectures = [spec.model_cls.__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    processor = build_qwen_processor(arch, size, tokenizer)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    processor.video_processor.save_pretrained(out)  # video_preprocessor_config.json
    return out


def make_checkpoint(
    out_dir: str | Path,
    size: str = "tiny",
    arch: str = "llava",
    image_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a complete, servable random-weight checkpoint to ``out_dir``.

    Files: config.json, generation_config.json, model.safetensors (hub key
    layout), tokenizer files, chat_template.jinja, processor_config.json and
    preprocessor_config.json. Weights use each submodule's own initialiser
    (std = initializer_range 0.02 for Llama, CLIP's scaled init) under
    ``torch.manual_seed(seed)``, so activations stay finite and reruns are
    byte-identical.

    ``arch="qwen2.5-vl"`` / ``"qwen3-vl"`` (sizes "tiny", "bench"; no
    ``image_size``: Qwen resizes each image itself) goes to
    ``make_qwen_checkpoint``.
    """
    if arch in QWEN_ARCHS:
        if image_size is not None:
            raise ValueError(f"{arch} takes no image_size (images keep their own size)")
        return make_qwen_checkpoint(out_dir, size, arch, seed)
    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"arch must be one of {list(ARCHS)}, size one of {list(SIZES)}")
    image_size = image_size or ARCHS[arch].image_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(video=ARCHS[arch].siglip)
    config = build_config(arch, size, image_size, tokenizer)
    torch.manual_seed(seed)
    model = ARCHS[arch].model_cls(config).eval()
    # Same metadata as save_pretrained; transformers refuses files without it.
    weights = out / "model.safetensors"
    save_file(hub_state_dict(model), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; keep it readable like the other files
    config.architectures = [ARCHS[arch].model_cls.__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(out)
    processor = build_processor(arch, image_size, tokenizer)
    processor.save_pretrained(out)  # tokenizer + processor_config + chat template
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    return out


def summary(out_dir: str | Path) -> str:
    """One line: tower sizes, patch grid, visual tokens and FLOPs per image."""
    out = Path(out_dir)
    cfg = AutoConfig.from_pretrained(out)
    if cfg.model_type in ("qwen2_5_vl", "qwen3_vl"):
        return _qwen_summary(out, cfg)
    counts: dict[str, int] = {}
    with safe_open(str(out / "model.safetensors"), "pt") as st:  # shapes only, no tensors
        for key in st.keys():
            top = key.split(".")[0]
            counts[top] = counts.get(top, 0) + math.prod(st.get_slice(key).get_shape())
    f = flops_per_image(cfg)
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return (
        f"{out}: {cfg.model_type} vision {counts['vision_tower'] / 1e6:.2f}M params "
        f"LM {counts['language_model'] / 1e6:.2f}M params, grid {grid}x{grid}, "
        f"{f['visual_tokens']} visual tokens/image, GFLOPs/image vision "
        f"{f['vision_flops'] / 1e9:.2f} ({f['vision_layers_run']} layers) "
        f"LM {f['lm_flops'] / 1e9:.2f} ratio {f['lm_to_vision']:.1f}x"
    )


def _qwen_summary(out: Path, cfg: PreTrainedConfig) -> str:
    counts = {"vision": 0, "LM": 0}
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        for key in st.keys():
            part = "vision" if key.startswith("model.visual.") else "LM"
            counts[part] += math.prod(st.get_slice(key).get_shape())
    f = flops_per_image(cfg)
    v = cfg.vision_config
    grid = QWEN_FLOPS_IMAGE // v.patch_size
    layout = (
        f"full attention {list(v.fullatt_block_indexes)}"
        if cfg.model_type == "qwen2_5_vl"
        else f"deepstack {list(v.deepstack_visual_indexes)}"
    )
    return (
        f"{out}: {cfg.model_type} vision {counts['vision'] / 1e6:.2f}M params "
        f"({v.depth} layers, {layout}) LM {counts['LM'] / 1e6:.2f}M params; "
        f"{QWEN_FLOPS_IMAGE}px image: {grid}x{grid} patches, "
        f"{f['visual_tokens']} visual tokens, GFLOPs vision+merger "
        f"{(f['vision_flops'] + f['projector_flops']) / 1e9:.2f} "
        f"LM {f['lm_flops'] / 1e9:.2f} ratio {f['lm_to_vision']:.1f}x"
    )


def main(argv: list[str] | None = None) -> int:
    """``make-model`` entry point: write a checkpoint and print its summary."""
    parser = argparse.ArgumentParser(prog="make-model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--arch", choices=[*ARCHS, *QWEN_ARCHS], default="llava")
    parser.add_argument(
        "--image-size",
        type=int,
        help="tile size in px (default: 336; OneVision 384; LLaVA archs only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_checkpoint(args.out_dir, args.size, args.arch, args.image_size, args.seed)
    print(summary(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
