"""Model-side HIVTP shared by the LLaVA families: score, select, gather.

The vision tower runs once, as in stock vLLM; while it runs, the middle
band's attention modules are listened to for scores (hivtp_vllm.scoring).
Selection is the pure spec code (hivtp_vllm.pruning), batched over the images
that share a grid and a budget.

Under tensor parallelism every worker runs this code on the same batch and
must select the same tokens. vLLM's CLIP either splits its heads over the
workers (``--mm-encoder-tp-mode weights``, the default: partial scores are
all-reduced) or is replicated on each worker (``--mm-encoder-tp-mode data``:
each worker encodes a slice of the images and the slices, features and
scores, are all-gathered). Stock vLLM's LLaVA does not offer the data mode;
these models do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.logger import init_logger
from vllm.model_executor.models.vision import run_dp_sharded_vision_model

from hivtp_vllm import contract, params
from hivtp_vllm.contract import Plan
from hivtp_vllm.pruning import select_tokens_batched, uniform_tokens
from hivtp_vllm.scoring import ReceivedAttention, resolve_band
from hivtp_vllm.timing import PruningTimer

# Under vLLM's logger, so the messages print where and when vLLM's do (a
# logger outside the ``vllm`` tree has no handler in vLLM's processes).
logger = init_logger(f"vllm.{__name__}")


class HivtpSelectMixin:
    """What every family's model shares: the server's options, the pruning
    timer behind the metrics, and the timed selection."""

    def _hivtp_options(self, vllm_config) -> None:
        """Read the server options; make the timer that feeds the metrics;
        refuse a model runner the plugin has not checked."""
        from hivtp_vllm import metrics, vllm_compat

        logger.info("hivtp: vLLM model runner %s", vllm_compat.check_model_runner(vllm_config))

        mm_config = vllm_config.model_config.multimodal_config
        histogram = metrics.pruning_histogram(vllm_config.model_config.served_model_name)
        self.hivtp_timer = PruningTimer(histogram.observe)
        self.hivtp_server = params.parse_server(
            mm_config.mm_processor_kwargs if mm_config else None
        )

    def _hivtp_select(
        self,
        plans: Sequence[Plan],
        views: Mapping[int, Sequence[torch.Tensor] | None],
        device: torch.device,
    ) -> dict[int, list[torch.Tensor]]:
        """Kept flat indices of each view of each image in ``views``.

        ``views[i]`` holds image ``i``'s score maps, one a view in the order
        of ``plans[i].layout.grids`` (any shape of that many scores), or None
        where it takes the uniform baseline (no scores). One batched
        :func:`select_views` call for the whole forward, timed with the
        scoring into the metrics unless ``plans`` are vLLM's warm-up items.
        """
        grids, maps, keep, fractions = [], [], [], []
        for i, scores in views.items():
            plan = plans[i]
            for v, grid in enumerate(plan.layout.grids):
                grids.append(grid)
                maps.append(None if scores is None else scores[v].reshape(grid))
                keep.append(plan.keep[v])
                fractions.append(plan.global_fraction)
        with self.hivtp_timer.span(device):
            kept = select_views(grids, maps, keep, fractions, self.hivtp_server.regions, device)
        self.hivtp_timer.finish(contract.any_counted(plans))
        out, at = {}, 0
        for i in views:
            count = len(plans[i].layout.grids)
            out[i] = kept[at : at + count]
            at += count
        return out


def pruned_images(plans: Sequence[Plan] | None) -> tuple[list[int], list[int]]:
    """(images whose plans prune, those of them HIVTP scores): the uniform
    baseline needs no scores, so a batch of uniform images runs the tower
    unobserved."""
    pruned = [i for i, plan in enumerate(plans or []) if plan.prunes]
    return pruned, [i for i in pruned if not plans[i].uniform]  # type: ignore[index]


class HivtpModelMixin(HivtpSelectMixin):
    """Set-up and kwargs handling shared by the LLaVA model overrides."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._hivtp_setup(vllm_config)

    def _hivtp_setup(self, vllm_config) -> None:
        """Read the server options; hook the band if the tower can be pruned."""
        from hivtp_vllm.views import cls_tokens

        self._hivtp_options(vllm_config)
        mm_config = vllm_config.model_config.multimodal_config
        self.hivtp_recorder = None
        self.hivtp_data_parallel = False
        leading = cls_tokens(self.config)
        if leading is not None:
            self.hivtp_recorder = build_recorder(
                self.vision_tower.vision_model,
                self.config.vision_config.num_hidden_layers,
                self.hivtp_server,
                cls_tokens=leading,
                span=self.hivtp_timer.span,
            )
            # vLLM builds CLIP unsharded in data mode (is_vit_use_data_parallel);
            # the batch is split only where that is so, since a sharded tower
            # fed different images on each worker would mix them in its
            # all-reduces.
            self.hivtp_data_parallel = (
                mm_config is not None
                and mm_config.mm_encoder_tp_mode == "data"
                and get_tensor_model_parallel_world_size() > 1
                and self.hivtp_recorder.num_heads == self.hivtp_recorder.total_heads
            )

    def _image_pixels_to_features(
        self, vision_tower: nn.Module, pixel_values: torch.Tensor | list[torch.Tensor]
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """vLLM's tower call; in data mode, over this worker's slice of the batch.

        Each worker encodes ``ceil(n / workers)`` images (the batch is padded
        with blank images) and the features are all-gathered, as vLLM does for
        the models that support the mode; an active score recording gathers
        its scores the same way (:meth:`ReceivedAttention.sharded_batch`).
        LLaVA-NeXT's tiles are split like images.
        """
        run = super()._image_pixels_to_features
        if not self.hivtp_data_parallel or not isinstance(pixel_values, torch.Tensor):
            return run(vision_tower, pixel_values)
        with self.hivtp_recorder.sharded_batch(_gather_batch, pixel_values.shape[0]):
            return run_dp_sharded_vision_model(pixel_values, lambda x: run(vision_tower, x))

    def _hivtp_inputs(self, kwargs: dict) -> tuple[object, list[Plan] | None]:
        """(image input, each image's plan from the processor).

        Plans are ``None`` where nothing can be pruned: no pixels (client
        embeddings), no plans from the processor, or a tower HIVTP cannot
        score.
        """
        plans = contract.pop_plans(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if (
            image_input is None
            or plans is None
            or self.hivtp_recorder is None
            or image_input["type"] != "pixel_values"
        ):
            return image_input, None
        return image_input, plans


def _gather_batch(local: torch.Tensor) -> torch.Tensor:
    """The workers' equal slices of a batch, concatenated in worker order."""
    return tensor_model_parallel_all_gather(local.contiguous(), dim=0)


def server_band(server: params.ServerOptions, depth: int, run: int) -> tuple[int, int]:
    """The band the server's options give a tower of ``depth`` layers that
    runs ``run`` of them (:func:`~hivtp_vllm.scoring.resolve_band`); a bad
    option stops the server at start-up, naming it."""
    try:
        return resolve_band(depth, run, server.layer_start, server.num_layers)
    except ValueError as exc:
        raise ValueError(f"hivtp: bad server option in --mm-processor-kwargs: {exc}") from exc


def build_recorder(
    vision_model: nn.Module,
    num_layers_total: int,
    server: params.ServerOptions,
    *,
    cls_tokens: int = 1,
    span: Callable[[torch.device], AbstractContextManager] | None = None,
) -> ReceivedAttention:
    """Listen to the band's attention in vLLM's CLIP or SigLIP tower.

    ``vision_model`` is vLLM's ``CLIPVisionTransformer`` or
    ``SiglipVisionTransformer`` (the same layout: ``encoder.layers[i].self_attn``
    calling ``attn(query, key, value)``); its encoder may stop
    before the last layer (LLaVA uses the second-to-last), and the band must
    lie inside the layers it runs. Band defaults follow the encoder's full
    depth (``num_layers_total``), as the spec says.
    """
    layers = vision_model.encoder.layers
    start, count = server_band(server, num_layers_total, len(layers))
    attention = [layers[i].self_attn for i in range(start, start + count)]
    first = attention[0]
    local_heads = first.num_heads_per_partition
    sharded = local_heads != first.num_heads
    logger.info(
        "hivtp: scoring from vision layers [%d, %d) of %d run, %d/%d heads per worker%s",
        start,
        start + count,
        len(layers),
        local_heads,
        first.num_heads,
        ", partial scores all-reduced" if sharded else "",
    )
    return ReceivedAttention(
        [a.attn for a in attention],
        num_heads=local_heads,
        total_heads=first.num_heads,
        scale=first.scale,
        # Each tensor-parallel worker holds a slice of the heads; the score is
        # a mean over all heads, so the partial sums are added across workers
        # and every worker ends with the same scores and selection.
        reduce=tensor_model_parallel_all_reduce if sharded else None,
        cls_tokens=cls_tokens,
        span=span,
    )


def select_views(
    grids: Sequence[tuple[int, int]],
    scores: Sequence[torch.Tensor | None],
    num_keep: Sequence[int],
    fractions: Sequence[float],
    regions: tuple[int, int],
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Kept flat indices for each view (``grids[i]`` is ``(H_i, W_i)``).

    ``scores[i]`` is the view's ``[H_i, W_i]`` score map, or None for the
    uniform baseline, which needs none (:func:`uniform_tokens`). HIVTP views
    are grouped by (grid, K, global fraction) so each group is one batched
    selection call; the loop runs over distinct groups, not images. A view
    that keeps nothing (an empty view, docs/spec.md section 2) gets an empty index.
    """
    kept: list[torch.Tensor | None] = [None] * len(grids)
    groups: dict[tuple, list[int]] = {}
    for i, (grid, view) in enumerate(zip(grids, scores, strict=True)):
        k = int(num_keep[i])
        if k == 0:
            kept[i] = torch.zeros(0, dtype=torch.long, device=device)
        elif view is None:
            kept[i] = uniform_tokens(*grid, k, device=device)
        else:
            groups.setdefault((tuple(grid), k, float(fractions[i])), []).append(i)
    for (_, k, fraction), rows in groups.items():
        picked = select_tokens_batched(
            torch.stack([scores[i] for i in rows]), k, regions=regions, global_fraction=fraction
        )
        for row, indices in zip(rows, picked, strict=True):
            kept[row] = indices
    return kept  # type: ignore[return-value]
