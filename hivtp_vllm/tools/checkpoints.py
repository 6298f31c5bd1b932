"""Random-weight checkpoints that vLLM can load and serve, built offline.

HIVTP is tested and benchmarked without downloading a real model: this
module writes a checkpoint directory with the *real* transformers classes and
the *real* Hugging Face hub file layout of the family's published checkpoints
(``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2.5-VL-7B-Instruct``...), only
smaller and with random weights. Everything that decides how many visual
tokens an image gets is kept as in the originals (patch size, feature layer
and strategy, anyres grid pinpoints, pixel bounds, the 2 x 2 merge), so token
counts, placeholder handling and the vision/LM cost split behave like the real
models while weights stay small enough for a 2-core CPU.

What a family's checkpoint is made of is its row's
:class:`hivtp_vllm.families.Checkpoint`; this module holds the two recipes
that read it, chosen by ``Family.layout``: a CLIP or SigLIP tower over tiles
and a separate LM ("single", "anyres"), or a packed native-resolution tower
with M-RoPE ("merged", the Qwen-VL families). A family of either layout is a
row in ``FAMILIES``, not an edit here.

Nothing touches the network: the tokenizer is a byte-level BPE trained on
Python's own docstrings, and weights come from the model's own initialiser
under a fixed seed, so the same command writes byte-identical files.

CLI: ``make-model OUT_DIR --arch FAMILY --size tiny|bench|clip-l
[--image-size PX] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from hivtp_vllm.families import FAMILIES, LLAVA_CHAT_TEMPLATE, Family, by_name, of_config

__all__ = [
    "SIZES",
    "MERGED_SIZES",
    "POOLED_SIZES",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "build_qwen_tokenizer",
    "build_merged_tokenizer",
    "build_fixed_tokenizer",
    "tokenizer_for",
    "make_checkpoint",
    "published_experts",
    "flops_per_image",
    "summary",
    "main",
]

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

# Shapes of the tiled layouts ("single", "anyres"): the CLIP or SigLIP tower
# and the LM. "tiny" is for functional tests (vLLM starts in seconds);
# "bench" keeps LLaVA-1.5's property that the LM, not the vision tower,
# dominates per-image prefill cost (>= 10x in FLOPs, see flops_per_image).
# The tower keeps 12 layers in both so layer-indexed logic (feature layer -2,
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

# LM shapes of the "merged" layout; its towers' shapes are each family's
# (``Checkpoint.vision_sizes``: deep enough for a band, docs/algorithm.md,
# "1. Importance"). "bench" keeps the LM >= 10x the whole tower (blocks and
# mergers) per image, like the tiled bench size: 33x (Qwen2.5-VL) and 18x
# (Qwen3-VL) at MERGED_FLOPS_IMAGE, still 25x / 11x at 672 px. Full attention
# is quadratic in the patches, so the ratio falls for larger images (1344 px:
# 11x / 4x).
MERGED_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
    },
    "bench": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_hidden_layers": 10,
    },
}
# Shapes of the "pooled" layout (Gemma 3): a SigLIP tower deep enough for a
# band, and a Gemma 3 LM of one sliding-window and one global layer.
POOLED_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 8,
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "num_hidden_layers": 2,
        },
    },
}

# Image size at which flops_per_image reports "merged" checkpoints: a
# multiple of both 28 and 32, so neither Qwen-VL processor resizes it (32 x 32
# patches for Qwen2.5-VL, 28 x 28 for Qwen3-VL).
MERGED_FLOPS_IMAGE = 448

# transformers >= 4.52 names modules model.vision_tower.* etc. in memory (and
# 5.x saves the vision tower as vision_tower.embeddings.*, without
# "vision_model."). The llava-hf hub checkpoints - and vLLM's CLIPVisionModel,
# which has a vision_model submodule - use the older layout below, so the
# tiled layouts' keys are renamed to it explicitly. First matching prefix wins.
HUB_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


# -- shared ------------------------------------------------------------------


def _pooled(family: Family) -> bool:
    """Whether the family's views are fixed-size and pooled (Gemma 3)."""
    return family.layout == "pooled"


def _merged(family: Family) -> bool:
    """Whether the family's tower packs native-resolution images into merged
    tokens (the Qwen-VL recipe) rather than encoding fixed-size tiles."""
    return family.layout == "merged"


def _sizes(family: Family) -> list[str]:
    """The make-model sizes the family's recipe has shapes for."""
    if _merged(family):
        return [s for s in MERGED_SIZES if s in family.checkpoint.vision_sizes]
    if _pooled(family):
        return list(POOLED_SIZES)
    return list(SIZES)


