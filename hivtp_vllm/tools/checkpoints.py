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

CLI: ``make-model OUT_DIR --size tiny|bench --arch llava|llava-next
--image-size 336 --seed 0``.
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
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

__all__ = ["SIZES", "ARCHS", "make_checkpoint", "flops_per_image", "main"]

PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
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


ARCHS: dict[str, Arch] = {
    "llava": Arch(LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, CLIPImageProcessor),
    "llava-next": Arch(
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaNextImageProcessor,
        grid_tiles=((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)),
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


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama's special ids (<unk>=0, <s>=1, </s>=2).

    ``<image>`` and ``<pad>`` are added after training, as in llava-hf, so
    the image token is a single unsplittable special token at the end of the
    vocab. Byte-level means any text encodes without <unk>.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=[UNK, BOS, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
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
        model_max_length=4096,
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
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
    """LLaVA config: CLIP-L/14-style tower + Llama LM, shapes from SIZES."""
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    spec, shape = ARCHS[arch], SIZES[size]
    grid = image_size // PATCH_SIZE
    vision = CLIPVisionConfig(
        **shape["vision"],
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=shape["vision"]["hidden_size"],
    )
    text = LlamaConfig(
        **shape["text"],
        num_key_value_heads=shape["text"]["num_attention_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return spec.config_cls(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        **_pinpoints(arch, image_size),
    )


def build_processor(
    arch: str, image_size: int, tokenizer: PreTrainedTokenizerFast
) -> ProcessorMixin:
    """LlavaProcessor / LlavaNextProcessor that inserts grid**2 tokens per tile.

    ``num_additional_image_tokens=1`` (CLIP's CLS) with the "default" strategy
    (drop CLS) gives exactly (image_size / 14)**2 tokens, as llava-hf does.
    """
    spec = ARCHS[arch]
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
    """
    v, t = config.vision_config, config.text_config
    grid = v.image_size // v.patch_size
    n_vis, n_lm = grid * grid + 1, grid * grid
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


def make_checkpoint(
    out_dir: str | Path,
    size: str = "tiny",
    arch: str = "llava",
    image_size: int = 336,
    seed: int = 0,
) -> Path:
    """Write a complete, servable random-weight checkpoint to ``out_dir``.

    Files: config.json, generation_config.json, model.safetensors (hub key
    layout), tokenizer files, chat_template.jinja, processor_config.json and
    preprocessor_config.json. Weights use each submodule's own initialiser
    (std = initializer_range 0.02 for Llama, CLIP's scaled init) under
    ``torch.manual_seed(seed)``, so activations stay finite and reruns are
    byte-identical.
    """
    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"arch must be one of {list(ARCHS)}, size one of {list(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
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


def main(argv: list[str] | None = None) -> int:
    """``make-model`` entry point: write a checkpoint and print its summary."""
    parser = argparse.ArgumentParser(prog="make-model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--arch", choices=list(ARCHS), default="llava")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_checkpoint(args.out_dir, args.size, args.arch, args.image_size, args.seed)
    print(summary(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
