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

from dataclasses import dataclass, field, replace
from typing import Literal

# How an image becomes the views HIVTP selects on (docs/algorithm.md):
#   "single": one grid per image whatever its size (LLaVA-1.5);
#   "anyres": a base view plus the tiles stitched into one unpadded high-res
#             grid, a newline kept after each row (LLaVA-NeXT; with
#             ``max_views``, shrunk past that many views: LLaVA-OneVision);
#   "merged": one grid of 2 x 2 merged patches of the resized image, M-RoPE
#             positions (Qwen-VL);
#   "pooled": fixed-size views (the image, then any pan-and-scan crops), each
#             patch grid average-pooled into a smaller token grid (Gemma 3).
Layout = Literal["single", "anyres", "merged", "pooled"]


# LLaVA-1.5's prompt format ("USER: <image>\n... ASSISTANT:"), which the
# LLaVA families' test checkpoints share. It loops over message['content'],
# which is what makes vLLM detect the "openai" content format and pass parts
# as {"type": "image"} / {"type": "text"}; plain string content (vLLM's
# "string" format, with "<image>" already in the text) works too. "image_url"
# is accepted for callers that render raw OpenAI messages.
LLAVA_CHAT_TEMPLATE = (
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

# GLM-4.1V-9B-Thinking's chat template without the thinking and metadata
# branches: "[gMASK]<sop>", "<|user|>\n", an image as
# <|begin_of_image|><|image|><|end_of_image|>, a video as
# <|begin_of_video|><|video|><|end_of_video|>; it loops over
# message['content'] (vLLM's "openai" content format).
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- elif msg.role == 'user' %}<|user|>\n"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item or 'image_url' in item %}"
    "<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n{{ msg.content }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{%- endif %}"
)

# Gemma 3's chat template (google/gemma-3-*-it, verbatim): a system message
# folded into the first user turn, "model" for the assistant, an image as
# <start_of_image>; it loops over message['content'] (vLLM's "openai" format).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Gemma 3's special tokens at their published ids (google/gemma-3-*-it): the
# tokenizer puts each at its id, <unusedN> fills the rest of the 262,145.
# The newline runs are ordinary (not special) tokens, matched longest first
# as in Gemma's vocab, which vLLM's processor looks up by string.
GEMMA3_SPECIALS = (
    (0, "<pad>"),
    (1, "<eos>"),
    (2, "<bos>"),
    (3, "<unk>"),
    (4, "<mask>"),
    (5, "[multimodal]"),
    (105, "<start_of_turn>"),
    (106, "<end_of_turn>"),
    (107, "\n"),
    (108, "\n\n"),
    (109, "\n\n\n"),
    (110, "\n\n\n\n"),
    (255999, "<start_of_image>"),
    (256000, "<end_of_image>"),
    (262144, "<image_soft_token>"),
)

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
# GLM-4.5V's special tokens in the order of the real vocab (151329 ...);
# GLM-4.1V's has the same names up to <|end_of_video|>. The vision ones are
# looked up by name (the processor's <|image|> / <|video|>, vLLM's video
# target <|begin_of_video|><|video|><|end_of_video|>, the config's ids).
GLM4V_SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
)

