"""A checkpoint's vision tower, scoring patches, without vLLM or the LM.

``hivtp-vllm explain`` must score with the server's own formula on the
checkpoint's own weights, but it should not need vLLM, a GPU or the 7B
language model. So this module reads only the vision tower's tensors from
the safetensors files (a directory, or just the needed files from the hub),
builds the transformers tower its family's row names (``Checkpoint.tower``
in :data:`hivtp_vllm.families.FAMILIES`: ``CLIPVisionModel``,
``SiglipVisionModel``, a Qwen-VL packed tower) from ``config.vision_config``
cut after the scoring band's last layer (later layers cannot change the
score), and feeds the band's queries and keys to the server's
:func:`hivtp_vllm.scoring.received_attention`. How an image becomes views,
and which scorer runs, follow the row's ``layout``.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from hivtp_vllm import MODELS, params
from hivtp_vllm.families import BY_ARCHITECTURE, Family
from hivtp_vllm.pruning import windowed_band
from hivtp_vllm.scoring import mean_patch_scores, received_attention, resolve_band
from hivtp_vllm.views import cls_tokens as leading_tokens
from hivtp_vllm.views import highres_layout, layers_run, pooled_side, shrink, supports_pruning

__all__ = [
    "ExplainError",
    "Checkpoint",
    "BandScorer",
    "MergedBandScorer",
    "SCORERS",
    "tap_band",
    "open_checkpoint",
    "resolve",
    "progress",
]

# Checkpoint keys of the vision tower, in the hub layout (what vLLM loads and
# checkpoints.py writes) and in the layouts newer transformers save; what
# follows the prefix, less a leading "vision_model.", is the key in the
# transformers tower the family's row names.
_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.visual.", "visual.")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ExplainError(ValueError):
    """Bad input to ``explain``: the command reports it as one line."""


def progress(items: Iterable, *, total: int, desc: str, show: bool | None, delay: float = 0):
    """tqdm on stderr; ``show=None`` shows it only on a terminal (tqdm's rule)."""
    from tqdm.auto import tqdm

    return tqdm(
        items,
        total=total,
        desc=desc,
        delay=delay,
        file=sys.stderr,
        disable=None if show is None else not show,
        leave=False,
    )


def _tower_key(name: str) -> str | None:
    """The vision model's key of a checkpoint tensor, or None if not the tower's."""
    for prefix in _TOWER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :].removeprefix("vision_model.")
    return None


