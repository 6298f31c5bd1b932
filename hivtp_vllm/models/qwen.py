"""Model-side HIVTP shared by the Qwen-VL families: score, select, position.

What differs from LLaVA (docs/spec.md section 5):

- The tower packs all images of a batch into one sequence and attends
  within each image only; each image is scored over its own segment
  (:class:`~hivtp_vllm.scoring.PackedReceivedAttention`).
- The language model gets 2 x 2 merged tokens; a merged token's score is the
  mean of its 4 patches, which the tower keeps as 4 consecutive positions.
  Selection runs on the merged grid in raster order.
- Positions are M-RoPE. The processor gave a pruned image K placeholder
  tokens; vLLM computes positions when the request arrives
  (:meth:`get_mrope_input_positions`, here exact for every text token), and
  the kept tokens' own positions are written after the tower has run
  (:meth:`recompute_mrope_positions`, vLLM's hook for its video pruning),
  from columns appended to every emitted embedding (:mod:`hivtp_vllm.mrope`).
  Videos pruned by vLLM's own video pruning (``--video-pruning-rate``) go
  the same way: grown back at arrival, their kept tokens placed after the
  tower (the family says how: :meth:`hivtp_video_runs`,
  :meth:`hivtp_pruned_videos`).
  vLLM's model runners (V1 and V2) call that hook only when the served
  config says its model prunes, which vLLM says only for its own video
  pruning; :func:`hivtp_vllm.vllm_compat.open_mrope_pruning_hook` makes it
  say so for these models (docs/algorithm.md, "Qwen2.5-VL and Qwen3-VL").

A family gives the tower's band modules and how its sequence order maps to
raster order (Qwen2.5-VL permutes patches by window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.exceptions import VLLMValidationError

from hivtp_vllm import contract, mrope, params, vllm_compat
from hivtp_vllm.contract import Layout, Plan
from hivtp_vllm.models.common import HivtpSelectMixin, logger, pruned_images, server_band
from hivtp_vllm.processor import NO_KWARGS, HivtpInfoMixin, HivtpProcessorMixin
from hivtp_vllm.scoring import PackedReceivedAttention

MERGE_UNIT = 4  # patches per merged token (2 x 2)
# Positions the language model's rotary table holds, per max_position_embeddings.
# Pruning keeps the positions of the tokens it drops, so a prompt's positions
# run past its length; vLLM sizes the table 4x for Qwen2.5-VL always and for
# Qwen3-VL when the config says its model prunes (vLLM's video pruning, or
# this plugin: vllm_compat.open_mrope_pruning_hook), for the same reason.
POSITIONS_FACTOR = 4


def position_limit(hf_config) -> int:
    """Positions the rotary table of a served Qwen-VL model holds (0 to limit - 1)."""
    text = getattr(hf_config, "text_config", hf_config)
    return text.max_position_embeddings * POSITIONS_FACTOR


class HivtpQwenInfoMixin(HivtpInfoMixin):
    """Counts from the image size alone: vLLM's own ``smart_resize`` grid."""

    def hivtp_supported(self) -> bool:
        return True

    def hivtp_image_token_id(self) -> int:
        return self.get_hf_config().image_token_id  # type: ignore[attr-defined]

    def hivtp_layout(self, *, image_width: int, image_height: int, mm_kwargs=NO_KWARGS) -> Layout:
        """The merged grid (rows, cols): the resized image over patch x merge."""
        size, _ = self._get_vision_info(  # type: ignore[attr-defined]
            image_width=image_width,
            image_height=image_height,
            num_frames=1,
            image_processor=self.get_image_processor(),  # type: ignore[attr-defined]
            mm_kwargs=mm_kwargs,
            modality="image",
        )
        vision = self.get_hf_config().vision_config  # type: ignore[attr-defined]
        unit = vision.patch_size * vision.spatial_merge_size
        return Layout(grids=((size.height // unit, size.width // unit),))


class HivtpQwenProcessorMixin(HivtpProcessorMixin):
    """The image update writes as many pads as the image's plan keeps.

    The plan travels in the processed item (its hivtp fields), so the count
    is read from it, not recomputed; items without one (client embeddings)
    keep vLLM's count.
    """

    def _hivtp_image_update(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs, stock):
        def replacement(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            if contract.NUM_KEEP not in item:
                return stock.replacement(item_idx)
            keep = item[contract.NUM_KEEP].data
            newlines = item[contract.NEWLINES].data
            return stock.target * (int(keep.sum()) + int(newlines))

        return type(stock)(modality="image", target=stock.target, replacement=replacement)

    def _hivtp_check(self, result, plans, request) -> None:
        """Refuse (400) a prompt whose positions could run past the rotary table.

        A pruned image of K tokens moves the positions after it by
        ``max(rows, cols)``, so the rest of the prompt, and every token
        decoded after it, sits ``max(rows, cols) - K`` further on than its
        length. vLLM checks a prompt's length against max_model_len, not its
        positions, and an index past the table would stop the engine. An
        image whose size is not at hand (referenced by uuid) counts as the
        longest side the processor allows.
        """
        if not request.prunes:
            return
        info = self.info  # type: ignore[attr-defined]
        places = result["mm_placeholders"].get("image", [])
        shift = 0
        for plan, place in zip(plans, places, strict=bool(plans)):
            if plan is None:
                side = info.get_max_image_tokens()
            else:
                side = max(plan.layout.grids[0])
            shift += max(0, side - place.length)
        limit = position_limit(info.get_hf_config())
        longest = info.ctx.model_config.max_model_len + shift
        if longest > limit:
            raise VLLMValidationError(
                f"hivtp: pruning these images moves the prompt's positions {shift} past its "
                f"length, so with max_model_len {longest - shift} they could reach {longest}, "
                f"past the {limit} positions this model holds. Keep more tokens of the "
                f"images ({params.RATIO}, {params.NUM_TOKENS}) or send fewer or less "
                "elongated ones.",
                parameter=params.RATIO,
            )


class HivtpQwenModelMixin(HivtpSelectMixin):
    """Set-up, image embedding and M-RoPE positions for the Qwen-VL models."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        # Named parameters: vLLM passes what the signature names.
        if vllm_config.compilation_config.compile_mm_encoder:
            raise ValueError(
                "hivtp: compile_mm_encoder (--compilation-config) compiles the Qwen-VL "
                "vision blocks, where hivtp-vllm reads the attention with module hooks. "
                "Serve without it, or without the plugin (VLLM_PLUGINS=none)."
            )
        # vLLM's runners (V1 and V2) call recompute_mrope_positions only for
        # a config that says its model prunes; vLLM's own __init__ then also
        # sizes Qwen3-VL's rotary table for positions past the prompt's length.
        vllm_compat.open_mrope_pruning_hook(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # The model's own flag keeps its meaning: vLLM's video pruning is on.
        self.is_multimodal_pruning_enabled = vllm_compat.video_pruning_on(vllm_config)
        self._hivtp_options(vllm_config)
        blocks = self.visual.blocks  # type: ignore[attr-defined]
        start, count = server_band(self.hivtp_server, len(blocks), len(blocks))
        band = self.hivtp_band(start, count)
        attention = [blocks[i].attn for i in band]
        local = attention[0].num_attention_heads_per_partition
        total = self.config.vision_config.num_heads  # type: ignore[attr-defined]
        logger.info(
            "hivtp: scoring from vision layers %s of %d, %d/%d heads per worker",
            list(band),
            len(blocks),
            local,
            total,
        )
        self.hivtp_recorder = PackedReceivedAttention(
            [a.attn for a in attention],
            num_heads=local,
            total_heads=total,
            scale=attention[0].attn.scale,
            reduce=tensor_model_parallel_all_reduce if local != total else None,
            span=self.hivtp_timer.span,
        )

    # -- family hooks ------------------------------------------------------
    def hivtp_band(self, start: int, count: int) -> Sequence[int]:
        """The blocks scored for the band ``[start, start + count)``."""
        return range(start, start + count)

    def hivtp_run_tower(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]):
        """(merged embeddings in raster order, ``raster(scores)``): the tower's
        output for all images, and a function that puts per-position scores
        in the same order as the merged embeddings."""
        raise NotImplementedError

    # -- images --------------------------------------------------------------
    def hivtp_embed_images(self, image_input, plans: list[Plan] | None) -> list[torch.Tensor]:
        """Each image's embeddings (kept ones only where pruned), with
        position columns."""
        pruned, scored = pruned_images(plans)
        if image_input["type"] != "pixel_values" or not pruned:
            embeds = self._process_image_input(image_input)  # type: ignore[attr-defined]
            return [unchanged(e) for e in embeds]
        grid_thw = image_input["image_grid_thw"].tolist()
        lengths = [t * h * w for t, h, w in grid_thw]
        recorder = self.hivtp_recorder
        with recorder.recording_segments(lengths, scored) if scored else nullcontext():
            merged, raster = self.hivtp_run_tower(image_input["pixel_values"], grid_thw)
        scores = [None] * len(lengths)
        if scored:
            per_position = recorder.position_scores(lengths)
            merged_scores = raster(per_position.view(-1, MERGE_UNIT).mean(1))
            scores = merged_scores.split([n // MERGE_UNIT for n in lengths])
        embeds = list(merged.split([n // MERGE_UNIT for n in lengths]))
        return self.hivtp_emit(embeds, {i: scores[i] for i in pruned}, plans)

    def hivtp_emit(
        self,
        embeds: list[torch.Tensor],
        scores: dict[int, torch.Tensor | None],
        plans: Sequence[Plan],
    ) -> list[torch.Tensor]:
        """Kept rows of each pruned image (raster order) and every row of the
        others, each with its position columns."""
        device = embeds[0].device
        views = {i: None if s is None else [s] for i, s in scores.items()}
        kept = self._hivtp_select(plans, views, device)
        out = [unchanged(e) for e in embeds]
        for row, (indices,) in kept.items():
            rows, cols = plans[row].layout.grids[0]
            indices = indices.to(device)
            grid = torch.stack([torch.zeros_like(indices), indices // cols, indices % cols], 1)
            slots = torch.arange(len(indices))
            channels = mrope.row_channels(slots, grid, 0, embeds[row].dtype, max(rows, cols))
            out[row] = with_channels(embeds[row][indices], channels)
        return out

    def hivtp_embed_videos(self, video_input) -> list[torch.Tensor]:
        """Videos as in vLLM: unpruned, with columns that leave their
        positions alone, or, with vLLM's video pruning on, its kept tokens
        with their unpruned positions (:meth:`hivtp_pruned_videos`)."""
        embeds = self._process_video_input(video_input)  # type: ignore[attr-defined]
        if self.is_multimodal_pruning_enabled:  # type: ignore[attr-defined]
            return list(self.hivtp_pruned_videos(embeds, video_input))
        return [unchanged(e) for e in embeds]

    def hivtp_pruned_videos(self, embeds, video_input) -> Sequence[torch.Tensor]:
        """vLLM's video pruning of each video, with position columns
        (:func:`hivtp_vllm.mrope.row_channels`) in place of vLLM's own."""
        raise NotImplementedError

    def hivtp_video_runs(self, input_tokens, feature) -> list[tuple[int, int, int, int]]:
        """The placeholder runs of a video that vLLM's video pruning shortened,
        as :func:`hivtp_vllm.mrope.unpruned_prompt` takes them."""
        raise NotImplementedError

    def embed_multimodal(self, **kwargs: object):
        plans = contract.pop_plans(kwargs)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)  # type: ignore[attr-defined]
        out: list[torch.Tensor] = []
        for modality, media in by_modality.items():  # in the order the prompt has them
            if modality == "image":
                out += self.hivtp_embed_images(media, plans)
            elif modality == "video":
                out += self.hivtp_embed_videos(media)
        return tuple(out)

    # -- positions ---------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """vLLM's positions of the unpruned prompt, at the pruned prompt's tokens."""
        runs, grown = [], []
        config = self.config  # type: ignore[attr-defined]
        for feature in mm_features:
            place = feature.mm_position
            item_runs = []
            if feature.data is None:  # embeddings from the client: never pruned
                pass
            elif feature.modality == "image":
                full = int(feature.data["image_grid_thw"].data.prod()) // MERGE_UNIT
                if place.length < full:
                    item_runs = [(place.offset, place.length, full, config.image_token_id)]
            elif feature.modality == "video" and self.is_multimodal_pruning_enabled:  # type: ignore[attr-defined]
                item_runs = self.hivtp_video_runs(input_tokens, feature)
            runs += item_runs
            grown.append((feature, place.length + sum(f - n for _, n, f, _ in item_runs)))
        if not runs:
            positions, delta = super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
            return vllm_compat.remember_decode_offset(positions, delta), delta
        tokens, where = mrope.unpruned_prompt(input_tokens, runs)
        features = [
            dataclasses.replace(
                feature,
                mm_position=dataclasses.replace(
                    feature.mm_position, offset=where[feature.mm_position.offset], length=length
                ),
            )
            for feature, length in grown
        ]
        positions, _ = super().get_mrope_input_positions(tokens, features)  # type: ignore[misc]
        # Decoding continues where it would unpruned: after the largest position.
        delta = int(positions.max()) + 1 - len(input_tokens)
        return vllm_compat.remember_decode_offset(positions[:, where], delta), delta

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | None,
        multimodal_embeddings,
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ):
        config = self.config  # type: ignore[attr-defined]
        if input_ids is None:  # a prompt given as embeddings: no image placeholders
            embeds = [e[:, : -mrope.CHANNELS] for e in multimodal_embeddings]
            length = mrope_positions.shape[-1]
            return (
                embeds,
                mrope_positions,
                decode_delta(mrope_positions, mrope_positions, 0, length),
            )
        embeds, positions, end = mrope.place(
            input_ids,
            mrope_positions,
            list(multimodal_embeddings),
            num_computed_tokens,
            (config.image_token_id, config.video_token_id),
        )
        return embeds, positions, decode_delta(mrope_positions, positions, end, len(input_ids))

    def get_encoder_cudagraph_config(self):
        return vllm_compat.capture_no_encoder_graphs(super().get_encoder_cudagraph_config())  # type: ignore[misc]


def decode_delta(given: torch.Tensor, placed: torch.Tensor, end: int, prompt_length: int) -> int:
    """The decoding offset to hand back to the runner.

    V1: the one stored at arrival on the tensor it keeps
    (:func:`hivtp_vllm.vllm_compat.remember_decode_offset`). V2 (vLLM
    0.32, 0.33: ``MultiModalPruner.recompute``) hands a copy and calls the
    hook only for a prefill chunk that holds media rows, last for the chunk
    with the prompt's last media rows: the offset is then one past the
    largest exact position, or past the unpruned end of the runs placed in
    this chunk (``end``, from the rows' extent) where the prompt ends in one.
    """
    delta = vllm_compat.remembered_decode_offset(given)
    if delta is not None:
        return delta
    return max(int(placed.max()) + 1, end) - prompt_length


def with_channels(embeds: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    return torch.cat([embeds, channels.to(device=embeds.device, dtype=embeds.dtype)], dim=1)


def unchanged(embeds: torch.Tensor) -> torch.Tensor:
    """Rows whose positions vLLM made exact at arrival."""
    return with_channels(embeds, mrope.unchanged_channels(len(embeds), embeds))
