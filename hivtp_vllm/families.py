"""The architectures hivtp-vllm serves: one table, one row a family.

Everything that differs between families and is not model code lives in a
row of :data:`FAMILIES`: the plugin registers ``Family.model`` for
``Family.architecture``; ``make-model`` builds the test checkpoint from
``Family.checkpoint``; ``explain`` and the tower scorers lay images out by
``Family.layout``; the load runner, the benchmark and the tests read
``Family.load``, ``Family.bench`` and the rest. Adding a family is its module
in ``hivtp_vllm/models/`` (processor, info and model: what it alone needs),
one row here and its checkpoint recipe (docs/adding-a-family.md).

Pure data: importing this module imports neither vLLM nor transformers
(classes are named as strings and resolved where they are used), so the
command line, the tools and the plugin's start-up read it for free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# How an image becomes the views HIVTP selects on (docs/algorithm.md):
#   "single": one grid per image whatever its size (LLaVA-1.5);
#   "anyres": a base view plus the tiles stitched into one unpadded high-res
#             grid, a newline kept after each row (LLaVA-NeXT; with
#             ``max_views``, shrunk past that many views: LLaVA-OneVision);
#   "merged": one grid of 2 x 2 merged patches of the resized image, M-RoPE
#             positions (Qwen-VL).
Layout = Literal["single", "anyres", "merged"]


@dataclass(frozen=True)
class Checkpoint:
    """How ``make-model`` builds a random-weight checkpoint of the family with
    the real transformers classes and hub layout (class names in
    ``transformers``; the builder in :mod:`hivtp_vllm.tools.checkpoints`)."""

    config: str
    model: str
    processor: str
    image_processor: str | None = None
    video_processor: str | None = None
    patch_size: int = 14
    image_size: int = 336  # px of one view (a tile); LLaVA families only
    # anyres grids in units of tiles (rows, cols), scaled by the tile size.
    grid_tiles: tuple[tuple[int, int], ...] = ()
    siglip: bool = False  # a SigLIP tower (no CLS, every position a patch)


@dataclass(frozen=True)
class Load:
    """The load runner's defaults (loadtest/runner.py) for the family."""

    image_sizes: str
    phases: str
    # Tile size of the ceiling twin (None: no ceiling phase; ``ceiling_note`` says why).
    ceiling_px: int | None
    server_args: tuple[str, ...] = ()
    ceiling_note: str = ""
    reading: tuple[str, ...] = ()  # a paragraph under the report's table


@dataclass(frozen=True)
class Bench:
    """What the single-request benchmark (benchmarks/llava_bench.py) varies."""

    image: tuple[int, int]  # (width, height) of the TTFT requests' images
    tiles: int  # tower inputs per image at that size
    views: tuple[tuple[int, int], ...]  # grids selected per image
    model: str = "CLIP 12 layers x 128, Llama 8 layers x 768, 336 px tiles"
    max_model_len: int = 4096
    # The bench LM's KV cache per token, float32, with room to spare.
    kv_per_token: int = 8 * 2 * 768 * 4 * 2
    tower: str = "bench (12 x 128)"  # the bench tower, for the overhead table
    batches: tuple[int, ...] = (1, 16)  # images per tower call in the overhead probe


@dataclass(frozen=True)
class Family:
    """One served architecture."""

    name: str  # --arch of make-model, the load runner and the benchmark; test ids
    title: str  # in reports and messages
    architecture: str  # the HF architecture vLLM serves with ``model``
    model_type: str  # the HF config's model_type
    module: str  # hivtp_vllm.models.<module> holds the served class
    layout: Layout
    checkpoint: Checkpoint
    load: Load
    bench: Bench | None = None  # None: no single-request benchmark section
    max_views: int | None = None  # anyres_max_N: the high-res grid shrinks past N views
    videos: bool = False  # the family takes videos (served as vLLM serves them)
    max_model_len: int = 4096  # the test servers': room for the largest image's tokens

    @property
    def model(self) -> str:
        """The served class, lazily (``module:Class``), as vLLM's registry takes it."""
        return f"hivtp_vllm.models.{self.module}:Hivtp{self.architecture}"

    @property
    def slug(self) -> str:
        """Section and chart names in docs/benchmarks.md ("llava" is "llava-1.5")."""
        return "llava-1.5" if self.name == "llava" else self.name