def resolve(name: str) -> Path:
    """A checkpoint directory, or a hub repository fetched without its LM.

    From the hub only the configs and the safetensors shards that hold
    vision-tower tensors are downloaded (a sharded LLaVA keeps the tower in
    one shard); with ``HF_HUB_OFFLINE=1`` they must already be cached.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ExplainError(f"{name}: not a checkpoint directory")
    if not _REPO_ID.match(name):
        raise ExplainError(f"{name}: no such checkpoint directory")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(name, filename))

    try:
        folder = fetch("config.json").parent
        for optional in ("preprocessor_config.json", "processor_config.json"):
            try:
                fetch(optional)
            except EntryNotFoundError:
                pass
        try:
            index = json.loads(fetch("model.safetensors.index.json").read_text())
            shards = {f for key, f in index["weight_map"].items() if _tower_key(key)}
        except EntryNotFoundError:
            shards = {"model.safetensors"}
        for shard in sorted(shards):
            fetch(shard)
    except (OSError, ValueError) as exc:  # hub errors: offline, not found, gated...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExplainError(
            f"{name}: no such checkpoint directory, and the Hugging Face hub could not "
            f"provide it ({first})"
        ) from None
    return folder


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of one of the families served, as far as explain needs it."""

    name: str
    path: Path
    config: object
    architecture: str

    @property
    def label(self) -> str:
        """Short name for pictures: a directory's name, or the hub name."""
        return self.path.name if Path(self.name).expanduser().is_dir() else self.name

    @property
    def family(self) -> Family:
        """The row of the architecture: layout, views and tower."""
        return BY_ARCHITECTURE[self.architecture]

    @property
    def tower_class(self) -> type:
        """The transformers vision model the row names, imported now."""
        recipe = self.family.checkpoint
        return recipe.resolve(recipe.tower)

    @property
    def scorer_class(self) -> type[BandScorer | MergedBandScorer]:
        """What scores this family's images: by the layout, as the server does."""
        return SCORERS[self.family.layout]

    def scored_layers(self, band: tuple[int, int]) -> tuple[int, ...]:
        """The layers scored for ``(start, count)``: all of them, or for a
        windowed tower (its config lists the layers that attend to the whole
        image, as Qwen2.5-VL's does) those full-attention ones
        (docs/algorithm.md, "Qwen2.5-VL and Qwen3-VL")."""
        start, count = band
        full = getattr(self.config.vision_config, "fullatt_block_indexes", None)
        return windowed_band(start, count, full) if full else tuple(range(start, start + count))

    def merged_grid(self, image: Image.Image) -> tuple[int, int]:
        """(rows, cols) of merged tokens: the image resized as its processor does."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        processor = self.image_processor()
        unit = processor.patch_size * processor.merge_size
        try:
            height, width = smart_resize(
                image.height,
                image.width,
                factor=unit,
                min_pixels=processor.size["shortest_edge"],
                max_pixels=processor.size["longest_edge"],
            )
        except ValueError as exc:  # an aspect ratio over 200
            raise ExplainError(f"{image.width} x {image.height} px: {exc}") from None
        return height // unit, width // unit

    @property
    def cls_tokens(self) -> int:
        """Leading non-patch positions of the tower's sequence (CLIP 1, SigLIP 0)."""
        count = leading_tokens(self.config)
        if count is None:  # open_checkpoint refuses these
            raise ExplainError(f"{self.name}: hivtp cannot prune this vision tower")
        return count

    @property
    def side(self) -> int:
        """Patch grid of one tile (24 for CLIP-L/14 at 336 px, 27 for SigLIP/14 at 384)."""
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def resample(self, grid: torch.Tensor) -> torch.Tensor:
        """The unpadded high-res grid ``[C, H', W']`` -> the grid the LM receives.

        A family with ``max_views`` (LLaVA-OneVision's anyres_max_9) shrinks
        it bilinearly past about that many views' tokens
        (:func:`hivtp_vllm.views.shrink`, as the server shrinks the scores);
        one without (LLaVA-NeXT) keeps it as it is.
        """
        max_views = self.family.max_views
        return shrink(grid, self.side, max_views) if max_views else grid

    def layout(self, image: Image.Image) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
        """(tile grid or None, grid shape of each view) of an image of this size.

        By the row's layout: "merged", one grid of merged tokens of the
        resized image; "single", one ``side x side`` view; "anyres", the base
        view and the unpadded high-res grid, laid out by the function the
        model uses, then shrunk past ``max_views`` (:meth:`resample`, run on
        an empty grid, so the shape is by construction the one it produces).
        """
        layout = self.family.layout
        if layout == "merged":
            return None, [self.merged_grid(image)]
        if layout == "pooled":  # the image, then any pan-and-scan crops, as the processor cuts
            views = len(self.image_processor()(images=[image.convert("RGB")])["pixel_values"])
            side = pooled_side(self.config)
            return None, [(side, side)] * views
        base = (self.side, self.side)
        if layout == "single":
            return None, [base]
        tile_grid, (height, width) = highres_layout(
            (image.height, image.width),
            self.config.image_grid_pinpoints,
            self.config.vision_config.image_size,
            self.side,
        )
        highres = self.resample(torch.empty(1, height, width))
        return tile_grid, [base, (highres.shape[1], highres.shape[2])]

    def band(self, server: params.ServerOptions) -> tuple[int, int]:
        """(first layer, layer count) of the band, defaults and checks as the server's."""
        depth, run = self.scorer_class.depth(self.config)
        try:
            return resolve_band(depth, run, server.layer_start, server.num_layers)
        except ValueError as exc:
            raise ExplainError(str(exc)) from None

    def image_processor(self):
        """The checkpoint's own image processor, loaded as vLLM's HF processor loads it."""
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ExplainError(f"{self.name}: cannot load its image processor ({exc})") from None