def _family(arch: str, size: str) -> Family:
    """The row of ``arch``, or a ValueError naming what is accepted."""
    family = by_name(arch)
    if size not in _sizes(family):
        raise ValueError(f"size must be one of {_sizes(family)} for {arch}, got {size!r}")
    return family


def _takes(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` names the keyword ``name``: the recipes pass an
    entry only to the classes that have it, so a family's classes, not a
    switch on the family, decide which entries its files get."""
    return name in inspect.signature(cls.__init__).parameters


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


def tokenizer_for(family: Family) -> PreTrainedTokenizerFast:
    """The tokenizer of the family's recipe: Llama-style special tokens with
    ``<image>`` (and ``<video>``) for tiled towers, Qwen's for merged ones."""
    if _merged(family):
        return build_merged_tokenizer(family)
    if _pooled(family):
        return build_fixed_tokenizer(family)
    ck = family.checkpoint
    return build_tokenizer(
        video=family.videos, max_length=ck.max_position_embeddings, chat_template=ck.chat_template
    )


def build_config(
    arch: str, size: str, image_size: int | None, tokenizer: PreTrainedTokenizerFast
) -> PreTrainedConfig:
    """The family's config with the shapes of ``size`` (``image_size``: px of
    a tile, tiled layouts only; None: the family's)."""
    family = _family(arch, size)
    if _merged(family):
        return _merged_config(family, size, tokenizer)
    if _pooled(family):
        return _pooled_config(family, size, tokenizer)
    return _tiled_config(family, size, image_size or family.checkpoint.image_size, tokenizer)


def build_processor(
    arch: str, size: str, image_size: int | None, tokenizer: PreTrainedTokenizerFast
) -> ProcessorMixin:
    """The family's processor: image processor, video processor where the
    family has one, tokenizer and chat template."""
    family = _family(arch, size)
    if _merged(family):
        return _merged_processor(family, size, tokenizer)
    if _pooled(family):
        return _pooled_processor(family, tokenizer)
    return _tiled_processor(family, image_size or family.checkpoint.image_size, tokenizer)


def make_checkpoint(
    out_dir: str | Path,
    size: str = "tiny",
    arch: str = "llava",
    image_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a complete, servable random-weight checkpoint to ``out_dir``.

    Files: config.json, generation_config.json, model.safetensors (the hub's
    key layout), tokenizer files, chat_template.jinja, processor_config.json
    and preprocessor_config.json (merged layout: and
    video_preprocessor_config.json). Weights use each submodule's own
    initialiser (std = initializer_range 0.02 for the LM, CLIP's scaled
    init) under ``torch.manual_seed(seed)``, so activations stay finite and
    reruns are byte-identical.

    ``image_size`` is a tiled family's tile size (default: its row's); a
    merged family takes none, since its processor resizes each image itself.
    """
    family = _family(arch, size)
    ck = family.checkpoint
    merged = _merged(family)
    if (merged or _pooled(family)) and image_size is not None:
        raise ValueError(f"{arch} takes no image_size (its views are the family's own)")
    image_size = image_size or ck.image_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for(family)
    config = build_config(arch, size, image_size, tokenizer)
    model_cls = ck.resolve(ck.model)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if merged:  # transformers 5.x names, which vLLM's hf_to_vllm_mapper reads as is
        state = {k: t.detach().contiguous() for k, t in model.state_dict().items()}
        state = published_experts(state, ck.experts)
    elif _pooled(family):
        state = _pooled_state_dict(model)
    else:
        state = hub_state_dict(model)
    # Same metadata as save_pretrained; transformers refuses files without it.
    weights = out / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; keep it readable like the other files
    config.architectures = [model_cls.__name__]
    config.dtype = torch.float32
    config.save_pretrained(out)
    _generation_config(family, tokenizer).save_pretrained(out)
    processor = build_processor(arch, size, image_size, tokenizer)
    processor.save_pretrained(out)  # tokenizer + processor_config + chat template
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    if merged:  # as the Qwen-VL repos ship it: video_preprocessor_config.json
        processor.video_processor.save_pretrained(out)
    if _pooled(family):
        _named_tokens_config(out / "tokenizer_config.json", tokenizer)
    return out


def published_experts(
    state: dict[str, torch.Tensor], layout: str | None
) -> dict[str, torch.Tensor]:
    """A MoE LM's fused experts (``mlp.experts.gate_up_proj`` [E, 2I, H],
    ``mlp.experts.down_proj`` [E, H, I], as the transformers model keeps and
    saves them) in the published layout (``Checkpoint.experts``), which
    transformers' loader converts back and vLLM's loads as it is."""
    if layout is None:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        stem, _, name = key.rpartition("mlp.experts.")
        if name not in ("gate_up_proj", "down_proj"):
            out[key] = tensor
        elif layout == "transposed":
            out[key] = tensor.transpose(1, 2).contiguous()
        elif name == "down_proj":
            for e, matrix in enumerate(tensor):
                out[f"{stem}mlp.experts.{e}.down_proj.weight"] = matrix.contiguous()
        else:
            for e, matrix in enumerate(tensor):
                gate, up = matrix.chunk(2)
                out[f"{stem}mlp.experts.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{stem}mlp.experts.{e}.up_proj.weight"] = up.contiguous()
    return out


def _generation_config(family: Family, tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """generation_config.json as published: Llama's ids, or a merged
    family's (no BOS: ``<|endoftext|>`` stands in; each of
    ``Checkpoint.end_tokens`` ends a reply: Qwen's ``<|im_end|>`` and
    ``<|endoftext|>``, GLM's ``<|endoftext|>``, ``<|user|>``, ``<|observation|>``)."""
    if _merged(family):
        return GenerationConfig(
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(list(family.checkpoint.end_tokens)),
            pad_token_id=tokenizer.pad_token_id,
        )
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _lm_flops(text: PreTrainedConfig, tokens: int) -> int:
    """Forward FLOPs (2 per multiply-add) of ``tokens`` visual tokens through
    every decoder layer: GQA-aware projections, causal attention counted as
    half the T x T scores, and the MLP: SwiGLU, or for a MoE LM the experts a
    token is routed to (``num_experts_per_tok``), any shared expert and the
    router. A hybrid LM's linear-attention layers (``layer_types``) count
    their projections and the per-token state update instead of attention.
    LM head excluded: prefill only needs logits for the last position."""
    hid = text.hidden_size
    hd = getattr(text, "head_dim", None) or hid // text.num_attention_heads
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    attention = 2 * tokens * (hid * q + 2 * hid * kv + q * hid) + 2 * tokens * tokens * q
    experts = getattr(text, "num_experts", None)
    if experts:
        shared = getattr(text, "shared_expert_intermediate_size", 0) or 0
        routed = text.moe_intermediate_size * text.num_experts_per_tok
        mlp = 6 * tokens * hid * (routed + shared) + 2 * tokens * hid * experts
    else:
        mlp = 6 * tokens * hid * text.intermediate_size
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    linear = sum(t == "linear_attention" for t in types)
    if linear:
        k = text.linear_num_key_heads * text.linear_key_head_dim
        v = text.linear_num_value_heads * text.linear_value_head_dim
        heads = text.linear_num_value_heads
        delta = 2 * tokens * (hid * (2 * k + 2 * v + 2 * heads) + v * hid) + 4 * tokens * heads * (
            text.linear_key_head_dim * text.linear_value_head_dim
        )
    else:
        delta = 0
    return (len(types) - linear) * (attention + mlp) + linear * (delta + mlp)


def flops_per_image(
    config: PreTrainedConfig, height: int = MERGED_FLOPS_IMAGE, width: int = MERGED_FLOPS_IMAGE
) -> dict[str, int | float]:
    """Forward FLOPs (2 per multiply-add) of one image at full tokens.

    The vision side is counted per tower kind: one tile (tiled layouts;
    ``height`` and ``width`` unused) or a ``height x width`` image (merged
    layout, :data:`MERGED_FLOPS_IMAGE` px square by default); the LM side is
    :func:`_lm_flops` of the visual tokens either way. ``lm_to_vision`` is
    LM / vision (tiled) or LM / (vision + projector) (merged: the whole
    ``visual`` module).
    """
    family = of_config(config)
    if family is not None and _merged(family):
        vision = _merged_vision_flops(family, config, height, width)
        lm = _lm_flops(config.text_config, vision["visual_tokens"])
        return {
            **vision,
            "lm_flops": lm,
            "lm_to_vision": lm / (vision["vision_flops"] + vision["projector_flops"]),
        }
    vision = _tiled_vision_flops(config)
    lm = _lm_flops(config.text_config, vision["visual_tokens"])
    return {**vision, "lm_flops": lm, "lm_to_vision": lm / vision["vision_flops"]}


def summary(out_dir: str | Path) -> str:
    """One line: tower sizes, patch grid, visual tokens and FLOPs per image."""
    out = Path(out_dir)
    cfg = AutoConfig.from_pretrained(out)
    family = of_config(cfg)
    if family is not None and _merged(family):
        return _merged_summary(out, cfg)
    return _tiled_summary(out, cfg)


def _param_counts(weights: Path, part: Callable[[str], str]) -> dict[str, int]:
    """Parameters per ``part(key)`` of a safetensors file (shapes only, no tensors)."""
    counts: dict[str, int] = {}
    with safe_open(str(weights), "pt") as st:
        for key in st.keys():
            counts[part(key)] = counts.get(part(key), 0) + math.prod(st.get_slice(key).get_shape())
    return counts


# -- "single" / "anyres": a CLIP or SigLIP tower over tiles, a separate LM ----


def build_tokenizer(
    video: bool = False, max_length: int = 4096, chat_template: str = LLAVA_CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama's special ids (<unk>=0, <s>=1, </s>=2).

    ``<image>`` (and ``<video>``) and ``<pad>`` are added after training, as
    in llava-hf, so the image token is a single unsplittable special token at
    the end of the vocab. Byte-level means any text encodes without <unk>.
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
        model_max_length=max_length,
        padding_side="left",
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN] if video else [IMAGE_TOKEN]}
    )
    fast.add_special_tokens({"pad_token": PAD})
    fast.chat_template = chat_template
    return fast


def _pinpoints(family: Family, image_size: int) -> dict[str, list[list[int]]]:
    """``image_grid_pinpoints`` kwarg (config and image processor) of an anyres
    family: its grids of tiles scaled by the tile size, so 336 px gives exactly
    llava-v1.6's pinpoints."""
    tiles = family.checkpoint.grid_tiles
    if not tiles:
        return {}
    return {"image_grid_pinpoints": [[r * image_size, c * image_size] for r, c in tiles]}


def _tiled_config(
    family: Family, size: str, image_size: int, tokenizer: PreTrainedTokenizerFast
) -> PreTrainedConfig:
    """The family's config: its tower (CLIP-L/14-style or SigLIP) and LM
    (Llama, Qwen2...) with the shapes of SIZES, its feature layer and
    strategy, and what its config class records (tokens a view, anyres
    pinpoints, the video token, the shrink past ``max_views``)."""
    ck = family.checkpoint
    patch = ck.patch_size
    # A family whose own tile is a whole number of patches (CLIP/14 at 336 px)
    # is held to it; SigLIP/14 at 384 px already leaves pixels the convolution
    # never sees.
    if image_size % patch and not ck.image_size % patch:
        raise ValueError(f"image_size must be a multiple of {patch}, got {image_size}")
    shape = SIZES[size]
    grid = image_size // patch
    vision_cls = ck.resolve(ck.vision_config)
    vision = dict(**shape["vision"], image_size=image_size, patch_size=patch)
    if _takes(vision_cls, "projection_dim"):  # CLIP's, unused by LLaVA: sized to the tower
        vision["projection_dim"] = shape["vision"]["hidden_size"]
    text = ck.resolve(ck.text_config)(
        **shape["text"],
        num_key_value_heads=shape["text"]["num_attention_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=ck.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config_cls = ck.resolve(ck.config)
    extra: dict[str, object] = {}
    if family.videos:
        extra["video_token_index"] = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if family.max_views:
        extra["vision_aspect_ratio"] = f"anyres_max_{family.max_views}"
    if _takes(config_cls, "image_seq_length"):
        extra["image_seq_length"] = grid * grid
    return config_cls(
        vision_config=vision_cls(**vision),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        vision_feature_layer=ck.feature_layer,
        vision_feature_select_strategy=ck.feature_strategy,
        **extra,
        **_pinpoints(family, image_size),
    )


def _resize(cls: type, image_size: int) -> dict[str, dict[str, int]]:
    """Size kwargs of an image or video processor at ``image_size`` px tiles,
    resizing as the class does by default: the shortest edge then a centre
    crop (CLIP, LLaVA-NeXT's base view), else straight to a square
    (LLaVA-OneVision)."""
    square = {"height": image_size, "width": image_size}
    if "shortest_edge" in (getattr(cls, "size", None) or {}):
        return {"size": {"shortest_edge": image_size}, "crop_size": square}
    return {"size": square}


def _tiled_processor(
    family: Family, image_size: int, tokenizer: PreTrainedTokenizerFast
) -> ProcessorMixin:
    """The family's processor, inserting (image_size / patch)**2 tokens a tile.

    CLIP: ``num_additional_image_tokens=1`` (its CLS) with the "default"
    strategy (drop CLS) gives exactly (image_size / 14)**2 tokens, as llava-hf
    does. SigLIP ("full": no CLS to drop) with ``num_image_tokens``. A
    family with videos also gets its video processor, as
    llava-onevision-qwen2-*-ov-hf ships one. Each entry goes to the processor
    classes that take it (:func:`_takes`).
    """
    ck = family.checkpoint
    image_cls = ck.resolve(ck.image_processor)
    image_processor = image_cls(**_resize(image_cls, image_size), **_pinpoints(family, image_size))
    offered: dict[str, object] = {
        "patch_size": ck.patch_size,
        "num_image_tokens": (image_size // ck.patch_size) ** 2,
        "vision_feature_select_strategy": ck.feature_strategy,
        # "default" drops the CLS position the tower adds: one more than the patches.
        "num_additional_image_tokens": int(ck.feature_strategy == "default"),
        "image_token": IMAGE_TOKEN,
        "chat_template": ck.chat_template,
    }
    if ck.video_processor:
        video_cls = ck.resolve(ck.video_processor)
        offered["video_processor"] = video_cls(**_resize(video_cls, image_size))
    if family.videos:
        offered["video_token"] = VIDEO_TOKEN
    if family.max_views:
        offered["vision_aspect_ratio"] = f"anyres_max_{family.max_views}"
    processor_cls = ck.resolve(ck.processor)
    taken = {k: v for k, v in offered.items() if _takes(processor_cls, k)}
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, **taken)


def hub_state_dict(
    model: torch.nn.Module,
    prefixes: tuple[tuple[str, str], ...] = HUB_PREFIXES,
    skip: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """State dict renamed to the hub layout vLLM's loaders expect (the llava
    ones by default), the ``skip`` keys left out."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        new = next((hub + name[len(mem) :] for mem, hub in prefixes if name.startswith(mem)), None)
        if new is None:
            raise KeyError(f"no hub prefix for parameter {name!r}")
        out[new] = tensor.detach().contiguous()
    return out


def _tiled_vision_flops(config: PreTrainedConfig) -> dict[str, int]:
    """One tile through the tower: CLS (CLIP; SigLIP has none) + grid**2
    tokens through the layers that actually run (up to
    ``vision_feature_layer``, i.e. L-1 for -2), with full bidirectional
    attention, plus the patch embedding; and the projector."""
    v, t = config.vision_config, config.text_config
    grid = v.image_size // v.patch_size
    n_vis = grid * grid + int(isinstance(v, CLIPVisionConfig))
    n_lm = getattr(config, "mm_tokens_per_image", None) or grid * grid  # pooled: fewer
    layer = getattr(config, "vision_feature_layer", -1)  # Gemma 3: the last
    layers = [layer] if isinstance(layer, int) else list(layer)
    v_layers = max(x if x >= 0 else v.num_hidden_layers + x + 1 for x in layers)
    d, i = v.hidden_size, v.intermediate_size
    vision_layer = 8 * n_vis * d * d + 4 * n_vis * d * i + 4 * n_vis * n_vis * d
    vision = v_layers * vision_layer + 2 * grid * grid * v.num_channels * v.patch_size**2 * d
    h = t.hidden_size
    projector = 2 * n_lm * (d * len(layers) * h + h * h)
    return {
        "visual_tokens": n_lm,
        "vision_layers_run": v_layers,
        "vision_flops": vision,
        "projector_flops": projector,
    }


def _tiled_summary(out: Path, cfg: PreTrainedConfig) -> str:
    counts = _param_counts(out / "model.safetensors", lambda key: key.split(".")[0])
    f = flops_per_image(cfg)
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return (
        f"{out}: {cfg.model_type} vision {counts['vision_tower'] / 1e6:.2f}M params "
        f"LM {counts['language_model'] / 1e6:.2f}M params, grid {grid}x{grid}, "
        f"{f['visual_tokens']} visual tokens/image, GFLOPs/image vision "
        f"{f['vision_flops'] / 1e9:.2f} ({f['vision_layers_run']} layers) "
        f"LM {f['lm_flops'] / 1e9:.2f} ratio {f['lm_to_vision']:.1f}x"
    )


# -- "merged": a packed native-resolution tower with M-RoPE (Qwen-VL) ----------
#
# Same idea as above: the real transformers classes, the real hub layout
# (transformers 5.x saves model.visual.*, model.language_model.*, lm_head.*,
# which vLLM's hf_to_vllm_mapper reads as is), and everything that decides
# token counts kept as published: the family's patch (14 for Qwen2.5-VL, 16
# for Qwen3-VL), temporal patch 2, 2 x 2 merge, smart_resize bounds. Images
# get grid_thw = (1, H/p, W/p) patches and prod // 4 <|image_pad|> tokens.


def build_merged_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """The module's byte-level BPE with the family's special tokens after it
    (``Checkpoint.special_tokens``, 4096 tokens in all).

    As in the real Qwen and GLM tokenizers: no BOS is ever added (GLM's chat
    template writes ``[gMASK]<sop>`` itself), the first of
    ``Checkpoint.end_tokens`` is EOS, ``<|endoftext|>`` is padding, and every
    special token is a single unsplittable token at the end of the vocab.
    """
    ck = family.checkpoint
    tok = _train_bpe(BPE_VOCAB + 2 - len(ck.special_tokens), [], unk=None)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ck.end_tokens[0],
        pad_token="<|endoftext|>",
        model_max_length=131072,
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(ck.special_tokens)})
    return fast


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's tokenizer (:func:`build_merged_tokenizer` of a Qwen-VL row)."""
    return build_merged_tokenizer(FAMILIES["qwen2.5-vl"])


def _token_ids(family: Family, tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The config's ids of the vision tokens, looked up by name."""
    ids = tokenizer.convert_tokens_to_ids
    return {key: ids(token) for key, token in family.checkpoint.token_ids}


def _merged_config(
    family: Family, size: str, tokenizer: PreTrainedTokenizerFast
) -> PreTrainedConfig:
    """The family's config: the LM of MERGED_SIZES with the family's M-RoPE,
    its tower of ``Checkpoint.vision_sizes``, and each one's extra entries."""
    ck = family.checkpoint
    text = dict(
        **MERGED_SIZES[size],
        vocab_size=len(tokenizer),
        max_position_embeddings=ck.max_position_embeddings,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        bos_token_id=tokenizer.pad_token_id,  # <|endoftext|>, as published
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    text |= {**ck.text_extra, **ck.text_sizes.get(size, {})}  # the size's entries win
    # A recipe's own head_dim (GLM-4.5V's is not hidden / heads), else hidden / heads.
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    # The published section scaled to this rotary half, summing to it exactly.
    half = int(head_dim * (ck.partial_rotary_factor or 1.0)) // 2
    published = sum(ck.mrope_section)
    section = [round(s * half / published) for s in ck.mrope_section]
    section[0] += half - sum(section)
    rope = {"rope_type": "default", "rope_theta": ck.rope_theta, "mrope_section": section}
    if ck.mrope_interleaved:
        rope["mrope_interleaved"] = True
    if ck.partial_rotary_factor is not None:
        rope["partial_rotary_factor"] = ck.partial_rotary_factor
    text["rope_parameters"] = rope
    config_cls = ck.resolve(ck.config)
    if _takes(config_cls.sub_configs["text_config"], "head_dim"):  # written out where it has one
        text["head_dim"] = head_dim
    vision = dict(
        **ck.vision_sizes[size],
        out_hidden_size=text["hidden_size"],
        in_channels=3,
        patch_size=ck.patch_size,
        temporal_patch_size=2,
        spatial_merge_size=2,
        **ck.vision_extra,
    )
    return config_cls(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **_token_ids(family, tokenizer),
    )


def _pixels(family: Family, size: str, modality: str) -> tuple[int, int]:
    """(min_pixels, max_pixels) of ``modality`` as published, except that
    "tiny" lowers max_pixels to ``Checkpoint.tiny_max_pixels``.

    vLLM profiles the encoder with the largest image and video the bounds
    allow (Qwen2.5-VL: 16384 merged tokens, 65536 patches in one
    full-attention sequence), minutes on a CPU. The tiny bounds stop images at
    ``families.TINY_IMAGE_TOKENS`` merged tokens (half the "max_pixels = 1280 *
    28 * 28" of the Qwen model cards) and videos at 768 per frame pair
    (qwen-vl-utils' VIDEO_MAX_TOKEN_NUM).
    """
    ck = family.checkpoint
    image = modality == "image"
    low, high = ck.image_pixels if image else ck.video_pixels
    if size == "tiny":
        high = min(high, ck.tiny_max_pixels[0 if image else 1])
    return low, high


def _merged_processor(
    family: Family, size: str, tokenizer: PreTrainedTokenizerFast
) -> ProcessorMixin:
    """The family's processor with image AND video processors, its pixel
    bounds and normalisation."""
    ck = family.checkpoint
    common = dict(
        patch_size=ck.patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(ck.image_mean),
        image_std=list(ck.image_std),
    )
    lo, hi = _pixels(family, size, "image")
    image_processor = ck.resolve(ck.image_processor)(
        size={"shortest_edge": lo, "longest_edge": hi}, **common
    )
    lo, hi = _pixels(family, size, "video")
    video_cls = ck.resolve(ck.video_processor)
    video_bounds: dict[str, object] = {"size": {"shortest_edge": lo, "longest_edge": hi}}
    if hasattr(video_cls, "max_image_size"):  # GLM's: the frames' total, capped again
        video_bounds["max_image_size"] = {"longest_edge": hi}
    video_processor = video_cls(**video_bounds, **common)
    return ck.resolve(ck.processor)(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=ck.chat_template,
    )


def _window_attention_flops(h: int, w: int, v: PreTrainedConfig) -> int:
    """Score + weighted-sum FLOPs of one windowed layer over an h x w patch
    grid: the windows of ``get_window_index`` (window_size px square in
    merged tokens, cut at the right and bottom edges)."""
    merge = v.spatial_merge_size
    side = v.window_size // merge // v.patch_size  # merged tokens per window side
    hm, wm = h // merge, w // merge
    total = 0
    for r in range(0, hm, side):
        for c in range(0, wm, side):
            n = min(side, hm - r) * min(side, wm - c) * merge * merge
            total += 4 * n * n * v.hidden_size
    return total


def _merged_vision_flops(
    family: Family, config: PreTrainedConfig, height: int, width: int
) -> dict[str, int]:
    """One image through the packed tower, height and width multiples of
    patch_size * 2 (no resize): the Conv3d patch embedding (2 temporal copies
    of the image), every block (QKV and output projections, the MLP: gated or
    not, per the row; attention over the whole image in the full-attention
    layers, over each window in the others where the config lists windows),
    and the projector (the 2 x 2 merger, plus any DeepStack mergers)."""
    v = config.vision_config
    merge = v.spatial_merge_size
    h, w = height // v.patch_size, width // v.patch_size
    n_vis = h * w
    n_lm = n_vis // (merge * merge)
    d, i = v.hidden_size, v.intermediate_size
    mlp = (6 if family.checkpoint.gated_vision_mlp else 4) * n_vis * d * i
    block = 8 * n_vis * d * d + mlp
    full_attn = 4 * n_vis * n_vis * d
    full = getattr(v, "fullatt_block_indexes", None)  # windowed: only these attend fully
    if full is None:
        full_layers, window_attn = v.depth, 0
    else:
        full_layers = len(full)
        window_attn = (v.depth - full_layers) * _window_attention_flops(h, w, v)
    embed = 2 * n_vis * v.in_channels * v.temporal_patch_size * v.patch_size**2 * d
    vision = v.depth * block + full_layers * full_attn + window_attn + embed
    merged = d * merge * merge
    mergers = 1 + len(getattr(v, "deepstack_visual_indexes", None) or ())
    projector = mergers * 2 * n_lm * (merged * merged + merged * v.out_hidden_size)
    return {
        "visual_tokens": n_lm,
        "vision_layers_run": v.depth,
        "vision_flops": vision,
        "projector_flops": projector,
    }


def _merged_summary(out: Path, cfg: PreTrainedConfig) -> str:
    counts = _param_counts(
        out / "model.safetensors",
        lambda key: "vision" if key.startswith("model.visual.") else "LM",
    )
    f = flops_per_image(cfg)
    v = cfg.vision_config
    grid = MERGED_FLOPS_IMAGE // v.patch_size
    roles = [
        f"{name} {list(getattr(v, key))}"
        for name, key in (
            ("full attention", "fullatt_block_indexes"),
            ("deepstack", "deepstack_visual_indexes"),
        )
        if getattr(v, key, None) is not None
    ]
    return (
        f"{out}: {cfg.model_type} vision {counts.get('vision', 0) / 1e6:.2f}M params "
        f"({', '.join([f'{v.depth} layers', *roles])}) LM {counts.get('LM', 0) / 1e6:.2f}M "
        f"params; {MERGED_FLOPS_IMAGE}px image: {grid}x{grid} patches, "
        f"{f['visual_tokens']} visual tokens, GFLOPs vision+merger "
        f"{(f['vision_flops'] + f['projector_flops']) / 1e9:.2f} "
        f"LM {f['lm_flops'] / 1e9:.2f} ratio {f['lm_to_vision']:.1f}x"
    )


# -- "pooled": fixed-size SigLIP views, the patch grid average-pooled (Gemma 3) --
#
# google/gemma-3-*-it's layout: language_model.model.*, vision_tower.vision_model.*,
# multi_modal_projector.* (vLLM's hf_to_vllm_mapper reads these; transformers 5
# saves the tower without its "vision_model." level), the LM head tied to the
# embeddings (no lm_head in the files), the special tokens at their published ids.

POOLED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def build_fixed_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """The module's byte-level BPE re-indexed so each of the row's
    ``Checkpoint.fixed_tokens`` sits at its published id, the trained tokens
    right after the last id below them, and ``<unusedN>`` everywhere else up
    to the last fixed id (Gemma 3: 262,145 tokens). Whitespace tokens (the
    newline runs) are ordinary added tokens, the rest special; a plain encode
    adds ``<bos>``, as Gemma's does (the chat template writes it itself)."""
    import json

    from tokenizers import AddedToken

    ck = family.checkpoint
    fixed = dict(ck.fixed_tokens)
    bpe = _train_bpe(BPE_VOCAB, [], unk=None)
    spec = json.loads(bpe.to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    # The trained tokens go after the last fixed id below the first gap that holds them.
    ids = sorted(fixed)
    first = 1 + next(i for i, j in itertools.pairwise(ids) if j - i > len(trained))
    names = {**fixed, **{first + n: token for n, token in enumerate(trained)}}
    if len(names) != len(fixed) + len(trained):
        raise ValueError("trained tokens overlap the fixed ids")
    count = max(fixed) + 1
    unused = (f"<unused{n}>" for n in range(count))
    vocab = {names[i] if i in names else next(unused): i for i in range(count)}
    spec["model"]["vocab"] = vocab
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in fixed.values() if not t.isspace()]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in fixed.values() if t.isspace()]
    )
    bos = fixed[2]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    named = {key.removesuffix("_index"): token for key, token in ck.token_ids}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=ck.end_tokens[0],
        unk_token=fixed[3],
        pad_token=fixed[0],
        mask_token=fixed[4],
        extra_special_tokens=named,  # the processor reads tokenizer.boi_token and the rest
        model_max_length=ck.max_position_embeddings,
        padding_side="left",
    )
    fast.chat_template = ck.chat_template
    for i, token in fixed.items():
        if fast.convert_tokens_to_ids(token) != i:
            raise ValueError(f"{token!r} is not at its published id {i}")
    return fast


def _named_tokens_config(path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    """As the published tokenizer_config.json: the named image tokens both as
    top-level keys and as the ``extra_special_tokens`` dict (transformers 5
    writes a list, which loses their names)."""
    import json

    config = json.loads(path.read_text())
    named = {name: getattr(tokenizer, name) for name in ("boi_token", "eoi_token", "image_token")}
    config.update(named)
    config["extra_special_tokens"] = named
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _pooled_config(
    family: Family, size: str, tokenizer: PreTrainedTokenizerFast
) -> PreTrainedConfig:
    """Gemma 3's config: a SigLIP tower at the row's view size, pooled to
    ``pooled_tokens`` a view, and a Gemma 3 LM (one sliding-window layer,
    one global, the published rope per layer type)."""
    ck = family.checkpoint
    shape = POOLED_SIZES[size]
    patches, tokens = ck.image_size // ck.patch_size, math.isqrt(ck.pooled_tokens)
    if tokens**2 != ck.pooled_tokens or patches % tokens:
        raise ValueError(f"{ck.pooled_tokens} tokens do not pool {patches} x {patches} patches")
    text = ck.resolve(ck.text_config)(
        **shape["text"],
        vocab_size=ck.vocab_size,
        query_pre_attn_scalar=shape["text"]["head_dim"],
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=ck.max_position_embeddings,
        rms_norm_eps=1e-6,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    vision = ck.resolve(ck.vision_config)(
        **shape["vision"],
        image_size=ck.image_size,
        patch_size=ck.patch_size,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )
    config = ck.resolve(ck.config)(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=ck.pooled_tokens,
        initializer_range=0.02,
        tie_word_embeddings=True,
        **_token_ids(family, tokenizer),
    )
    config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ck.end_tokens]
    return config


def _pooled_processor(family: Family, tokenizer: PreTrainedTokenizerFast) -> ProcessorMixin:
    """Gemma 3's processor: every view resized to the tower's size, as
    published (pan-and-scan off unless a request or the server turns it on)."""
    ck = family.checkpoint
    image_processor = ck.resolve(ck.image_processor)(
        size={"height": ck.image_size, "width": ck.image_size},
        resample=2,
        image_mean=list(ck.image_mean),
        image_std=list(ck.image_std),
        do_pan_and_scan=False,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    return ck.resolve(ck.processor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=ck.chat_template,
        image_seq_length=ck.pooled_tokens,
    )


def _pooled_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gemma 3's hub names; the tied LM head left out, as published. The
    projector, which transformers initialises to zeros (every image would
    embed to zero), gets the LM's normal init first."""
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    return hub_state_dict(model, POOLED_PREFIXES, skip=("lm_head.weight",))


def main(argv: list[str] | None = None) -> int:
    """``make-model`` entry point: write a checkpoint and print its summary."""
    parser = argparse.ArgumentParser(prog="make-model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--size", choices=list(dict.fromkeys([*SIZES, *MERGED_SIZES])), default="tiny"
    )
    parser.add_argument("--arch", choices=list(FAMILIES), default="llava")
    tiled = ", ".join(
        f"{f.name} {f.checkpoint.image_size}" for f in FAMILIES.values() if not _merged(f)
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help=f"tile size in px, tiled families only (default: the family's: {tiled})",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_checkpoint(args.out_dir, args.size, args.arch, args.image_size, args.seed)
    print(summary(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
