"""The Qwen-VL processors (every merged family): the pads and plans a request gets.

Needs no server and no GPU, so it also runs against each GPU build of vLLM
(scripts/test.sh). Expected counts come from transformers' ``smart_resize``
and the spec, not from the plugin.
"""

from __future__ import annotations

import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

import hivtp_vllm
from hivtp_vllm.families import FAMILIES, QWEN_SPECIALS
from hivtp_vllm.pruning import num_retained
from tests.count_contract import FAMILIES as CONTRACT
from tests.helpers import (
    PAD_OPTIONS,
    assert_pads_per_image,
    assert_videos_keep_their_layout,
    noise,
    process,
)

# The tiny checkpoints' pixel bounds and px per merged token, per merged
# family (the count contract's reference: published min_pixels,
# TINY_IMAGE_TOKENS merged tokens at most).
BOUNDS = {
    name: (*family.pixel_bounds, family.unit)
    for name, family in CONTRACT.items()
    if family.layout == "merged"
    and FAMILIES[name].checkpoint.special_tokens == QWEN_SPECIALS  # Qwen's prompts
}


@pytest.fixture(scope="module", params=list(BOUNDS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def merged(arch):
    low, high, unit = BOUNDS[arch]

    def count(width: int, height: int, max_pixels: int = high) -> int:
        h, w = smart_resize(height, width, factor=unit, min_pixels=low, max_pixels=max_pixels)
        return (h // unit) * (w // unit)

    return count


@pytest.fixture(scope="module")
def processor(tmp_path_factory, arch):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from hivtp_vllm.tools.checkpoints import make_checkpoint

    hivtp_vllm.register()
    ckpt = make_checkpoint(tmp_path_factory.mktemp(arch) / "tiny", arch=arch)
    return MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(ckpt), max_model_len=8192))


def apply(processor, images, kwargs=None, videos=None):
    config = processor.info.get_hf_config()
    prompt = [1, 5]
    for _ in images:
        prompt += [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]
    for _ in videos or []:
        prompt += [config.vision_start_token_id, config.video_token_id, config.vision_end_token_id]
    return process(processor, prompt + [7], images, kwargs, videos)


def test_plugin_processor_is_registered(processor):
    from hivtp_vllm.models.qwen import HivtpQwenProcessorMixin

    assert isinstance(processor, HivtpQwenProcessorMixin)


@pytest.mark.parametrize("kwargs", PAD_OPTIONS)
def test_pads_per_image(processor, merged, kwargs):
    assert_pads_per_image(apply, processor, merged, kwargs)


def test_request_pixel_bounds_shape_the_grid(processor, merged, arch):
    """A request's own ``max_pixels`` (Qwen's processor option) sizes the grid
    that is counted and pruned, as it sizes vLLM's."""
    image = noise(9, 2000, 1500)
    unit = BOUNDS[arch][2]
    kwargs = {"max_pixels": 256 * unit * unit, "hivtp_retain_ratio": 0.5}
    (placeholder,) = apply(processor, [image], kwargs)["mm_placeholders"]["image"]
    n = merged(2000, 1500, max_pixels=256 * unit * unit)
    assert n < merged(2000, 1500)
    assert placeholder.length == num_retained(n, 0.5)


def test_bad_budget_is_a_400_naming_the_key(processor, merged):
    from vllm.exceptions import VLLMValidationError

    n = merged(448, 336)
    with pytest.raises(VLLMValidationError) as info:
        apply(processor, [noise(0, 448, 336)], {"hivtp_num_tokens": n + 1})
    assert info.value.parameter == "hivtp_num_tokens" and f"[1, {n}]" in str(info.value)


def test_videos_are_left_as_vllm_lays_them_out(processor, merged):
    assert_videos_keep_their_layout(apply, processor, merged)


def test_both_runners_reach_the_position_hook_through_one_gate():
    """On this vLLM build, V1 and V2 call the model's
    ``recompute_mrope_positions`` when the served config's
    ``is_multimodal_pruning_enabled()`` is true: the one gate the plugin's
    models open (vllm_compat.open_mrope_pruning_hook). V1 keeps the tensor
    ``get_mrope_input_positions`` returned and hands it back at every step
    (the decoding offset rides on it, vllm_compat.remember_decode_offset)."""
    import inspect

    from vllm.v1.worker.gpu.model_states import mm_pruning
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    v1_load = inspect.getsource(GPUModelRunner.load_model)
    assert "mm_config.is_multimodal_pruning_enabled()" in v1_load
    assert "supports_multimodal_pruning(self.get_model())" in v1_load
    gather = inspect.getsource(GPUModelRunner._gather_mm_embeddings)
    assert "self.is_multimodal_pruning_enabled and self.uses_mrope" in gather
    assert "self.model.recompute_mrope_positions(" in gather
    assert "mrope_positions=req_state.mrope_positions," in gather
    assert "req_state.mrope_positions.copy_(new_mrope_positions)" in gather
    init = inspect.getsource(GPUModelRunner._init_mrope_positions)
    assert "req_state.mrope_positions, req_state.mrope_position_delta = (" in init
    v2_gate = inspect.getsource(mm_pruning.maybe_create_mm_pruner)
    assert "multimodal_config.is_multimodal_pruning_enabled()" in v2_gate
    assert "supports_multimodal_pruning(model)" in v2_gate
    v2_hook = inspect.getsource(mm_pruning.MultiModalPruner.recompute)
    assert "self.model.recompute_mrope_positions(" in v2_hook
    # Every runner the start-up check knows exists on this build.
    import importlib

    from hivtp_vllm.vllm_compat import KNOWN_WORKERS

    for runners in KNOWN_WORKERS.values():
        for target in runners.values():
            module_name, class_name = target.split(":")
            assert hasattr(importlib.import_module(module_name), class_name), target


def _config(worker: str):
    from types import SimpleNamespace

    from vllm.config.multimodal import MultiModalConfig

    return SimpleNamespace(
        parallel_config=SimpleNamespace(worker_cls=worker),
        model_config=SimpleNamespace(multimodal_config=MultiModalConfig()),
        use_v2_model_runner=True,
    )


def test_the_gate_opens_for_the_served_config_only_and_unknown_workers_are_refused():
    import pickle

    from vllm.config.multimodal import MultiModalConfig

    from hivtp_vllm import vllm_compat

    config = _config("vllm.v1.worker.gpu_worker.Worker")
    vllm_compat.open_mrope_pruning_hook(config)
    mm = config.model_config.multimodal_config
    assert mm.is_multimodal_pruning_enabled()
    # vLLM's own video pruning stays off: processors read the spec.
    assert mm.get_video_pruning_spec() is None
    assert not vllm_compat.video_pruning_on(config)
    assert not MultiModalConfig().is_multimodal_pruning_enabled()  # the class untouched
    assert pickle.loads(pickle.dumps(mm)).is_multimodal_pruning_enabled()
    assert vllm_compat.check_model_runner(config) == "V2"
    with pytest.raises(RuntimeError) as refused:
        vllm_compat.check_model_runner(_config("vllm.v1.worker.xpu_worker.XPUWorker"))
    message = str(refused.value)
    assert "vllm.v1.worker.xpu_worker.XPUWorker" in message
    assert "vllm.v1.worker.gpu_worker.Worker (V1, V2)" in message


def test_cpu_v1_runner_sets_the_gate_as_the_gpu_runner_does():
    """The CPU build's V1 runner replaces load_model without vLLM's gate;
    the wrap (vllm_compat.let_cpu_v1_runner_recompute_mrope) sets it with
    vLLM's own condition."""
    from types import SimpleNamespace

    from vllm.platforms import current_platform
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from hivtp_vllm.vllm_compat import _wrap_load_model

    hivtp_vllm.register()
    # Wrapped where it serves (the CPU build), left alone (not even imported
    # by the plugin) elsewhere.
    wrapped = getattr(CPUModelRunner.__dict__["load_model"], "hivtp_original", None)
    assert (wrapped is not None) == current_platform.is_cpu()

    class Pruning:
        supports_multimodal_pruning = True

    load = _wrap_load_model(lambda self: None)
    for model, opened, expected in (
        (Pruning(), True, True),
        (Pruning(), False, False),
        (object(), True, False),
    ):
        config = _config("vllm.v1.worker.cpu_worker.CPUWorker")
        if opened:
            from hivtp_vllm import vllm_compat

            vllm_compat.open_mrope_pruning_hook(config)
        runner = SimpleNamespace(model_config=config.model_config, get_model=lambda m=model: m)
        load(runner)
        assert runner.is_multimodal_pruning_enabled is expected
