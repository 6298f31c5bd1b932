"""The registry of every vLLM internal hivtp-vllm relies on.

vLLM has no extension point for what HIVTP does (fewer placeholder tokens per
image, chosen per request, and a pruned set of image embeddings), so the
plugin subclasses vLLM's model and processor classes, overrides and calls
some of their private members, relies on call conventions, and patches a few
vLLM objects at run time. Each is a row here, in the manner of vllm-ascend's
``vllm_ascend/patch/__init__.py``: what it is, where in vLLM, why the plugin
needs it, how (the plugin's modules that rely on it; for a runtime patch, the
function in :mod:`hivtp_vllm.vllm_compat`, the one module that patches), the
runners and releases it was checked on, and the upstream change that would
retire it. Remove a row's dependency when that change lands, then the row.

Checked by tests/test_internals.py: every symbol resolves in the installed
vLLM, every vLLM name the package imports and every private vLLM member it
overrides or calls is named here, every runtime patch lives in vllm_compat
and is a row here; docs/vllm-internals.md prints this table
(``python -m hivtp_vllm.internals``). Pure data: no vLLM import.

Symbols: ``module:attr.path`` (imported and resolved), or
``module:Class#name`` for an instance attribute (found as ``self.name`` or a
field in the class's source or its vLLM bases').
"""

from __future__ import annotations

from dataclasses import dataclass

# Releases every row was checked on (vllm_compat.SUPPORTED_VLLM).
RELEASES = ("0.32.0", "0.33.0")


@dataclass(frozen=True)
class Internal:
    """One vLLM internal the plugin relies on."""

    what: str  # the members and the convention, as the plugin uses them
    where: str  # files, relative to the installed ``vllm/`` package
    why: str
    symbols: tuple[str, ...]
    code: tuple[str, ...]  # the plugin's modules (under hivtp_vllm) that rely on it
    runners: tuple[str, ...]  # model runners it runs under ("V1", "V2"); () API server
    checked: dict[str, str]  # release -> how it was checked
    retire: str  # the upstream change that would retire it
    patch: str | None = None  # the runtime patch (in vllm_compat) that changes vLLM here