_QWEN_LOAD = dict(
    image_sizes="896x896",  # 32 x 32 = 1024 tokens (Qwen2.5-VL), 28 x 28 = 784 (Qwen3-VL)
    phases="1.0,0.5,0.25,uniform0.25,stock",
    ceiling_px=None,
    server_args=("--max-model-len", "8192"),
    ceiling_note="No ceiling phase: a Qwen-VL image's token count follows its pixel "
    "bounds, not a twin checkpoint's tile size; the uniform r = 0.25 phase splits "
    "HIVTP's cost from the tower's.",
)

_ROWS = (
    Family(
        name="llava",
        title="LLaVA-1.5",
        architecture="LlavaForConditionalGeneration",
        model_type="llava",
        module="llava",
        layout="single",
        checkpoint=Checkpoint(
            config="LlavaConfig",
            model="LlavaForConditionalGeneration",
            processor="LlavaProcessor",
            image_processor="CLIPImageProcessor",
        ),
        load=Load(
            image_sizes="336x336,672x336,500x500",
            phases="1.0,0.5,0.25,uniform0.25,k64,ceiling,stock",
            ceiling_px=168,
            ceiling_note="The ceiling is the same checkpoint made for 168 px images (12 x 12 = "
            "144 visual tokens, as many as r = 0.25 keeps) on stock vLLM: pruning that costs "
            "nothing.",
            reading=(
                "Reading: the ceiling is cheaper than r = 0.25 in one way pruning cannot be: its",
                "vision tower sees 144 patches, where HIVTP's must see all 576 to score them (the",
                "bench tower takes about 56 ms an image at 336 px and a quarter of that at 168 px;",
                "scoring and selection add 5 ms, see the single-request section). Under continuous",
                "batching each new image's encoding runs inside an engine step, so it delays every",
                "running request's next token, not only its own first one. The uniform phase keeps",
                "the same tokens without scores: HIVTP against it is scoring and selection alone,",
                "uniform against the ceiling the full-resolution tower alone. The LLaVA-1.5-7B",
                "tower is a smaller share of a step, so the gap there should be smaller; it is",
                "measured here only for the bench model.",
            ),
        ),
        bench=Bench(image=(336, 336), tiles=1, views=((24, 24),)),
    ),
    Family(
        name="llava-next",
        title="LLaVA-NeXT",
        architecture="LlavaNextForConditionalGeneration",
        model_type="llava_next",
        module="llava_next",
        layout="anyres",
        checkpoint=Checkpoint(
            config="LlavaNextConfig",
            model="LlavaNextForConditionalGeneration",
            processor="LlavaNextProcessor",
            image_processor="LlavaNextImageProcessor",
            # llava-v1.6's image_grid_pinpoints at 336 px tiles.
            grid_tiles=((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)),
        ),
        load=Load(
            image_sizes="672x672",
            phases="1.0,0.5,0.25,uniform0.25,ceiling,stock",
            ceiling_px=168,
            ceiling_note="The ceiling is the same checkpoint made for 168 px tiles (its grid "
            "pinpoints scale with the tile, so a 672 x 672 image gets the same 2 x 2 grid: a "
            "12 x 12 base view and a 24 x 24 high-res grid, as many tokens as r = 0.25 keeps, "
            "but one newline per 24 rows instead of 48) on stock vLLM: pruning that costs "
            "nothing.",
        ),
        # 672 x 672: the largest llava-v1.6 layout, 576 + 48 x 48 + 48 = 2928 tokens.
        bench=Bench(image=(672, 672), tiles=5, views=((24, 24), (48, 48))),
    ),
    Family(
        name="llava-onevision",
        title="LLaVA-OneVision",
        architecture="LlavaOnevisionForConditionalGeneration",
        model_type="llava_onevision",
        module="llava_onevision",
        layout="anyres",
        max_views=9,
        videos=True,
        max_model_len=16384,
        checkpoint=Checkpoint(
            config="LlavaOnevisionConfig",
            model="LlavaOnevisionForConditionalGeneration",
            processor="LlavaOnevisionProcessor",
            image_processor="LlavaOnevisionImageProcessor",
            video_processor="LlavaOnevisionVideoProcessor",
            image_size=384,
            # llava-onevision-qwen2-*-ov-hf: every grid of 1..6 x 1..6 tiles of 384 px.
            grid_tiles=tuple((r, c) for r in range(1, 7) for c in range(1, 7)),
            siglip=True,
        ),
        load=Load(
            image_sizes="768x768",
            phases="1.0,0.5,0.25,uniform0.25,stock",
            ceiling_px=None,
            # An image of up to 3 x 3 tiles of 384 px takes about 7,400 tokens; 8,192
            # of them fit the default 512 MiB KV cache of the bench model (48 KiB a token).
            server_args=("--max-model-len", "8192"),
            ceiling_note="No ceiling phase: OneVision picks its tile grid from the image's "
            "size among 1..6 x 1..6 tiles, so a checkpoint with half-size tiles gives the same "
            "image four times the tiles (then shrinks the grid to about 9 tiles' worth: "
            "anyres_max_9), not a quarter of the patches; no twin carries r = 0.25's tokens "
            "with a quarter of the tower's work. The uniform r = 0.25 phase still splits "
            "HIVTP's cost from the tower's.",
        ),
        # 1152 x 1152: 3 x 3 tiles of 384 px, 729 + 81 x 81 + 81 = 7371 tokens
        # (just under anyres_max_9's shrink).
        bench=Bench(
            image=(1152, 1152),
            tiles=10,
            views=((27, 27), (81, 81)),
            model="SigLIP 12 layers x 128, Qwen2 8 layers x 768, 384 px tiles",
            max_model_len=16384,
        ),
    ),
    Family(
        name="qwen2.5-vl",
        title="Qwen2.5-VL",
        architecture="Qwen2_5_VLForConditionalGeneration",
        model_type="qwen2_5_vl",
        module="qwen2_5_vl",
        layout="merged",
        videos=True,
        checkpoint=Checkpoint(
            config="Qwen2_5_VLConfig",
            model="Qwen2_5_VLForConditionalGeneration",
            processor="Qwen2_5_VLProcessor",
            image_processor="Qwen2VLImageProcessor",
            video_processor="Qwen2VLVideoProcessor",
            patch_size=14,
        ),
        load=Load(**_QWEN_LOAD),
        # 1024 x 1024: resized to 1036 x 1036, 74 x 74 patches, 37 x 37 = 1369 tokens.
        bench=Bench(
            image=(1024, 1024),
            tiles=1,
            views=((37, 37),),
            model="the published tower's layout scaled down, Qwen2 10 layers x 1024",
            max_model_len=8192,
            kv_per_token=10 * 2 * 1024 * 4 * 2,
            tower="bench (8 x 64, full attention in 2)",
            batches=(1, 4),
        ),
    ),
    Family(
        name="qwen3-vl",
        title="Qwen3-VL",
        architecture="Qwen3VLForConditionalGeneration",
        model_type="qwen3_vl",
        module="qwen3_vl",
        layout="merged",
        videos=True,
        checkpoint=Checkpoint(
            config="Qwen3VLConfig",
            model="Qwen3VLForConditionalGeneration",
            processor="Qwen3VLProcessor",
            image_processor="Qwen2VLImageProcessor",
            video_processor="Qwen3VLVideoProcessor",
            patch_size=16,
        ),
        load=Load(**_QWEN_LOAD),
    ),
)

FAMILIES: dict[str, Family] = {row.name: row for row in _ROWS}
BY_ARCHITECTURE: dict[str, Family] = {row.architecture: row for row in _ROWS}
BY_MODEL_TYPE: dict[str, Family] = {row.model_type: row for row in _ROWS}


def by_name(name: str) -> Family:
    """The row of ``name``, or a ValueError listing the names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}") from None


def of_config(hf_config: object) -> Family | None:
    """The row of a checkpoint's HF config (by its model_type), or None."""
    return BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))  # type: ignore[arg-type]


__all__ = [
    "Bench",
    "BY_ARCHITECTURE",
    "BY_MODEL_TYPE",
    "Checkpoint",
    "FAMILIES",
    "Family",
    "Layout",
    "Load",
    "by_name",
    "of_config",
]
