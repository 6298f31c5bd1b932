"""Parsing and validating HIVTP options from requests and from the server.

Options travel in vLLM's ``mm_processor_kwargs``: the server's
``--mm-processor-kwargs`` gives defaults, a request's own
``mm_processor_kwargs`` overrides them. Every ``hivtp_`` key is checked here,
before the engine sees anything, and every error names the key, the value
and the allowed range, so a client can fix its request from the message.

No vLLM import: the glue turns :class:`HivtpParamError` into vLLM's HTTP 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hivtp_vllm.pruning import num_retained, split_budget

__all__ = [
    "PREFIX",
    "REQUEST_KEYS",
    "SERVER_KEYS",
    "HivtpParamError",
    "PruningRequest",
    "ServerOptions",
    "split_hivtp_keys",
    "parse_request",
    "parse_server",
    "resolve",
]

PREFIX = "hivtp_"
RATIO = "hivtp_retain_ratio"
NUM_TOKENS = "hivtp_num_tokens"
GLOBAL_FRACTION = "hivtp_global_fraction"
REGIONS = "hivtp_regions"
LAYER_START = "hivtp_layer_start"
NUM_LAYERS = "hivtp_num_layers"

# A client may choose how much to keep; how importance is measured is the
# operator's choice, fixed per server, since it shapes every forward pass.
REQUEST_KEYS = frozenset({RATIO, NUM_TOKENS, GLOBAL_FRACTION})
SERVER_KEYS = REQUEST_KEYS | {REGIONS, LAYER_START, NUM_LAYERS}
DEFAULT_GLOBAL_FRACTION = 0.5
DEFAULT_REGIONS = (2, 2)


class HivtpParamError(ValueError):
    """A bad ``hivtp_`` option; ``key`` is the option the client must fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class PruningRequest:
    """How much of each image to keep: a ratio, an absolute budget, or all.

    ``retain_ratio = None`` and ``num_tokens = None`` means no pruning.
    """

    retain_ratio: float | None = None
    num_tokens: int | None = None
    global_fraction: float = DEFAULT_GLOBAL_FRACTION

    def view_budgets(self, sizes: Sequence[int]) -> list[int]:
        """Tokens kept in each view of one image (one view for LLaVA-1.5).

        A ratio applies to every view; a budget is split over the views in
        proportion to their sizes (:func:`hivtp_vllm.pruning.split_budget`).
        """
        total = sum(sizes)
        if self.num_tokens is not None:
            low = len(sizes)
            if not low <= self.num_tokens <= total:
                raise HivtpParamError(
                    NUM_TOKENS,
                    f"{NUM_TOKENS}={self.num_tokens} is out of range: this image "
                    f"gives {total} visual tokens, so it must be an integer in "
                    f"[{low}, {total}]",
                )
            return split_budget(self.num_tokens, sizes)
        if self.retain_ratio is None:
            return list(sizes)
        return [num_retained(n, self.retain_ratio) for n in sizes]

    def num_keep(self, grid_tokens: int) -> int:
        """Tokens kept out of a single view of ``grid_tokens``."""
        return self.view_budgets([grid_tokens])[0]

    @property
    def prunes(self) -> bool:
        return self.num_tokens is not None or (
            self.retain_ratio is not None and self.retain_ratio < 1.0
        )


@dataclass(frozen=True)
class ServerOptions:
    """Server-wide settings: the default request, regions and the layer band.

    ``layer_start``/``num_layers`` of ``None`` mean the spec's defaults for
    the encoder's depth (:func:`hivtp_vllm.pruning.default_band`).
    """

    default: PruningRequest = PruningRequest()
    regions: tuple[int, int] = DEFAULT_REGIONS
    layer_start: int | None = None
    num_layers: int | None = None