# The tiny merged checkpoints' cap on an image's merged tokens (make-model
# --size tiny): half the model cards' "max_pixels = 1280 * 28 * 28". The tower
# attends over all 4 x 640 patches of a capped image, which is most of a
# test server's work on a CPU (and of its encoder profiling at start); 640
# still caps the tests' large images and leaves every smaller one as it is.
TINY_IMAGE_TOKENS = 640

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Checkpoint:
    """How ``make-model`` builds a random-weight checkpoint of the family with
    the real transformers classes and hub layout, and which vision tower
    ``explain`` scores with.

    Classes are transformers names: the package's top level (``"LlavaConfig"``)
    or ``"module:Class"`` for what it does not export. Everything a family's
    recipe differs in is a field here, so the builder
    (:mod:`hivtp_vllm.tools.checkpoints`) and the tower scorers
    (:mod:`hivtp_vllm.tools.tower`) branch on ``Family.layout`` only: a family
    of an existing layout is a row, not an edit of the tools. Fields a layout
    does not read keep their defaults ("single"/"anyres": tiles of a
    CLIP/SigLIP tower and a separate LM config; "merged": a Qwen-VL packed
    tower with M-RoPE).
    """

    config: str
    model: str
    processor: str
    image_processor: str | None = None
    video_processor: str | None = None
    # The vision model explain builds from ``config.vision_config`` to score on.
    tower: str = "CLIPVisionModel"
    patch_size: int = 14
    chat_template: str = LLAVA_CHAT_TEMPLATE
    max_position_embeddings: int = 4096  # the LM's, as published

    # -- "single" / "anyres": a CLIP or SigLIP tower over fixed-size tiles --
    image_size: int = 336  # px of one view (a tile), make-model's default
    # anyres grids in units of tiles (rows, cols), scaled by the tile size.
    grid_tiles: tuple[tuple[int, int], ...] = ()
    vision_config: str = "CLIPVisionConfig"
    text_config: str = "LlamaConfig"
    # vision_feature_layer / vision_feature_select_strategy: CLIP's second to
    # last layer with CLS dropped ("default"), SigLIP's last with every
    # position a patch ("full").
    feature_layer: int = -2
    feature_strategy: str = "default"

    # -- "pooled": fixed-size views whose patch grid is average-pooled (Gemma 3) --
    pooled_tokens: int = 0  # tokens a view (mm_tokens_per_image; published 256 = 16 x 16)
    # Special tokens at the published ids, as (id, token): <unusedN> fills the
    # ids between them and the trained BPE (whose size is ``vocab_size``).
    fixed_tokens: tuple[tuple[int, str], ...] = ()
    vocab_size: int = 0  # the config's embedding rows (published 262,208)

    # -- "merged": a packed native-resolution tower (Qwen-VL) --
    # Published preprocessor_config.json / video_preprocessor_config.json:
    # size = {shortest_edge: min_pixels, longest_edge: max_pixels}.
    image_pixels: tuple[int, int] | None = None
    video_pixels: tuple[int, int] | None = None
    # make-model's "tiny" max_pixels (image, video), lower than published so
    # that vLLM's encoder profiling stays short on a CPU.
    tiny_max_pixels: tuple[int, int] | None = None
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    rope_theta: float | None = None
    # As published, scaled to the checkpoint's rotary half (its sum is the
    # published one: 64 for head_dim 128, 32 for Qwen3.5's 256 x 0.25).
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False
    partial_rotary_factor: float | None = None  # rotary dims / head_dim, where not all
    # The tower's MLP is gate/up/down (SwiGLU, 3 matrices), not fc1/fc2: FLOPs.
    gated_vision_mlp: bool = False
    # vision_config per make-model size (shapes, and the layers with a role:
    # full attention, DeepStack), then entries every size shares; entries of
    # text_config beside the size's shapes.
    vision_sizes: dict[str, dict[str, object]] = field(default_factory=dict, hash=False)
    vision_extra: dict[str, object] = field(default_factory=dict, hash=False)
    text_extra: dict[str, object] = field(default_factory=dict, hash=False)
    # text_config entries per make-model size over the shared shapes
    # (checkpoints.MERGED_SIZES): a hybrid LM's layer types, say.
    text_sizes: dict[str, dict[str, object]] = field(default_factory=dict, hash=False)
    # How the published checkpoint stores a MoE LM's experts, which the
    # transformers model keeps fused as gate_up_proj [E, 2I, H] and
    # down_proj [E, H, I] and its save_pretrained writes as they are:
    # "transposed" (fused, [E, H, 2I] and [E, I, H]: Qwen3-VL-MoE) or
    # "per_expert" (experts.N.{gate,up,down}_proj.weight: Qwen3.5-MoE).
    experts: Literal["transposed", "per_expert"] | None = None
    # The tokenizer's special tokens (after the trained BPE), the config's
    # token-id entries by token, and the tokens that end a reply (the first
    # is the tokenizer's EOS; all of them generation_config's eos_token_id).
    special_tokens: tuple[str, ...] = QWEN_SPECIALS
    token_ids: tuple[tuple[str, str], ...] = (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    )
    end_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")

    @staticmethod
    def resolve(name: str) -> type:
        """The class a field names, imported only now (this module stays free
        of transformers): ``module:Class``, else transformers' top level."""
        import importlib

        module, _, attr = name.rpartition(":")
        return getattr(importlib.import_module(module or "transformers"), attr)


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
    # The full-size tower whose overhead the section adds beside the bench
    # tower's, a key of the benchmark's FULL_TOWERS ("clip-l": LLaVA-1.5-7B's,
    # "qwen2.5-vl-7b"); None: none, the section points to LLaVA-1.5's CLIP-L rows.
    full_tower: str | None = None


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
    # vLLM's own video pruning (--video-pruning-rate, EVS) works for the model,
    # beside HIVTP's image pruning. Qwen3.5's classes never set it up in vLLM
    # 0.32/0.33 (stock fails at the first video), so the plugin refuses it there.
    video_pruning: bool = False
    max_model_len: int = 4096  # the test servers': room for the largest image's tokens
    # The test servers' dtype: float32 (exact comparisons), bfloat16 where
    # vLLM's CPU kernels need it (Qwen3.5's Gated DeltaNet layers).
    dtype: str = "float32"

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

