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