def split_hivtp_keys(kwargs: Mapping[str, object] | None) -> tuple[dict, dict]:
    """Split ``mm_processor_kwargs`` into (hivtp keys, every other key)."""
    ours: dict[str, object] = {}
    rest: dict[str, object] = {}
    for key, value in (kwargs or {}).items():
        (ours if key.startswith(PREFIX) else rest)[key] = value
    return ours, rest


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HivtpParamError(key, f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise HivtpParamError(key, f"{key} must be a finite number, got {value!r}")
    return float(value)


def _integer(key: str, value: object, low: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HivtpParamError(key, f"{key} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise HivtpParamError(key, f"{key} must be an integer >= {low}, got {value!r}")
    return value


def _ratio(value: object) -> float:
    r = _number(RATIO, value)
    if not 0.0 < r <= 1.0:
        raise HivtpParamError(RATIO, f"{RATIO} must be in (0, 1], got {value!r}")
    return r


def _fraction(value: object) -> float:
    a = _number(GLOBAL_FRACTION, value)
    if not 0.0 <= a <= 1.0:
        raise HivtpParamError(
            GLOBAL_FRACTION, f"{GLOBAL_FRACTION} must be in [0, 1], got {value!r}"
        )
    return a


def _check_keys(options: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    for key in options:
        if key in allowed:
            continue
        if key in SERVER_KEYS:
            raise HivtpParamError(
                key,
                f"{key} can only be set on the server (--mm-processor-kwargs); "
                f"a request may set {', '.join(sorted(allowed))}",
            )
        raise HivtpParamError(
            key, f"unknown {where} option {key!r}; known: {', '.join(sorted(allowed))}"
        )
    if RATIO in options and NUM_TOKENS in options:
        raise HivtpParamError(NUM_TOKENS, f"give either {RATIO} or {NUM_TOKENS}, not both")


def parse_request(
    options: Mapping[str, object], base: PruningRequest | None = None
) -> PruningRequest:
    """Validate a request's ``hivtp_`` keys and apply them over ``base``.

    A request's ratio replaces the server's budget and vice versa, so a
    client that asks for ``hivtp_retain_ratio`` always gets that ratio.
    """
    _check_keys(options, REQUEST_KEYS, "request")
    base = base or PruningRequest()
    ratio, tokens = base.retain_ratio, base.num_tokens
    if RATIO in options:
        ratio, tokens = _ratio(options[RATIO]), None
    if NUM_TOKENS in options:
        ratio, tokens = None, _integer(NUM_TOKENS, options[NUM_TOKENS], 1)
    fraction = base.global_fraction
    if GLOBAL_FRACTION in options:
        fraction = _fraction(options[GLOBAL_FRACTION])
    return PruningRequest(retain_ratio=ratio, num_tokens=tokens, global_fraction=fraction)


def parse_server(kwargs: Mapping[str, object] | None) -> ServerOptions:
    """Validate the ``hivtp_`` keys of the server's ``--mm-processor-kwargs``."""
    options, _ = split_hivtp_keys(kwargs)
    _check_keys(options, SERVER_KEYS, "server")
    default = parse_request({k: v for k, v in options.items() if k in REQUEST_KEYS})
    regions = DEFAULT_REGIONS
    if REGIONS in options:
        value = options[REGIONS]
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise HivtpParamError(
                REGIONS, f"{REGIONS} must be two integers [rows, cols], got {value!r}"
            )
        regions = (_integer(REGIONS, value[0], 1), _integer(REGIONS, value[1], 1))
    start = options.get(LAYER_START)
    count = options.get(NUM_LAYERS)
    return ServerOptions(
        default=default,
        regions=regions,
        layer_start=None if start is None else _integer(LAYER_START, start, 0),
        num_layers=None if count is None else _integer(NUM_LAYERS, count, 1),
    )


def resolve(server: ServerOptions, request_kwargs: Mapping[str, object] | None) -> PruningRequest:
    """The pruning one request gets: its own ``hivtp_`` keys over the server's."""
    options, _ = split_hivtp_keys(request_kwargs)
    return parse_request(options, server.default)