_QWEN3_VL = Checkpoint(
    config="Qwen3VLConfig",
    model="Qwen3VLForConditionalGeneration",
    processor="Qwen3VLProcessor",
    image_processor="Qwen2VLImageProcessor",
    video_processor="Qwen3VLVideoProcessor",
    tower="Qwen3VLVisionModel",
    patch_size=16,
    chat_template=QWEN3_VL_CHAT_TEMPLATE,
    max_position_embeddings=262144,
    # Qwen/Qwen3-VL-8B-Instruct: images 65536..16777216 px; videos
    # 4096..25165824 px in total over the sampled frames.
    image_pixels=(65536, 16777216),
    video_pixels=(4096, 25165824),
    # TINY_IMAGE_TOKENS an image, 768 a frame pair (the bound is the
    # total over the frames, t * h * w).
    tiny_max_pixels=(TINY_IMAGE_TOKENS * 32 * 32, 2 * 768 * 32 * 32),
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    rope_theta=5000000.0,
    mrope_section=(24, 20, 20),
    mrope_interleaved=True,
    # DeepStack features from three early and middle layers, as the
    # 8B's 8, 16, 24 of 27.
    vision_sizes={
        size: {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_heads": heads,
            "depth": 8,
            "deepstack_visual_indexes": [1, 3, 5],
        }
        for size, heads in (("tiny", 4), ("bench", 2))
    },
    vision_extra={"hidden_act": "gelu_pytorch_tanh", "num_position_embeddings": 2304},
)