def open_checkpoint(name: str) -> Checkpoint:
    """Resolve ``name`` and refuse, in one line, anything HIVTP cannot prune."""
    path = resolve(name)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExplainError(f"{name}: no config.json, not a Hugging Face checkpoint directory")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ExplainError(f"{config_file}: cannot read it ({exc})") from None
    archs = (raw.get("architectures") or []) if isinstance(raw, dict) else []
    arch = next((a for a in archs if a in MODELS), None)
    if arch is None:
        raise ExplainError(
            f"{name}: unsupported architecture {', '.join(map(str, archs)) or '(none given)'}; "
            f"explain supports {', '.join(MODELS)}"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ExplainError(f"{name}: cannot load config.json ({exc})") from None
    if not supports_pruning(config):
        vision = type(getattr(config, "vision_config", None)).__name__  # a LLaVA tower
        strategy = getattr(config, "vision_feature_select_strategy", None)
        raise ExplainError(
            f"{name}: hivtp needs a CLIP vision tower with vision_feature_select_strategy="
            f"'default' or a SigLIP one with 'full'; this checkpoint has {vision} and "
            f"{strategy!r}"
        )
    return Checkpoint(name, path, config, arch)


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, for the vision tower's tensors only."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items() if _tower_key(k)}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys() if _tower_key(k)}
    raise ExplainError(
        f"{path}: no model.safetensors or model.safetensors.index.json "
        "(explain reads safetensors weights only)"
    )


def _read_tower(
    checkpoint: Checkpoint, wanted: dict[str, torch.Tensor], show: bool | None
) -> dict[str, torch.Tensor]:
    """The tensors of ``wanted`` (a state dict's keys and shapes), as float32."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key, file in _weight_files(checkpoint.path).items():
        target = _tower_key(key)
        target = target if target in wanted else f"vision_model.{target}"
        if target in wanted:
            by_file.setdefault(file, []).append((key, target))
    total = sum(len(keys) for keys in by_file.values())
    state: dict[str, torch.Tensor] = {}
    with progress(range(total), total=total, desc="vision tower", show=show, delay=1.0) as bar:
        for file, keys in by_file.items():
            with safe_open(str(file), "pt") as f:
                for key, target in keys:
                    state[target] = f.get_tensor(key).float()
                    bar.update()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ExplainError(
            f"{checkpoint.name}: the vision tower's weights lack {len(missing)} tensors "
            f"(first: {missing[0]})"
        )
    for key, tensor in state.items():
        if tensor.shape != wanted[key].shape:
            raise ExplainError(
                f"{checkpoint.name}: {key} has shape {tuple(tensor.shape)}, the config "
                f"says {tuple(wanted[key].shape)}"
            )
    return state


def _tower(
    build: Callable[[], nn.Module],
    checkpoint: Checkpoint,
    device: str,
    show_progress: bool | None,
    trim: Callable[[nn.Module], None] = lambda model: None,
) -> nn.Module:
    """``build()`` with no random init, ``trim``-med of parts the scores do
    not need, then every tensor it has read from the checkpoint."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init first, slower, same result
        no_init_weights = nullcontext
    with no_init_weights():  # every weight is read from the checkpoint next
        model = build()
    trim(model)
    model.load_state_dict(_read_tower(checkpoint, model.state_dict(), show_progress), assign=True)
    return model.to(device).eval()


class BandScorer:
    """The checkpoint's vision tower up to the band's last layer, scoring patches.

    For the tiled layouts ("single", "anyres"). Built from
    ``config.vision_config`` as the row's tower (``CLIPVisionModel``,
    ``SiglipVisionModel``) with only ``start + count`` layers and only those
    layers' tensors read (in float32, on ``device``). The band's query and
    key projections are tapped with forward hooks and fed to the server's
    :func:`received_attention`; the attention itself runs however
    transformers likes (SDPA), since its probabilities are recomputed.
    """

    @staticmethod
    def depth(config: object) -> tuple[int, int]:
        """(encoder layers, layers the served tower runs): LLaVA's tower stops
        at its deepest feature layer, and the band must lie inside it."""
        return config.vision_config.num_hidden_layers, layers_run(config)

    def __init__(
        self,
        checkpoint: Checkpoint,
        band: tuple[int, int],
        device: str = "cpu",
        show_progress: bool | None = None,
    ) -> None:
        self.start, self.count = band
        vision = copy.deepcopy(checkpoint.config.vision_config)
        vision.num_hidden_layers = self.start + self.count

        def trim(model: nn.Module) -> None:
            # The last norm (and SigLIP's pooling head) only make outputs after
            # the band's layers, which nothing here uses: not reading them lets
            # a checkpoint that dropped them work too (LLaVA-OneVision's
            # features never go through the head).
            inner = getattr(model, "vision_model", model)  # older transformers nest it
            inner.post_layernorm = nn.Identity()
            if hasattr(inner, "head"):
                inner.head = nn.Identity()

        model_class = checkpoint.tower_class
        self.model = _tower(lambda: model_class(vision), checkpoint, device, show_progress, trim)
        inner = getattr(self.model, "vision_model", self.model)
        self.device = device
        self.cls_tokens = checkpoint.cls_tokens
        layers = inner.encoder.layers
        self.attention = [layers[i].self_attn for i in range(self.start, self.start + self.count)]
        self.num_heads = self.attention[0].num_heads
        self.scale = self.attention[0].scale

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scores ``[T, N]`` for ``T`` tiles ``[T, 3, size, size]``, CLS (if any) dropped."""
        with tap_band(self.attention, self.cls_tokens) as taps:
            self.model(pixel_values=pixel_values.to(self.device, torch.float32))
        return taps.patch_scores().cpu()


class MergedBandScorer:
    """A packed tower up to the last scored layer, scoring merged tokens.

    For the "merged" layout (Qwen-VL): the transformers tower the row names
    (``Qwen2_5_VisionTransformerPretrainedModel`` for Qwen2.5-VL,
    ``Qwen3VLVisionModel`` for Qwen3-VL) built from ``config.vision_config``
    with only the layers needed, their tensors read from the checkpoint
    (``model.visual.*``). Its attention runs through an attention function
    registered with transformers (its extension point) that hands the scored
    layers' queries and keys, after the rotary embedding and per image, to
    the server's :func:`received_attention`, as the server's hook does, then
    runs SDPA. Scores are merged 2 x 2 and put back in raster order, as the
    server does (docs/algorithm.md, "Qwen2.5-VL and Qwen3-VL").
    """

    @staticmethod
    def depth(config: object) -> tuple[int, int]:
        """(blocks, blocks run): the packed tower runs all its blocks."""
        depth = config.vision_config.depth
        return depth, depth

    def __init__(
        self,
        checkpoint: Checkpoint,
        band: tuple[int, int],
        device: str = "cpu",
        show_progress: bool | None = None,
    ) -> None:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.layers = checkpoint.scored_layers(band)
        vision = copy.deepcopy(checkpoint.config.vision_config)
        vision.depth = max(self.layers) + 1
        tower_class = checkpoint.tower_class
        # A windowed tower (its config lists the blocks that attend fully)
        # permutes merged tokens by window; its own module undoes that.
        self.windowed = getattr(vision, "fullatt_block_indexes", None) is not None
        self.modeling = importlib.import_module(tower_class.__module__)

        def trim(model: nn.Module) -> None:
            # Mergers make outputs after (or beside) the band: nothing here uses them.
            model.merger = nn.Identity()
            if hasattr(model, "deepstack_merger_list"):
                model.deepstack_merger_list = nn.ModuleList(
                    nn.Identity() for _ in model.deepstack_merger_list
                )

        model = _tower(
            lambda: tower_class._from_config(vision), checkpoint, device, show_progress, trim
        )
        self.model = model
        self.device = device
        self.num_heads = vision.num_heads
        self._layer: int | None = None
        self._parts: list[torch.Tensor] = []
        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=i: setattr(self, "_layer", i))

        def tap(module, query, key, value, attention_mask, **kwargs):
            # query, key: [1, heads, n, head_dim], one image (or window) at a time
            if self._layer in self.layers:
                n = query.shape[2]
                q = query.transpose(1, 2).reshape(1, n, -1)
                k = key.transpose(1, 2).reshape(1, n, -1)
                self._parts.append(received_attention(q, k, self.num_heads, module.scaling)[0])
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        name = f"hivtp_tap_{id(self)}"  # one per scorer: each taps its own model
        AttentionInterface.register(name, tap)
        model.config._attn_implementation = name

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged-token scores of one image ``[rows * cols]``, in raster order."""
        self._parts = []
        self.model(pixel_values.to(self.device, torch.float32), grid_thw=grid_thw)
        n = int(grid_thw.prod())
        per_position = torch.stack(self._parts).view(len(self.layers), n).sum(0)
        per_position = per_position / (len(self.layers) * self.num_heads * n)
        merged = per_position.view(-1, 4).mean(dim=1)
        if not self.windowed:
            return merged.cpu()
        window_index, _ = self.modeling.get_vision_window_index(
            grid_thw,
            spatial_merge_size=self.model.spatial_merge_size,
            window_size=self.model.window_size,
            patch_size=self.model.patch_size,
            kwargs={},
        )
        return merged[torch.argsort(window_index.to(merged.device))].cpu()


# The scorer of each layout (:attr:`Checkpoint.scorer_class`).
SCORERS: dict[str, type[BandScorer | MergedBandScorer]] = {
    "single": BandScorer,
    "anyres": BandScorer,
    "merged": MergedBandScorer,
    "pooled": BandScorer,
}


class BandTaps:
    """What :func:`tap_band` heard: the band's summed received attention."""

    def __init__(self, num_layers: int, num_heads: int, cls_tokens: int = 1) -> None:
        self.num_layers, self.num_heads, self.cls_tokens = num_layers, num_heads, cls_tokens
        self.total: torch.Tensor | None = None
        self.seconds = 0.0  # host time spent in received_attention

    def patch_scores(self) -> torch.Tensor:
        """Mean received attention per patch, ``[B, N]`` (CLS, if any, dropped)."""
        if self.total is None:
            raise RuntimeError("no attention was heard: the band's layers did not run")
        return mean_patch_scores(self.total, self.num_layers, self.num_heads, self.cls_tokens)


@contextmanager
def tap_band(attention: Sequence[nn.Module], cls_tokens: int = 1) -> Iterator[BandTaps]:
    """Score from transformers' ``CLIPAttention`` or ``SiglipAttention`` modules
    during one forward; ``cls_tokens``: 1 for CLIP, 0 for SigLIP (no CLS).

    transformers calls its attention kernel as a function, not a module, so
    the server's pre-hook on vLLM's attention module has no twin here; the
    band's ``q_proj`` and ``k_proj`` outputs are the same query and key
    tensors, and feed the same :func:`received_attention`. Also used by the
    GPU benchmark on a full transformers LLaVA.
    """
    first = attention[0]
    taps = BandTaps(len(attention), first.num_heads, cls_tokens)
    queries: dict[int, torch.Tensor] = {}

    def keep_query(i: int):
        def hook(module, args, output):
            queries[i] = output

        return hook

    def score_key(i: int):
        def hook(module, args, output):
            start = time.perf_counter()
            part = received_attention(queries.pop(i), output, first.num_heads, first.scale)
            taps.total = part if taps.total is None else taps.total + part
            taps.seconds += time.perf_counter() - start

        return hook

    handles = []
    for i, module in enumerate(attention):  # the band's few layers, not tokens
        handles.append(module.q_proj.register_forward_hook(keep_query(i)))
        handles.append(module.k_proj.register_forward_hook(score_key(i)))
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()