INTERNALS: tuple[Internal, ...] = (
    Internal(
        what="`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` subclassed; `__init__(*, vllm_config, prefix)`; `embed_multimodal(**kwargs)` overridden; `vision_tower`, `multi_modal_projector`, `config`",
        where="`model_executor/models/llava.py`, `llava_next.py`",
        why="our models replace the image embedding step and keep the rest of vLLM's model",
        symbols=(
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration.embed_multimodal",
            "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration.embed_multimodal",
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration#vision_tower",
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration#multi_modal_projector",
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration#config",
            "vllm.model_executor.models.interfaces:MultiModalEmbeddings",
        ),
        code=("models.llava", "models.llava_next", "models.common"),
        runners=("V1", "V2"),
        checked={"0.32.0": "tests (servers, CPU)", "0.33.0": "identical files"},
        retire="none needed: subclassing the served class is vLLM's way to change a model (`ModelRegistry.register_model`); retire the private calls below when vLLM offers a hook between the tower and the projector",
    ),
    Internal(
        what='private model methods called or overridden: `_parse_and_validate_image_input(**kwargs)` (returns a dict with `type`, `pixel_values`, `image_sizes`), `_process_image_input` (the stock path), `_process_image_pixels`, `_image_pixels_to_features(vision_tower, pixel_values)` (overridden for the data-parallel encoder), `_merge_image_patch_embeddings(image_size, embeds, strategy="spatial_unpad")`',
        where="`model_executor/models/llava.py`, `llava_next.py`",
        why="run the tower exactly as vLLM does (once, scores read on the way), then select among its features in vLLM's own layout",
        symbols=(
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration._parse_and_validate_image_input",
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration._process_image_input",
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration._process_image_pixels",
            "vllm.model_executor.models.llava:LlavaForConditionalGeneration._image_pixels_to_features",
            "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration._parse_and_validate_image_input",
            "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration._process_image_input",
            "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration._image_pixels_to_features",
            "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration._merge_image_patch_embeddings",
        ),
        code=("models.llava", "models.anyres", "models.llava_next", "models.common"),
        runners=("V1", "V2"),
        checked={"0.32.0": "tests (servers, CPU)", "0.33.0": "identical files"},
        retire="a public embedding hook that hands a model its tower features and lets it choose rows (vLLM's video pruning has one only for its own EVS)",
    ),
    Internal(
        what="processing info: `LlavaProcessingInfo`, `LlavaNextProcessingInfo` subclassed; `get_vision_encoder_info()` (`get_patch_grid_length()`, `get_image_size()`), `get_hf_config()`, `ctx.get_mm_config()`, `ctx.model_config.served_model_name`; private `_get_num_unpadded_features(original_height, original_width, npatches, num_patch_height, num_patch_width)` -> (features, newlines)",
        where="`model_executor/models/llava.py`, `llava_next.py`, `vision.py`, `clip.py` (`CLIPEncoderInfo`), `multimodal/processing/context.py`",
        why="count each image's views exactly as vLLM lays them out, so the placeholders equal the embeddings the model returns",
        symbols=(
            "vllm.model_executor.models.llava:LlavaProcessingInfo.get_vision_encoder_info",
            "vllm.model_executor.models.llava:LlavaProcessingInfo.get_hf_config",
            "vllm.model_executor.models.llava_next:LlavaNextProcessingInfo._get_num_unpadded_features",
            "vllm.model_executor.models.clip:CLIPEncoderInfo.get_patch_grid_length",
            "vllm.model_executor.models.clip:CLIPEncoderInfo.get_image_size",
            "vllm.multimodal.processing.context:InputProcessingContext.get_mm_config",
            "vllm.multimodal.processing.context:InputProcessingContext#model_config",
        ),
        code=("models.llava", "models.anyres", "processor"),
        runners=(),
        checked={
            "0.32.0": "tests (processor, GPU build; servers)",
            "0.33.0": "identical files; processor tests pass",
        },
        retire="a public per-image token count in the processing info (`_get_num_unpadded_features` public)",
    ),
    Internal(
        what="processor methods overridden: `apply(inputs, timing_ctx)`, `get_dummy_inputs(seq_len, mm_counts, mm_options)` (its `ProcessorInputs` marked as dummies in `hf_processor_mm_kwargs`, the value `apply` reads), `_call_hf_processor(hf_data, hf_kwargs)`, `_get_mm_hashes(inputs)`, `_postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)`, `_get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)`, `_get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)`; `LlavaMultiModalProcessor`, `LlavaNextMultiModalProcessor`, `LlavaDummyInputsBuilder`",
        where="`multimodal/processing/processor.py` (`BaseMultiModalProcessor`), `model_executor/models/llava.py`, `llava_next.py`",
        why="K placeholders per image, our keys kept out of the HF processor, cache keys carrying the effective pruning, warm-up items not counted",
        symbols=(
            "vllm.multimodal.processing.processor:BaseMultiModalProcessor.apply",
            "vllm.multimodal.processing.processor:BaseMultiModalProcessor.get_dummy_inputs",
            "vllm.multimodal.processing.processor:BaseMultiModalProcessor._call_hf_processor",
            "vllm.multimodal.processing.processor:BaseMultiModalProcessor._get_mm_hashes",
            "vllm.multimodal.processing.processor:BaseMultiModalProcessor._postprocess_hf_mm_data",
            "vllm.multimodal.processing.processor:BaseMultiModalProcessor._get_mm_fields_config",
            "vllm.multimodal.processing.processor:BaseMultiModalProcessor._get_prompt_updates",
            "vllm.model_executor.models.llava:LlavaMultiModalProcessor",
            "vllm.model_executor.models.llava:LlavaDummyInputsBuilder",
            "vllm.model_executor.models.llava_next:LlavaNextMultiModalProcessor",
        ),
        code=("processor",),
        runners=(),
        checked={
            "0.32.0": "tests (processor, GPU build; servers)",
            "0.33.0": "identical files; processor tests pass",
        },
        retire="a processor hook for request-dependent placeholder counts (vLLM's `get_num_image_tokens` takes no request options) and one for extra cache-key material",
    ),
    Internal(
        what='LLaVA-OneVision: `LlavaOnevisionForConditionalGeneration` subclassed; `embed_multimodal` overridden; `_parse_and_validate_multimodal_inputs(**kwargs)` (a dict by modality, in prompt order), `_process_image_input`, `_process_video_pixels`, `_image_pixels_to_features(vision_tower, pixel_values)`, `_merge_image_patch_embeddings(image_size, embeds, *, image_newline=, strategy="spatial_unpad")` (unpad, then `anyres_max_9` bilinear shrink whatever the config says), `image_newline`; `LlavaOnevisionProcessingInfo._get_num_unpadded_features` (the count, shrink included), `LlavaOnevisionMultiModalProcessor` (`_get_mm_fields_config` defines its fields without `super()`; with videos, `_apply_hf_processor_main` processes images apart and hands `_postprocess_hf_mm_data` no `images` input, so the plan reads `image_sizes`), `_get_prompt_updates` (image and video updates), `LlavaOnevisionDummyInputsBuilder`',
        where="`model_executor/models/llava_onevision.py`",
        why="the third family: the same tower-then-gather path, the scores put through the features' unpad and shrink, videos left to vLLM",
        symbols=(
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration._parse_and_validate_multimodal_inputs",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration._process_image_input",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration._process_video_pixels",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration._image_pixels_to_features",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionForConditionalGeneration#image_newline",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionProcessingInfo._get_num_unpadded_features",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionMultiModalProcessor._get_mm_fields_config",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionMultiModalProcessor._apply_hf_processor_main",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionMultiModalProcessor._get_prompt_updates",
            "vllm.model_executor.models.llava_onevision:LlavaOnevisionDummyInputsBuilder",
        ),
        code=("models.llava_onevision", "models.anyres"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (processor, model, servers, CPU)",
            "0.33.0": "file differs only by a removed type alias (`LlavaOnevisionMultiInputs`) (*read*)",
        },
        retire="as for LLaVA-NeXT (rows above)",
    ),
    Internal(
        what="SigLIP tower layout: `vision_tower.vision_model.encoder.layers[i].self_attn` (`SiglipAttention`: `num_heads`, `num_heads_per_partition`, `scale`, `attn` called as `attn(query, key, value)`, `[B, S, heads * head_dim]`), no CLS position",
        where="`model_executor/models/siglip.py`",
        why="the scoring hook reads OneVision's tower as it reads CLIP's",
        symbols=(
            "vllm.model_executor.models.siglip:SiglipAttention#num_heads",
            "vllm.model_executor.models.siglip:SiglipAttention#num_heads_per_partition",
            "vllm.model_executor.models.siglip:SiglipAttention#scale",
            "vllm.model_executor.models.siglip:SiglipAttention#attn",
            "vllm.model_executor.models.siglip:SiglipEncoder#layers",
            "vllm.model_executor.models.siglip:SiglipVisionTransformer#encoder",
        ),
        code=("models.common", "scoring"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (scores equal transformers' eager `SiglipVisionModel`)",
            "0.33.0": "identical file",
        },
        retire="an attention-probability hook in vLLM's encoder attention (`MMEncoderAttention` never materialises them)",
    ),
    Internal(
        what="Qwen2.5-VL: `Qwen2_5_VLForConditionalGeneration` subclassed; `embed_multimodal` overridden; `_parse_and_validate_multimodal_inputs(**kwargs)` (a dict by modality, in prompt order), `_process_image_input`, `_process_video_input`, `iter_mm_grid_thw(mm_features)` (offset, t, h, w, t_factor per item, sorted by offset), `get_mrope_input_positions(input_tokens, mm_features)` and `recompute_mrope_positions(input_ids=, multimodal_embeddings=, mrope_positions=, num_computed_tokens=)` (overridden: returns embeddings, positions, delta), `get_encoder_cudagraph_config` (overridden: the stock config with no modality, `EncoderCudaGraphConfig.modalities` emptied), `config.image_token_id`, `video_token_id`, `vision_start_token_id`",
        where="`model_executor/models/qwen2_5_vl.py`",
        why="the model, M-RoPE positions of pruned images",
        symbols=(
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.embed_multimodal",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._parse_and_validate_multimodal_inputs",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._process_image_input",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration._process_video_input",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration.get_encoder_cudagraph_config",
            "vllm.v1.worker.encoder_cudagraph_defs:EncoderCudaGraphConfig#modalities",
        ),
        code=("models.qwen", "models.qwen2_5_vl", "vllm_compat"),
        patch="vllm_compat.capture_no_encoder_graphs",
        runners=("V1", "V2"),
        checked={"0.32.0": "tests (in-process engine, servers)", "0.33.0": "identical file"},
        retire="as for LLaVA; the encoder CUDA graph config emptied (`vllm_compat.capture_no_encoder_graphs`) until graph replay runs a model's embedding hook",
    ),
    Internal(
        what="Qwen3-VL: `Qwen3VLForConditionalGeneration`, `Qwen3VLProcessingInfo`, `Qwen3VLMultiModalProcessor`, `Qwen3VLDummyInputsBuilder` subclassed as for Qwen2.5-VL; the tower `visual(pixel_values, grid_thw=)` returns rows of main and DeepStack features concatenated on the hidden dimension, in raster order, split in `embed_input_ids` after the runner's `recompute_mrope_positions`; blocks' `attn` is `Qwen2_5_VisionAttention` (same call as above); `_process_video_input`, `_get_vision_info` (32 px per merged token)",
        where="`model_executor/models/qwen3_vl.py`",
        why="the model and its count",
        symbols=(
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLProcessingInfo",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLDummyInputsBuilder",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration._process_video_input",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLProcessingInfo._get_vision_info",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration.get_encoder_cudagraph_config",
        ),
        code=("models.qwen", "models.qwen3_vl"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (in-process engine, servers, processor on both GPU builds)",
            "0.33.0": "identical file",
        },
        retire="as for Qwen2.5-VL",
    ),
    Internal(
        what="Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE: `Qwen3VLMoeForConditionalGeneration`, `Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration` subclass `Qwen3VLForConditionalGeneration` with its processor and dummy builder and their own `ProcessingInfo` (`get_hf_config` of their config class); subclassed as Qwen3-VL is (the same tower call, video pruning and position hooks, through `HivtpQwen3VLModelMixin`); each `__init__` sets `is_multimodal_pruning_enabled` from the config, which the plugin resets after it to vLLM's own video pruning; the Qwen3.5 classes' `__init__` (`nn.Module.__init__`, not Qwen3-VL's) never calls `_init_video_pruning`, so `video_pruning_method` is missing and `--video-pruning-rate` fails at the first video: the plugin refuses that option at start for them",
        where="`model_executor/models/qwen3_vl_moe.py`, `qwen3_5.py`",
        why="the models and their counts",
        symbols=(
            "vllm.model_executor.models.qwen3_vl_moe:Qwen3VLMoeForConditionalGeneration",
            "vllm.model_executor.models.qwen3_vl_moe:Qwen3VLMoeProcessingInfo",
            "vllm.model_executor.models.qwen3_5:Qwen3_5ForConditionalGeneration",
            "vllm.model_executor.models.qwen3_5:Qwen3_5MoeForConditionalGeneration",
            "vllm.model_executor.models.qwen3_5:Qwen3_5ProcessingInfo",
            "vllm.model_executor.models.qwen3_5:Qwen3_5MoeProcessingInfo",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration._init_video_pruning",
        ),
        code=("models.qwen3_vl_moe", "models.qwen3_5"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (in-process engine, servers, processor on both GPU builds)",
            "0.33.0": "identical files",
        },
        retire="as for Qwen2.5-VL; the Qwen3.5 refusal of `--video-pruning-rate` when vLLM's Qwen3.5 classes call `_init_video_pruning`",
    ),
    Internal(
        what="GLM-4.1V and GLM-4.5V: `Glm4vForConditionalGeneration` (and `Glm4vMoeForConditionalGeneration`, its subclass with another `packed_modules_mapping`), `Glm4vProcessingInfo`, `Glm4vMultiModalProcessor`, `Glm4vDummyInputsBuilder` subclassed as for Qwen3-VL (the same `embed_multimodal`, `_parse_and_validate_multimodal_inputs`, `_process_image_input`, `_process_video_input`, `get_mrope_input_positions` on the unpruned prompt, where `iter_mm_grid_thw` asserts full image runs); the tower `visual(pixel_values, grid_thw=)` returns one row per merged token in raster order, full attention in every block, blocks' `attn.attn` an `MMEncoderAttention`; the image update's `<|image|>` target; `Glm4vMultiModalProcessor._apply_hf_processor_main` calls the HF processor through `ctx.call_hf_processor` (not `_call_hf_processor`) with its `hf_kwargs` and then `_finalize_hf_mm_data(hf_data, hf_kwargs, passthrough_data, processed_data)`, overridden to keep the plugin's keys out of the HF call and hand them back to post-processing; `_merge_and_resolve_mm_processor_kwargs` (the request's `size` routed into `images_kwargs`) read for the grid, which is computed with transformers' glm4v `smart_resize` (two frames) because `_get_vision_info` ignores `shortest_edge` and the request; the class lacks `SupportsMultiModalPruning`: the served class adds it (`supports_multimodal_pruning`, `supported_video_pruning_methods = ()`, which `ModelConfig` reads, so `--video-pruning-rate` is refused by the model's `__init__`, not accepted and ignored as stock)",
        where="`model_executor/models/glm4_1v.py`, `model_executor/models/interfaces.py`, `multimodal/processing/processor.py`, `multimodal/processing/context.py`, `config/model.py`",
        why="the models, their counts, the runners' position hook",
        symbols=(
            "vllm.model_executor.models.glm4_1v:Glm4vForConditionalGeneration",
            "vllm.model_executor.models.glm4_1v:Glm4vMoeForConditionalGeneration",
            "vllm.model_executor.models.glm4_1v:Glm4vProcessingInfo",
            "vllm.model_executor.models.glm4_1v:Glm4vMultiModalProcessor",
            "vllm.model_executor.models.glm4_1v:Glm4vDummyInputsBuilder",
            "vllm.model_executor.models.glm4_1v:Glm4vForConditionalGeneration._parse_and_validate_multimodal_inputs",
            "vllm.model_executor.models.glm4_1v:Glm4vForConditionalGeneration._process_image_input",
            "vllm.model_executor.models.glm4_1v:Glm4vForConditionalGeneration._process_video_input",
            "vllm.model_executor.models.glm4_1v:Glm4vForConditionalGeneration.iter_mm_grid_thw",
            "vllm.model_executor.models.glm4_1v:Glm4vForConditionalGeneration.get_mrope_input_positions",
            "vllm.model_executor.models.glm4_1v:Glm4vForConditionalGeneration.get_encoder_cudagraph_config",
            "vllm.model_executor.models.glm4_1v:Glm4vMultiModalProcessor._apply_hf_processor_main",
            "vllm.model_executor.models.glm4_1v:Glm4vMultiModalProcessor._finalize_hf_mm_data",
            "vllm.model_executor.models.glm4_1v:Glm4vProcessingInfo._merge_and_resolve_mm_processor_kwargs",
            "vllm.model_executor.models.interfaces:SupportsMultiModalPruning",
        ),
        code=("models.glm4_1v",),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (in-process engine: tests/test_glm4v.py)",
            "0.33.0": "identical file (docs/glm4v-notes.md, section f); not run",
        },
        retire="as for Qwen2.5-VL; the processor override when vLLM's GLM processor calls `_call_hf_processor`; the interface when vLLM's GLM class implements `SupportsMultiModalPruning`",
    ),
    Internal(
        what="Gemma 3: `Gemma3ForConditionalGeneration`, `Gemma3ProcessingInfo`, `Gemma3MultiModalProcessor`, `Gemma3DummyInputsBuilder` subclassed; `embed_multimodal` overridden over `_parse_and_validate_image_input(**kwargs)` (`pixel_values` of every view, `num_patches` views per image), `_image_pixels_to_features(vision_tower, pixel_values)` and `multi_modal_projector` (the 4 x 4 average pool, then RMSNorm and a matmul per token), the tower `vision_tower.vision_model` a `SiglipVisionTransformer` whose `encoder.layers[i].self_attn.attn(q, k, v)` is an `MMEncoderAttention`; `get_num_crops(image_width=, image_height=, processor=, mm_kwargs=)` for the views; the image update's `<start_of_image>` target and `cached_encode` of the replacement text, whose soft tokens `PromptUpdateDetails.select_token_id` marks; `get_encoder_cudagraph_config` (overridden: no modality captured)",
        where="`model_executor/models/gemma3_mm.py`, `model_executor/models/siglip.py`, `multimodal/processing/processor.py`",
        why="the model, its views and counts, the prompt's wrapper around kept tokens",
        symbols=(
            "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration",
            "vllm.model_executor.models.gemma3_mm:Gemma3ProcessingInfo",
            "vllm.model_executor.models.gemma3_mm:Gemma3MultiModalProcessor",
            "vllm.model_executor.models.gemma3_mm:Gemma3DummyInputsBuilder",
            "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration._parse_and_validate_image_input",
            "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration._image_pixels_to_features",
            "vllm.model_executor.models.gemma3_mm:Gemma3ForConditionalGeneration.get_encoder_cudagraph_config",
            "vllm.model_executor.models.gemma3_mm:Gemma3ProcessingInfo.get_num_crops",
            "vllm.multimodal.processing.processor:cached_encode",
            "vllm.multimodal.processing.processor:PromptUpdateDetails.select_token_id",
        ),
        code=("models.gemma3", "vllm_compat"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (in-process engine: tests/test_gemma3.py; servers)",
            "0.33.0": "the same file but one line: `__init__` sets `text_config.is_mm_prefix_lm` (image tokens attend both ways on a GPU; a view's kept tokens stay one run, so one block); not run",
        },
        retire="as for LLaVA (a pruning hook in vLLM's multimodal path); the encoder CUDA graph config emptied until graph replay runs a model's embedding hook",
        patch="vllm_compat.capture_no_encoder_graphs",
    ),
    Internal(
        what='M-RoPE step 1: `get_mrope_input_positions` of the stock class called on the prompt grown back to its unpruned length, with each `MultiModalFeatureSpec` copied by `dataclasses.replace` (a `PlaceholderRange` with the grown `offset` and `length`); `feature.data["image_grid_thw"]` present in the worker',
        where="`multimodal/inputs.py`, the two model files",
        why="exact text positions whatever the family's video rules",
        symbols=(
            "vllm.multimodal.inputs:MultiModalFeatureSpec",
            "vllm.multimodal.inputs:PlaceholderRange",
            "vllm.multimodal.inputs:MultiModalFeatureSpec#mm_position",
            "vllm.multimodal.inputs:MultiModalFeatureSpec#data",
            "vllm.multimodal.inputs:PlaceholderRange#offset",
            "vllm.multimodal.inputs:PlaceholderRange#length",
        ),
        code=("models.qwen",),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (positions equal transformers' `get_rope_index`)",
            "0.33.0": "identical files",
        },
        retire="a position hook that is told each item's kept tokens (vLLM's M-RoPE assumes a full grid a run)",
    ),
    Internal(
        what="Qwen2.5-VL tower: `visual.blocks[i].attn` (`num_attention_heads_per_partition`) calling `attn.attn(query=, key=, value=, cu_seqlens=, ...)` by keyword, q and k `[1, S, heads, head_dim]` after the rotary embedding, `attn.attn.scale`; `visual.fullatt_block_indexes`; `visual.prepare_encoder_metadata(grid_thw)` (a dict with `reverse_indices`) and `visual(pixel_values, grid_thw=, encoder_metadata=)`; merged tokens = 4 consecutive sequence positions; images contiguous in input order",
        where="`model_executor/models/qwen2_5_vl.py`, `model_executor/layers/attention/mm_encoder_attention.py`",
        why="score each image over its own segment, undo the window order",
        symbols=(
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VisionTransformer.prepare_encoder_metadata",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VisionTransformer#fullatt_block_indexes",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VisionTransformer#blocks",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VisionAttention#num_attention_heads_per_partition",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VisionAttention#attn",
            "vllm.model_executor.layers.attention.mm_encoder_attention:MMEncoderAttention",
        ),
        code=("models.qwen", "models.qwen2_5_vl", "scoring"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (scores equal transformers' eager attention)",
            "0.33.0": "identical files",
        },
        retire="an attention-probability hook in vLLM's encoder attention",
    ),
    Internal(
        what="Qwen2.5-VL processing: `Qwen2_5_VLProcessingInfo`, `Qwen2_5_VLMultiModalProcessor`, `Qwen2_5_VLDummyInputsBuilder`; `info._get_vision_info(image_width=, image_height=, num_frames=, image_processor=, mm_kwargs=, modality=)` (the resized size: vLLM's own count), `info.get_image_processor()`; `_get_prompt_updates` returns one `PromptReplacement` per modality whose `replacement(item_idx)` gives vLLM's count",
        where="`model_executor/models/qwen2_5_vl.py`, `qwen2_vl.py`",
        why="K pads per image, counted before encoding",
        symbols=(
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLProcessingInfo",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLDummyInputsBuilder",
            "vllm.model_executor.models.qwen2_vl:Qwen2VLProcessingInfo._get_vision_info",
            "vllm.model_executor.models.qwen2_vl:Qwen2VLProcessingInfo.get_image_processor",
        ),
        code=("models.qwen", "models.qwen2_5_vl"),
        runners=(),
        checked={
            "0.32.0": "tests (processor, also on both GPU builds; count-contract property tests)",
            "0.33.0": "identical files",
        },
        retire="a public per-image token count (`_get_vision_info` public)",
    ),
    Internal(
        what="Video pruning (EVS) on Qwen-VL, with `--video-pruning-rate`: the models' `is_multimodal_pruning_enabled` and `video_pruning_rate` (set in vLLM's `__init__`); `vllm.multimodal.video_prune.evs.compute_retention_mask(emb, thw, spatial_merge_size=, q=)` (Qwen2.5-VL: which tokens a video keeps, as vLLM's `_postprocess_video_embeds_evs`); Qwen3-VL `_postprocess_video_embeds_evs(embeds, video_input)` called as is, and **`_get_expanded_positions(**kwargs)` overridden** (vLLM's returns a pruned run's `[n, 5]` int64 rows `[t, h, w, is_vision_start, is_video]`; the override writes the first three and the run's lead in the plugin's columns); the processors' pruned counts (Qwen2.5-VL: one run of `compute_retained_tokens_count` video pads; Qwen3-VL: all of them in the first frame, later frames empty)",
        where="`multimodal/video_prune/evs.py`, `model_executor/models/qwen2_5_vl.py`, `qwen3_vl.py`",
        why="videos pruned by vLLM next to images pruned by the plugin, every kept token at its unpruned position",
        symbols=(
            "vllm.multimodal.video_prune.evs:compute_retention_mask",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration._postprocess_video_embeds_evs",
            "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration._get_expanded_positions",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration#is_multimodal_pruning_enabled",
            "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration#video_pruning_rate",
        ),
        code=("models.qwen", "models.qwen2_5_vl", "models.qwen3_vl"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (`test_qwen_video_pruning.py`: positions equal vLLM's unpruned ones across 24-token prefill chunks, counts, server)",
            "0.33.0": "`evs.py` identical; Qwen3-VL's video pruning methods identical (diffed)",
        },
        retire="vLLM's video pruning writing its kept tokens' positions through a public hook both pruners share",
    ),
    Internal(
        what="Rotary table of the Qwen-VL language models: `MRotaryEmbedding` holds `max_position_embeddings` x `mrope_positions_factor` positions; Qwen3-VL's factor is 4 when the served config says its model prunes (`mrope_positions_factor(vllm_config)`, which the plugin's hook switch makes true) and 1 otherwise, Qwen2.5-VL's always 4",
        where="`model_executor/layers/rotary_embedding/mrope.py`, `base.py`, `model_executor/models/qwen3_vl.py`",
        why="a pruned prompt's positions run past its length; `models/qwen.position_limit` takes the table as 4x and the processor refuses (400) a prompt whose positions could pass it",
        symbols=(
            "vllm.model_executor.layers.rotary_embedding.mrope:MRotaryEmbedding",
            "vllm.model_executor.models.qwen3_vl:mrope_positions_factor",
        ),
        code=("models.qwen",),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (`test_qwen_positions.py`: decoding to max_model_len = max_position_embeddings past the stock table; a request that could pass 4x is a 400)",
            "0.33.0": "identical",
        },
        retire="vLLM sizing the rotary table for any model that prunes (as it does for its own video pruning)",
    ),
    Internal(
        what="the M-RoPE pruning hook's gate: both runners call `model.recompute_mrope_positions(input_ids=, multimodal_embeddings=, mrope_positions=, num_computed_tokens=)` only when `supports_multimodal_pruning(model)` and the served config's `multimodal_config.is_multimodal_pruning_enabled()` (V1: `GPUModelRunner.load_model` sets `is_multimodal_pruning_enabled`, `_gather_mm_embeddings` calls the hook per request; V2: `maybe_create_mm_pruner` creates a `MultiModalPruner`, whose `recompute` calls it per request with media rows in the chunk). **Instance override**: the plugin's Qwen-VL models set `is_multimodal_pruning_enabled` on their own worker's `MultiModalConfig` instance to a function answering true, before vLLM's `__init__` (`vllm_compat.open_mrope_pruning_hook`; the class and `get_video_pruning_spec()`, which the processors read, are untouched), then keep the model's own `is_multimodal_pruning_enabled` as \"vLLM's video pruning is on\"; Qwen3-VL then builds its rotary table 4x (`mrope_positions_factor`), as for vLLM's own pruning",
        where="`config/multimodal.py`, `v1/worker/gpu_model_runner.py`, `v1/worker/gpu/model_states/mm_pruning.py`, `default.py`, `model_executor/models/qwen3_vl.py`",
        why="vLLM reaches the hook only for its own video pruning; retire when vLLM lets a model declare that it prunes (e.g. the runners asking `supports_multimodal_pruning(model)` and a model method instead of the config)",
        symbols=(
            "vllm.config.multimodal:MultiModalConfig.is_multimodal_pruning_enabled",
            "vllm.config.multimodal:MultiModalConfig.get_video_pruning_spec",
            "vllm.model_executor.models.interfaces:supports_multimodal_pruning",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner.load_model",
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings",
            "vllm.v1.worker.gpu.model_states.mm_pruning:maybe_create_mm_pruner",
            "vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner.recompute",
        ),
        code=("vllm_compat", "models.qwen"),
        patch="vllm_compat.open_mrope_pruning_hook",
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (servers on V1 and V2, `test_served_families.py`; `test_qwen_processor.py` reads each runner's gate in the installed source, also on both GPU builds)",
            "0.33.0": "`mm_pruning.py`, `rope.py`, `cpu_model_runner.py`, `cpu/model_runner.py` identical; `default.py`, `gpu_model_runner.py` differ, not in the pruner's creation and call nor `load_model`'s flag and `_gather_mm_embeddings`' call (diffed)",
        },
        retire="vLLM letting a model declare that it prunes (the runners asking `supports_multimodal_pruning(model)` and a model method instead of the config)",
    ),
    Internal(
        what="**monkeypatch**: `CPUModelRunner.load_model` (the CPU build's V1 runner) wrapped to set `is_multimodal_pruning_enabled` with `GPUModelRunner.load_model`'s own condition, which its override leaves out (`vllm_compat.let_cpu_v1_runner_recompute_mrope`)",
        where="`v1/worker/cpu_model_runner.py`",
        why="without it the CPU build's V1 runner never calls the hook (stock `--video-pruning-rate` fails there on every media request); retire when `CPUModelRunner.load_model` sets the flag",
        symbols=(
            "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model",
            "vllm.platforms:current_platform",
        ),
        code=("vllm_compat",),
        patch="vllm_compat.let_cpu_v1_runner_recompute_mrope",
        runners=("V1",),
        checked={
            "0.32.0": "tests (CPU servers; `test_qwen_processor.py` checks the wrap and its condition)",
            "0.33.0": "identical",
        },
        retire="`CPUModelRunner.load_model` setting `is_multimodal_pruning_enabled` as `GPUModelRunner.load_model` does",
    ),
    Internal(
        what="the runners' positions: V1 keeps the tensor `get_mrope_input_positions` returned as the request's positions, writes into it in place and passes that same object to the hook at every step, decode steps included (the decoding offset rides on it as an attribute, `vllm_compat.remember_decode_offset`); V2 stores the positions in `RopeState` (int32), hands the hook `read_prefill_positions(...).long()` (a copy) and `input_ids` as a tensor on the model's device, and takes the returned delta as the request's decoding offset (the plugin computes it from the rows' extent, `models/qwen.decode_delta`)",
        where="`v1/worker/gpu_model_runner.py`, `v1/worker/gpu/mm/rope.py`, `mm_pruning.py`",
        why="a raw prompt that ends in a pruned image decodes after the unpruned image on both runners",
        symbols=(
            "vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings",
            "vllm.v1.worker.gpu.mm.rope:RopeState.read_prefill_positions",
        ),
        code=("vllm_compat", "models.qwen"),
        patch="vllm_compat.remember_decode_offset",
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (`test_qwen_positions.py` on V1; `test_mrope.py`: the end from the rows' extent, every chunking)",
            "0.33.0": "`rope.py`, `mm_pruning.py` identical",
        },
        retire="the hook being given the request's decoding offset (or the runner keeping its own after arrival)",
    ),
    Internal(
        what='the runner the worker picks: `VllmConfig.use_v2_model_runner` (V2 where Triton has an active backend and no V2-unsupported feature is set; `VLLM_USE_V2_MODEL_RUNNER` overrides), read by `gpu_worker.Worker` and `cpu_worker.CPUWorker`; `parallel_config.worker_cls` (`"vllm.v1.worker.gpu_worker.Worker"` on CUDA and ROCm, `"vllm.v1.worker.cpu_worker.CPUWorker"` on CPU)',
        where="`config/vllm.py`, `v1/worker/gpu_worker.py`, `v1/worker/cpu_worker.py`, `platforms/`",
        why="`vllm_compat.check_model_runner` refuses, when a Qwen-VL model is built, a worker whose runners the plugin has not checked (`KNOWN_WORKERS`)",
        symbols=(
            "vllm.config.vllm:VllmConfig.use_v2_model_runner",
            "vllm.v1.worker.gpu_worker:Worker",
            "vllm.v1.worker.cpu_worker:CPUWorker",
            "vllm.config.parallel:ParallelConfig#worker_cls",
        ),
        code=("vllm_compat",),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (`test_qwen_processor.py`; servers on both runners)",
            "0.33.0": "`use_v2_model_runner` identical; `cpu_worker.py` differs, not in the runner choice (diffed)",
        },
        retire="never: the check names what the plugin was tested with",
    ),
    Internal(
        what="`ProcessorInputs` (a dataclass: `mm_data_items`, `hf_processor_mm_kwargs`, changed with `dataclasses.replace`), `TimingContext`",
        where="`multimodal/processing/inputs.py`, `context.py`",
        why="resolve the request once in `apply` and hand it to the hooks",
        symbols=(
            "vllm.multimodal.processing.inputs:ProcessorInputs",
            "vllm.multimodal.processing.inputs:ProcessorInputs#hf_processor_mm_kwargs",
            "vllm.multimodal.processing.inputs:ProcessorInputs#mm_data_items",
            "vllm.multimodal.processing.context:TimingContext",
        ),
        code=("processor",),
        runners=(),
        checked={"0.32.0": "tests (processor)", "0.33.0": "identical files"},
        retire="as for the processor rows",
    ),
    Internal(
        what='`MultiModalFieldConfig.batched("image", keep_on_cpu=True)`, `MultiModalKwargsItems`, `ImageProcessorItems`, `ImageEmbeddingItems`, `MultiModalDataItems.get_items`, `PromptReplacement` (with the target of the stock update; `PromptUpdateDetails` where a family wraps its kept tokens), `PromptUpdate`; batched fields reach `embed_multimodal` as keyword arguments',
        where="`multimodal/inputs.py`, `parse.py`, `processing/__init__.py`, `multimodal/utils.py` (`group_and_batch_mm_kwargs`)",
        why="each image's kept counts travel with it from the processor to the model",
        symbols=(
            "vllm.multimodal.inputs:MultiModalFieldConfig.batched",
            "vllm.multimodal.inputs:MultiModalKwargsItems",
            "vllm.multimodal.parse:ImageProcessorItems",
            "vllm.multimodal.parse:ImageEmbeddingItems",
            "vllm.multimodal.parse:MultiModalDataItems.get_items",
            "vllm.multimodal.processing:PromptReplacement",
            "vllm.multimodal.processing:PromptUpdateDetails",
            "vllm.multimodal.processing:PromptUpdate",
        ),
        code=("processor", "contract", "models.qwen", "models.gemma3"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (processor; servers)",
            "0.33.0": "identical files; `v1/worker/gpu_model_runner.py` differs, not in the encoder path (*read*)",
        },
        retire="public API (vLLM's multimodal processing); listed because the plugin depends on its behaviour",
    ),
    Internal(
        what="`MULTIMODAL_REGISTRY.register_processor(processor, info=, dummy_inputs=)`",
        where="`multimodal/registry.py`",
        why="attach our processor to our model classes",
        symbols=(
            "vllm.multimodal:MULTIMODAL_REGISTRY",
            "vllm.multimodal.registry:MultiModalRegistry.register_processor",
        ),
        code=(
            "models.llava",
            "models.llava_next",
            "models.llava_onevision",
            "models.qwen2_5_vl",
            "models.qwen3_vl",
        ),
        runners=(),
        checked={
            "0.32.0": "tests (processor)",
            "0.33.0": "identical file; `test_plugin_processor_is_registered` passes",
        },
        retire="public API",
    ),
    Internal(
        what='`ModelRegistry.register_model(arch, "module:Class")` (lazy, replaces vLLM\'s class for the architecture)',
        where="`model_executor/models/registry.py`",
        why="serve `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` with ours",
        symbols=(
            "vllm:ModelRegistry",
            "vllm.model_executor.models.registry:_ModelRegistry.register_model",
        ),
        code=("__init__",),
        runners=(),
        checked={
            "0.32.0": "tests (servers)",
            "0.33.0": "file differs: `_ModelInfo` gains `supports_lora`, `supports_kv_cache_grouping`, loses `supports_mamba_prefix_caching`; `register_model` and the lazy model classes identical (*read*)",
        },
        retire="public API",
    ),
    Internal(
        what="`supports_encoder_tp_data = True` on our model classes, read by `supports_multimodal_encoder_tp_data`; without it `--mm-encoder-tp-mode data` falls back to `weights` with a warning",
        where="`model_executor/models/interfaces.py`, `config/model.py` (`ModelConfig.__post_init__`)",
        why="offer the data-parallel encoder mode stock LLaVA lacks",
        symbols=("vllm.model_executor.models.interfaces:supports_multimodal_encoder_tp_data",),
        code=(
            "models.llava",
            "models.llava_next",
            "models.llava_onevision",
            "models.qwen2_5_vl",
            "models.qwen3_vl",
        ),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (tensor parallel, CPU servers)",
            "0.33.0": "both files differ; the function and the fallback block identical (*read*)",
        },
        retire="public model interface",
    ),
    Internal(
        what="`model_config.multimodal_config`: `mm_processor_kwargs` (server defaults), `mm_encoder_tp_mode`",
        where="`config/multimodal.py`, `config/model.py`",
        why="server options and the encoder mode",
        symbols=(
            "vllm.config.multimodal:MultiModalConfig#mm_processor_kwargs",
            "vllm.config.multimodal:MultiModalConfig#mm_encoder_tp_mode",
        ),
        code=("models.common", "processor"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (servers)",
            "0.33.0": "`config/multimodal.py` differs in one docstring only (*read*)",
        },
        retire="public config",
    ),
    Internal(
        what="`is_vit_use_data_parallel` (CLIP built unsharded in data mode), `run_dp_sharded_vision_model(pixel_values, fn)`",
        where="`model_executor/models/vision.py`",
        why="split the images over the workers in data mode, as vLLM does for models that support it",
        symbols=(
            "vllm.model_executor.models.vision:is_vit_use_data_parallel",
            "vllm.model_executor.models.vision:run_dp_sharded_vision_model",
        ),
        code=("models.common",),
        runners=("V1", "V2"),
        checked={"0.32.0": "tests (tensor parallel, CPU servers)", "0.33.0": "identical file"},
        retire="public helpers of vLLM's vision models",
    ),
    Internal(
        what="`get_tensor_model_parallel_world_size`, `tensor_model_parallel_all_reduce`, `tensor_model_parallel_all_gather`",
        where="`distributed/communication_op.py`, `parallel_state.py`",
        why="add the workers' partial scores (weights mode), gather features and scores (data mode)",
        symbols=(
            "vllm.distributed:get_tensor_model_parallel_world_size",
            "vllm.distributed:tensor_model_parallel_all_reduce",
            "vllm.distributed:tensor_model_parallel_all_gather",
        ),
        code=("models.common", "models.qwen"),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (tensor parallel, CPU servers)",
            "0.33.0": "`communication_op.py` identical; `parallel_state.py` differs, these functions identical (*read*)",
        },
        retire="public API",
    ),
    Internal(
        what="CLIP tower layout: `vision_tower.vision_model.encoder.layers[i].self_attn`, a `CLIPAttention` with `num_heads`, `num_heads_per_partition`, `scale`, `attn`",
        where="`model_executor/models/clip.py`",
        why="find the band's attention modules and their head count and scale",
        symbols=(
            "vllm.model_executor.models.clip:CLIPAttention#num_heads",
            "vllm.model_executor.models.clip:CLIPAttention#num_heads_per_partition",
            "vllm.model_executor.models.clip:CLIPAttention#scale",
            "vllm.model_executor.models.clip:CLIPAttention#attn",
            "vllm.model_executor.models.clip:CLIPEncoder#layers",
            "vllm.model_executor.models.clip:CLIPVisionTransformer#encoder",
        ),
        code=("models.common", "scoring"),
        runners=("V1", "V2"),
        checked={"0.32.0": "tests (model, servers)", "0.33.0": "identical file"},
        retire="an attention-probability hook in vLLM's encoder attention",
    ),
    Internal(
        what="the CLIP attention call convention: `self.attn(query, key, value)`, positional, each `[B, S, heads_per_partition * head_dim]`, `attn` an `MMEncoderAttention`",
        where="`model_executor/models/clip.py` (`CLIPAttention.forward`), `model_executor/layers/attention/mm_encoder_attention.py`",
        why="the scoring forward pre-hook reads `args[0]`, `args[1]` and recomputes `softmax(q k^T * scale)`; vLLM's fused attention never materialises it",
        symbols=(
            "vllm.model_executor.models.clip:CLIPAttention.forward",
            "vllm.model_executor.layers.attention.mm_encoder_attention:MMEncoderAttention.forward",
        ),
        code=("scoring",),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (scores equal transformers' eager attention)",
            "0.33.0": "identical files",
        },
        retire="an attention-probability hook in vLLM's encoder attention",
    ),
    Internal(
        what="`VLLMValidationError(message, parameter=)`, answered as HTTP 400 with `param`",
        where="`exceptions.py`, `entrypoints/serve/exception_handling/error_response.py`",
        why="a bad `hivtp_` value is the client's error, named",
        symbols=("vllm.exceptions:VLLMValidationError",),
        code=("processor", "vllm_compat", "models.qwen"),
        runners=(),
        checked={
            "0.32.0": "tests (servers; gate test)",
            "0.33.0": "both differ: a new `ChatTemplateResolutionError`, an `EngineDeadError` branch; the `VLLMValidationError` branch identical (*read*)",
        },
        retire="public API",
    ),
    Internal(
        what="the per-request kwargs gate `validate_request_mm_kwargs(*, mm_processor_kwargs, media_io_kwargs, trust_request_mm_kwargs)`, defined in `entrypoints/generate/base/protocol.py`, bound by name at import in `renderers/online_renderer.py` (`preprocess_chat`, `preprocess_cmpl`) and `entrypoints/pooling/base/serving.py` (`_init_ctx`); no other module mentions it",
        where="those three files",
        why="`hivtp_` keys are let through without `--trust-request-mm-kwargs`: we wrap it in the two calling modules (`vllm_compat.allow_hivtp_request_kwargs`), and `register()` fails if any other loaded `vllm.*` module holds it unwrapped",
        symbols=(
            "vllm.entrypoints.generate.base.protocol:validate_request_mm_kwargs",
            "vllm.renderers.online_renderer:validate_request_mm_kwargs",
            "vllm.entrypoints.pooling.base.serving:validate_request_mm_kwargs",
        ),
        code=("vllm_compat",),
        patch="vllm_compat.allow_hivtp_request_kwargs",
        runners=(),
        checked={
            "0.32.0": "tests (`test_compat.py`; servers)",
            "0.33.0": "`protocol.py` identical; the two callers differ elsewhere, their import line and calls identical (*read*); `test_compat.py` (source scan, start-up check) passes",
        },
        retire="vLLM letting a model or plugin declare request kwargs safe (an allow-list next to `--trust-request-mm-kwargs`)",
    ),
    Internal(
        what="the gate's callers are methods of objects holding `model_config` (`OnlineRenderer.preprocess_chat` / `preprocess_cmpl`, the pooling server's `_init_ctx`), with `model_config.architectures` the served architectures",
        where="`renderers/online_renderer.py`, `entrypoints/pooling/base/serving.py`",
        why="the gate is passed no model; the wrap reads `self.model_config` from the calling frame to answer `hivtp_` keys on an architecture the plugin does not prune with a 400 (a caller without it: the processor decides)",
        symbols=(
            "vllm.renderers.online_renderer:OnlineRenderer.preprocess_chat",
            "vllm.renderers.online_renderer:OnlineRenderer.preprocess_cmpl",
            "vllm.renderers.online_renderer:OnlineRenderer#model_config",
            "sys:_getframe",
        ),
        code=("vllm_compat",),
        runners=(),
        checked={
            "0.32.0": "tests (`test_compat.py`, a text-only Llama server)",
            "0.33.0": "the calls and `self.model_config` unchanged (*read*)",
        },
        retire="the gate being passed the model config (or the allow-list above)",
    ),
    Internal(
        what="`envs.VLLM_MAX_IMAGE_PIXELS`, checked in `ImageMediaIO.load_bytes` after `open_image` (`PIL.Image.open`) and before decoding, as a `ValueError` (400)",
        where="`envs.py`, `multimodal/media/image.py`, `multimodal/image.py`",
        why="`let_vllm_limit_image_size` turns PIL's own bomb guard off so vLLM's 400 answers an oversized image, not a 500",
        symbols=(
            "vllm.envs:VLLM_MAX_IMAGE_PIXELS",
            "vllm.multimodal.media.image:ImageMediaIO.load_bytes",
        ),
        code=("vllm_compat",),
        patch="vllm_compat.let_vllm_limit_image_size",
        runners=(),
        checked={
            "0.32.0": "tests (soak, CPU server)",
            "0.33.0": "files differ; `open_image` and the pixel check identical and in the same place (*read*); 0.33 also charges a per-request decoded-bytes budget (`VLLM_MAX_MEDIA_REQUEST_DECODE_BYTES`) after the check",
        },
        retire="vLLM catching PIL's `DecompressionBombError` as a client error",
    ),
    Internal(
        what="plugin loading: entry point group `vllm.general_plugins`; `load_general_plugins()` calls `register()` in every vLLM process and lets its exceptions through (a refused release stops start-up); `VLLM_PLUGINS`",
        where="`plugins/__init__.py`",
        why="the plugin is found and registered; the tests' stock servers run with it off",
        symbols=("vllm.plugins:load_general_plugins",),
        code=("__init__",),
        runners=(),
        checked={"0.32.0": "tests (servers)", "0.33.0": "identical file"},
        retire="public plugin API",
    ),
    Internal(
        what="metrics plumbing: `/metrics` serves prometheus_client's default `REGISTRY` with one API server, the multiprocess collector when `PROMETHEUS_MULTIPROC_DIR` is set; series labelled `model_name` = served model name",
        where="`v1/metrics/prometheus.py`, `entrypoints/serve/instrumentator/metrics.py`, `v1/metrics/loggers.py`",
        why="`hivtp_vllm/metrics.py` registers its series and its snapshot collector there",
        symbols=("vllm.v1.metrics.prometheus:setup_multiprocess_prometheus",),
        code=("metrics",),
        runners=(),
        checked={"0.32.0": "tests (metrics, CPU servers)", "0.33.0": "identical files"},
        retire="public metrics endpoint",
    ),
    Internal(
        what="engine core and workers start as `multiprocessing` children (`get_mp_context().Process`), inheriting the environment",
        where="`v1/engine/utils.py`, `v1/executor/multiproc_executor.py`",
        why="`metrics.is_server_root` (`multiprocessing.parent_process()`) and `HIVTP_METRICS_DIR` reach the workers",
        symbols=("vllm.utils.system_utils:get_mp_context",),
        code=("metrics",),
        runners=("V1", "V2"),
        checked={
            "0.32.0": "tests (metrics, CPU servers)",
            "0.33.0": "both differ (0.33 starts workers in parallel, shutdown timeouts); still `get_mp_context().Process` (*read*)",
        },
        retire="never: a process model the plugin reads, not changes",
    ),
    Internal(
        what="`python -m vllm.entrypoints.openai.api_server` (`hivtp-vllm serve`, the tests' servers) and `vllm.LLM` (`local_server.in_process_llm`); the server's `FlexibleArgumentParser` takes `--opt=VALUE`, underscores for dashes and dotted `--opt.key VALUE` (merged into one JSON), the spellings `hivtp-vllm serve` merges for `--mm-processor-kwargs`",
        where="`entrypoints/openai/api_server.py`, `entrypoints/launchers/api_server/entry.py`, `entrypoints/llm.py`",
        why="start a server or an offline engine with the plugin",
        symbols=(
            "vllm.entrypoints.launchers.api_server.entry:main",
            "vllm.utils.argparse_utils:FlexibleArgumentParser.parse_args",
            "vllm:LLM",
        ),
        code=("cli", "tools.local_server"),
        runners=(),
        checked={
            "0.32.0": "tests (servers, CPU)",
            "0.33.0": "`api_server.py` identical: in both releases a deprecated shim (it warns) over `launchers/api_server/entry.main`, which differs; `llm.py` differs (*read*, not run)",
        },
        retire="`vllm serve` working with the CPU build's distribution name",
    ),
    Internal(
        what="`vllm.distributed.parallel_state`: `model_parallel_is_initialized`, `destroy_model_parallel`, `destroy_distributed_environment`; an in-process engine (`vllm.LLM`) makes the process-wide parallel groups for its model when none exist (the expert-parallel group only for a MoE model) and reuses them otherwise (`ensure_model_parallel_initialized`)",
        where="`distributed/parallel_state.py`",
        why="`local_server.in_process_llm` (tests, benchmarks) takes down the groups an engine made when its block ends, so a MoE engine after a dense one makes its own expert-parallel group",
        symbols=(
            "vllm.distributed.parallel_state:model_parallel_is_initialized",
            "vllm.distributed.parallel_state:destroy_model_parallel",
            "vllm.distributed.parallel_state:destroy_distributed_environment",
        ),
        code=("tools.local_server",),
        runners=(),
        checked={
            "0.32.0": "tests (in-process engines, dense then MoE)",
            "0.33.0": "not run (tools only)",
        },
        retire="an engine taking down the groups it made when it shuts down",
    ),
    Internal(
        what="(transformers, pinned by vLLM) `get_anyres_image_grid_shape`, `unpad_image`",
        where="`transformers.models.llava_next.modeling_llava_next`",
        why="LLaVA-NeXT's tile grid and unpadded grid, as vLLM computes them",
        symbols=(
            "transformers.models.llava_next.modeling_llava_next:get_anyres_image_grid_shape",
            "transformers.models.llava_next.modeling_llava_next:unpad_image",
        ),
        code=("views", "models.anyres"),
        runners=(),
        checked={
            "0.32.0": "transformers 5.19.0 (GPU build), tests",
            "0.33.0": "transformers 5.20.2; processor tests and the LLaVA-NeXT processor tests pass",
        },
        retire="public transformers functions",
    ),
    Internal(
        what="`init_logger(name)`: a logger under `vllm.` gets vLLM's handler and level in every vLLM process",
        where="`logger.py`",
        why="the plugin's start-up lines (runner, band, heads) print where and when vLLM's do",
        symbols=("vllm.logger:init_logger",),
        code=("models.common", "models.qwen"),
        runners=("V1", "V2"),
        checked={"0.32.0": "tests (servers' logs, CPU)", "0.33.0": "identical file"},
        retire="public API",
    ),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown() -> str:
    """The registry as the table in docs/vllm-internals.md."""
    head = ["what", "where in vLLM", "why we need it", "how (hivtp_vllm)", "runners"]
    head += [*RELEASES, "retire when"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in INTERNALS:
        how = ", ".join(f"`{c}`" for c in row.code)
        if row.patch:
            how = f"**runtime patch** `{row.patch}`; " + how
        cells = [row.what, row.where, row.why, how, ", ".join(row.runners) or "API server"]
        cells += [row.checked[r] for r in RELEASES] + [row.retire]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