# Qwen3.5's language model: Gated DeltaNet layers, then full attention every
# fourth layer (the published 3:1), its linear-attention heads of 128 (the
# only size vLLM's CPU kernel takes besides 64); the tiny one is one of each.
_QWEN3_5_TEXT = {
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
_QWEN3_5_TINY = {"tiny": {"layer_types": ["linear_attention", "full_attention"]}}
# Qwen3.5 (dense): Qwen3-VL's tower without DeepStack and processor, a hybrid LM.
_QWEN3_5 = replace(
    _QWEN3_VL,
    config="Qwen3_5Config",
    model="Qwen3_5ForConditionalGeneration",
    tower="Qwen3_5VisionModel",
    max_position_embeddings=262144,
    rope_theta=10000000.0,
    mrope_section=(11, 11, 10),
    partial_rotary_factor=0.25,
    vision_sizes={
        size: {k: v for k, v in shape.items() if k != "deepstack_visual_indexes"}
        for size, shape in _QWEN3_VL.vision_sizes.items()
    },
    text_extra=_QWEN3_5_TEXT,
    text_sizes=_QWEN3_5_TINY,
)
# The MoE LMs: few small experts, sizes where an expert matrix read the wrong
# way round cannot load (moe_intermediate_size 48: 2 x 48 and 48 are not 128).
_MOE_TEXT = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48}
# The bench MoE LMs: 2 of 4 experts of 1024 a token, about the dense bench
# LM's MLP work (checkpoints._lm_flops counts the routed experts only).
_MOE_BENCH = {"bench": {"moe_intermediate_size": 1024}}

