"""The spec's importance score computed independently, from transformers."""

from __future__ import annotations

import torch

from hivtp_vllm.pruning import default_band


def transformers_scores(
    model_cls, checkpoint, pixel_values: torch.Tensor, cls_tokens: int = 1
) -> torch.Tensor:
    """Mean attention received per patch over the band's layers, heads and
    queries, from the tower (``CLIPVisionModel``, ``SiglipVisionModel``) with
    ``output_attentions=True`` on the checkpoint's own weights; ``[B, N]``
    with the CLS column dropped (SigLIP has none: ``cls_tokens=0``)."""
    model = model_cls.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True)
    start, count = default_band(tower.config.num_hidden_layers)
    band = torch.stack(out.attentions[start : start + count])  # [q, B, heads, S, S]
    return band.mean(dim=(0, 2, 3))[:, cls_tokens:]


def qwen_model_class(arch: str) -> type:
    """The transformers class of a merged family's checkpoint (its row's
    ``checkpoint.model``): Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5..."""
    from hivtp_vllm.families import FAMILIES

    checkpoint = FAMILIES[arch].checkpoint
    return checkpoint.resolve(checkpoint.model)


def qwen_transformers_scores(
    arch: str,
    checkpoint,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    band,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Per image, the mean attention each merged token's 4 patches receive
    over the ``band`` layers, all heads and the image's own queries, in
    raster order, from the family's transformers tower (Qwen2.5-VL's,
    Qwen3-VL's, Qwen3.5's: the row's model class) with eager attention on the
    checkpoint's weights in ``dtype`` (attention weights read where
    transformers' eager attention returns them, per image segment; summed in
    float32). The tower alone runs: nothing here masks any token."""
    import sys

    model_cls = qwen_model_class(arch)
    module = sys.modules[model_cls.__module__]  # whose eager_attention_forward the tower calls
    model = model_cls.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
    tower = model.model.visual
    layer = {"now": None}
    received: dict[int, list[torch.Tensor]] = {}
    original = module.eager_attention_forward

    def eager(attention, query, key, value, *args, **kwargs):
        out, weights = original(attention, query, key, value, *args, **kwargs)
        if layer["now"] in band:  # weights [1, heads, queries, keys]
            received.setdefault(layer["now"], []).append(
                weights[0].float().sum(dim=1).mean(dim=0) / weights.shape[-2]
            )
        return out, weights

    hooks = [
        block.register_forward_pre_hook(lambda _m, _a, i=i: layer.__setitem__("now", i))
        for i, block in enumerate(tower.blocks)
    ]
    module.eager_attention_forward = eager
    try:
        with torch.no_grad():
            tower(pixel_values.to(dtype), grid_thw=grid_thw)
    finally:
        module.eager_attention_forward = original
        for hook in hooks:
            hook.remove()
    per_position = torch.stack([torch.cat(received[i]) for i in band]).mean(dim=0)
    merged = per_position.view(-1, 4).mean(dim=1)
    if getattr(tower.config, "fullatt_block_indexes", None):
        # Windowed attention (Qwen2.5-VL): the tower's window order, undone
        # as its merger's output is.
        window_index, _ = module.get_vision_window_index(
            grid_thw,
            spatial_merge_size=tower.spatial_merge_size,
            window_size=tower.window_size,
            patch_size=tower.patch_size,
            kwargs={},
        )
        merged = merged[torch.argsort(window_index)]
    return list(merged.split((grid_thw.prod(-1) // 4).tolist()))