# GLM-4.1V (zai-org/GLM-4.1V-9B-Thinking): patch 14, temporal patch 2, 2 x 2
# merge, images resized as two frames (the bounds hold 2 * h * w), the CLIP
# mean/std, a 336 px position table resampled per image; the LM's rotary
# covers half of each head (partial_rotary_factor 0.5).
_GLM4V = Checkpoint(
    config="Glm4vConfig",
    model="Glm4vForConditionalGeneration",
    processor="Glm4vProcessor",
    image_processor="Glm4vImageProcessor",
    video_processor="Glm4vVideoProcessor",
    tower="Glm4vVisionModel",
    patch_size=14,
    chat_template=GLM4V_CHAT_TEMPLATE,
    max_position_embeddings=65536,
    # Published: images 12544..9633792 px (6144 merged tokens: two frames of
    # 28 x 28 px each); videos 12544..47040000 px over all frames.
    image_pixels=(12544, 9633792),
    video_pixels=(12544, 47040000),
    # TINY_IMAGE_TOKENS an image (two frames), 768 a frame pair.
    tiny_max_pixels=(2 * TINY_IMAGE_TOKENS * 28 * 28, 2 * 768 * 28 * 28),
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    rope_theta=10000.0,
    mrope_section=(8, 12, 12),
    partial_rotary_factor=0.5,
    gated_vision_mlp=True,
    # The tower's MLP is hidden -> out_hidden_size (the LM's hidden); its
    # intermediate_size is the merger's context (published: the LM's).
    vision_sizes={
        size: {"hidden_size": 64, "intermediate_size": 352, "num_heads": heads, "depth": 8}
        for size, heads in (("tiny", 4), ("bench", 2))
    },
    vision_extra={"hidden_act": "silu", "image_size": 336, "rms_norm_eps": 1e-5},
    # vLLM's glm4.py reads attention_bias (default False); transformers'
    # GLM-4.1V attention always has q/k/v biases and no such entry.
    text_extra={"attention_bias": True, "rms_norm_eps": 1e-5},
    special_tokens=GLM4V_SPECIALS,
    token_ids=(
        ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>"),
    ),
    end_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
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
        bench=Bench(image=(336, 336), tiles=1, views=((24, 24),), full_tower="clip-l"),
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
        bench=Bench(image=(672, 672), tiles=5, views=((24, 24), (48, 48)), full_tower="clip-l"),
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
            # A SigLIP tower (no CLS, every position a patch, the last layer's
            # features) and a Qwen2 language model.
            tower="SiglipVisionModel",
            vision_config="SiglipVisionConfig",
            text_config="Qwen2Config",
            feature_layer=-1,
            feature_strategy="full",
            max_position_embeddings=32768,
            image_size=384,
            # llava-onevision-qwen2-*-ov-hf: every grid of 1..6 x 1..6 tiles of 384 px.
            grid_tiles=tuple((r, c) for r in range(1, 7) for c in range(1, 7)),
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
            full_tower="clip-l",  # LLaVA-1.5-7B's CLIP-L; no full-size SigLIP run
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
        video_pruning=True,
        checkpoint=Checkpoint(
            config="Qwen2_5_VLConfig",
            model="Qwen2_5_VLForConditionalGeneration",
            processor="Qwen2_5_VLProcessor",
            image_processor="Qwen2VLImageProcessor",
            video_processor="Qwen2VLVideoProcessor",
            tower="Qwen2_5_VisionTransformerPretrainedModel",
            patch_size=14,
            chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
            max_position_embeddings=128000,
            # Qwen/Qwen2.5-VL-7B-Instruct: min_pixels 3136, max_pixels 12845056
            # for images; no video_preprocessor_config.json, so transformers
            # builds the video processor from the same file (same bounds).
            image_pixels=(3136, 12845056),
            video_pixels=(3136, 12845056),
            # TINY_IMAGE_TOKENS an image, 768 a frame pair (the bound is per frame).
            tiny_max_pixels=(TINY_IMAGE_TOKENS * 28 * 28, 768 * 28 * 28),
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            rope_theta=1000000.0,
            mrope_section=(16, 24, 24),
            gated_vision_mlp=True,
            # Full attention every 4th layer, as the 7B's 7, 15, 23, 31 of 32.
            vision_sizes={
                size: {
                    "hidden_size": 64,
                    "intermediate_size": 176,
                    "num_heads": heads,
                    "depth": 8,
                    "fullatt_block_indexes": [3, 7],
                }
                for size, heads in (("tiny", 4), ("bench", 2))
            },
            vision_extra={"hidden_act": "silu", "window_size": 112, "tokens_per_second": 2},
            text_extra={
                "use_sliding_window": False,
                "sliding_window": 32768,
                "max_window_layers": 28,
            },
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
            full_tower="qwen2.5-vl-7b",
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
        video_pruning=True,
        checkpoint=_QWEN3_VL,
        load=Load(**_QWEN_LOAD),
    ),
    Family(
        name="qwen3-vl-moe",
        title="Qwen3-VL-MoE",
        architecture="Qwen3VLMoeForConditionalGeneration",
        model_type="qwen3_vl_moe",
        module="qwen3_vl_moe",
        layout="merged",
        videos=True,
        video_pruning=True,
        checkpoint=replace(
            _QWEN3_VL,
            config="Qwen3VLMoeConfig",
            model="Qwen3VLMoeForConditionalGeneration",
            tower="Qwen3VLMoeVisionModel",
            # vLLM reads norm_topk_prob (qwen3_moe.py), which transformers'
            # config no longer declares; the published configs have it.
            text_extra={
                **_MOE_TEXT,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "norm_topk_prob": True,
            },
            text_sizes=_MOE_BENCH,
            experts="transposed",
        ),
        load=Load(**_QWEN_LOAD),
    ),
    Family(
        name="qwen3.5",
        title="Qwen3.5",
        architecture="Qwen3_5ForConditionalGeneration",
        model_type="qwen3_5",
        module="qwen3_5",
        layout="merged",
        videos=True,
        dtype="bfloat16",
        checkpoint=_QWEN3_5,
        load=Load(**_QWEN_LOAD),
        # 1024 x 1024: 64 x 64 patches, 32 x 32 = 1024 tokens (no resize).
        bench=Bench(
            image=(1024, 1024),
            tiles=1,
            views=((32, 32),),
            model="the published tower's layout scaled down, a hybrid Qwen3.5 LM of 10 "
            "layers x 1024 (Gated DeltaNet, full attention in 3 and 7)",
            max_model_len=8192,
            kv_per_token=10 * 2 * 1024 * 4 * 2,
            tower="bench (8 x 64)",
            batches=(1, 4),
            full_tower="qwen3.5",
        ),
    ),
    Family(
        name="qwen3.5-moe",
        title="Qwen3.5-MoE",
        architecture="Qwen3_5MoeForConditionalGeneration",
        model_type="qwen3_5_moe",
        module="qwen3_5",
        layout="merged",
        videos=True,
        dtype="bfloat16",
        checkpoint=replace(
            _QWEN3_5,
            config="Qwen3_5MoeConfig",
            model="Qwen3_5MoeForConditionalGeneration",
            tower="Qwen3_5MoeVisionModel",
            text_extra={**_QWEN3_5_TEXT, **_MOE_TEXT, "shared_expert_intermediate_size": 48},
            text_sizes={**_QWEN3_5_TINY, **_MOE_BENCH},
            experts="per_expert",
        ),
        load=Load(**_QWEN_LOAD),
    ),
    Family(
        name="glm4.1v",
        title="GLM-4.1V",
        architecture="Glm4vForConditionalGeneration",
        model_type="glm4v",
        module="glm4_1v",
        layout="merged",
        videos=True,
        checkpoint=_GLM4V,
        load=Load(**_QWEN_LOAD),
    ),
    Family(
        name="glm4.5v",
        title="GLM-4.5V",
        architecture="Glm4vMoeForConditionalGeneration",
        model_type="glm4v_moe",
        module="glm4_1v",
        layout="merged",
        videos=True,
        checkpoint=replace(
            _GLM4V,
            config="Glm4vMoeConfig",
            model="Glm4vMoeForConditionalGeneration",
            tower="Glm4vMoeVisionModel",
            # vLLM's glm4_moe.py reads use_qk_norm and head_dim as attributes;
            # head_dim != hidden / heads, as published (128 vs 4096 / 96).
            # The first layer dense, then routed experts (I = 48: neither
            # 2I nor I is the hidden 128, so a misread expert cannot load).
            text_extra={
                "attention_bias": True,
                "rms_norm_eps": 1e-5,
                "use_qk_norm": False,
                "head_dim": 48,
                "first_k_dense_replace": 1,
                "n_routed_experts": 8,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "moe_intermediate_size": 48,
                "n_group": 1,
                "topk_group": 1,
                "norm_topk_prob": True,
                "routed_scaling_factor": 1.0,
            },
            text_sizes={"tiny": {"num_hidden_layers": 3}},
            experts="per_expert",
        ),
        load=Load(**_QWEN_LOAD),
    ),
    Family(
        name="gemma3",
        title="Gemma 3",
        architecture="Gemma3ForConditionalGeneration",
        model_type="gemma3",
        module="gemma3",
        layout="pooled",
        checkpoint=Checkpoint(
            config="Gemma3Config",
            model="Gemma3ForConditionalGeneration",
            processor="Gemma3Processor",
            image_processor="Gemma3ImageProcessor",
            tower="SiglipVisionModel",
            vision_config="SiglipVisionConfig",
            text_config="Gemma3TextConfig",
            feature_layer=-1,
            feature_strategy="full",
            # Published: 896 px, 64 x 64 patches of 14 pooled 4 x 4 into 16 x
            # 16 tokens. Tiny: 448 px, 32 x 32 patches, the same 4 x 4 pool
            # into 8 x 8 tokens a view.
            image_size=448,
            patch_size=14,
            pooled_tokens=64,
            vocab_size=262208,
            chat_template=GEMMA3_CHAT_TEMPLATE,
            max_position_embeddings=131072,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            fixed_tokens=GEMMA3_SPECIALS,
            token_ids=(
                ("boi_token_index", "<start_of_image>"),
                ("eoi_token_index", "<end_of_image>"),
                ("image_token_index", "<image_soft_token>"),
            ),
            end_tokens=("<eos>", "<end_of_turn>"),
        ),
        load=Load(
            image_sizes="896x896",
            phases="1.0,0.5,0.25,uniform0.25,stock",
            ceiling_px=None,
            ceiling_note="No ceiling phase: every Gemma 3 view is resized to the tower's "
            "fixed size, so no twin checkpoint carries r = 0.25's tokens with less tower "
            "work. The uniform r = 0.25 phase splits HIVTP's cost from the tower's.",
        ),
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
