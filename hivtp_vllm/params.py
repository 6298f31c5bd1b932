"""Parsing and validating HIVTP options from requests and from the server.

Options travel in vLLM's ``mm_processor_kwargs``: the server's
``--mm-processor-kwargs`` gives defaults, a request's own
``mm_processor_kwargs`` overrides them. Every ``hivtp_`` key is checked here,
before the engine sees anything, and every error names the key, the value
and the allowed range, so a client can fix its request from the message.

Values are checked by two pydantic models in strict mode (one for the keys
a request may set, one for the server's), and pydantic's errors are
rewritten here into one message style, because the message is what a client
reads in its HTTP 400.

No vLLM import: the glue turns :class:`HivtpParamError` into vLLM's HTTP 400.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import ErrorDetails
from typing_extensions import TypedDict

from hivtp_vllm.pruning import budget_range, num_retained, split_budget

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
SELECTION = "hivtp_selection"

# How the kept tokens are chosen: HIVTP (scores from the tower's middle
# layers), or the uniform baseline of the same size (no scores, docs/spec.md
# section 6), for comparing the two on one's own data.
HIVTP, UNIFORM = "hivtp", "uniform"
SELECTIONS = (HIVTP, UNIFORM)

# A client may choose how much to keep and how; how importance is measured is
# the operator's choice, fixed per server, since it shapes every forward pass.
REQUEST_KEYS = frozenset({RATIO, NUM_TOKENS, GLOBAL_FRACTION, SELECTION})
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
    """How much of each image to keep (a ratio, an absolute budget, or all), and how.

    ``retain_ratio = None`` and ``num_tokens = None`` means no pruning.
    ``selection`` is ``"hivtp"`` or ``"uniform"`` (the scoring-free baseline).
    """

    retain_ratio: float | None = None
    num_tokens: int | None = None
    global_fraction: float = DEFAULT_GLOBAL_FRACTION
    selection: str = HIVTP

    def view_budgets(self, sizes: Sequence[int]) -> list[int]:
        """Tokens kept in each view of one image (one view for LLaVA-1.5).

        A ratio applies to every view; a budget is split over the views in
        proportion to their sizes (:func:`hivtp_vllm.pruning.split_budget`).
        A view with no tokens keeps none. The one error left at this point
        depends on the image, so it is raised here, as a client error naming
        the key: every other value was checked when the request was parsed.
        """
        if self.num_tokens is not None:
            low, high = budget_range(sizes)
            if not max(low, 1) <= self.num_tokens <= high:
                raise HivtpParamError(
                    NUM_TOKENS,
                    f"{NUM_TOKENS}={self.num_tokens} is out of range: this image "
                    f"gives {high} visual tokens that pruning can drop, "
                    f"so it must be an integer in [{low}, {high}]",
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


def _whole_number(value: object) -> object:
    """Let ``64.0`` stand for 64: JSON has one number type, and clients send it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _list_as_tuple(value: object) -> object:
    """A JSON array arrives as a list; strict mode takes a pair only as a tuple."""
    return tuple(value) if isinstance(value, list) else value


# Strict types throughout: a bool is not a number and "0.5" is not 0.5, so a
# client that sends the wrong JSON type hears about it instead of getting a
# silent coercion.
_Ratio = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
_Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
_Count = Annotated[int, BeforeValidator(_whole_number), Field(ge=1)]
_Start = Annotated[int, BeforeValidator(_whole_number), Field(ge=0)]
_STRICT = ConfigDict(extra="forbid", strict=True)


@with_config(_STRICT)
class _RequestModel(TypedDict, total=False):
    """The keys a request may set; absent keys stay absent, so ``None`` is refused."""

    hivtp_retain_ratio: _Ratio
    hivtp_num_tokens: _Count
    hivtp_global_fraction: _Fraction
    hivtp_selection: Literal["hivtp", "uniform"]


@with_config(_STRICT)
class _ServerModel(_RequestModel, total=False):
    """The request's keys, as server defaults, plus the operator-only ones.

    The band keys also take ``None``, which has always meant "the spec's
    default for this encoder", so a launcher can pass an unset option through.
    """

    hivtp_regions: Annotated[tuple[_Count, _Count], BeforeValidator(_list_as_tuple)]
    hivtp_layer_start: _Start | None
    hivtp_num_layers: _Count | None


_REQUEST = TypeAdapter(_RequestModel)
_SERVER = TypeAdapter(_ServerModel)

# What each key must be, as the error messages say it. Type and finiteness
# errors of the float keys get their own wording ("a number", "a finite
# number"); every other failure names the whole allowed range.
_ALLOWED = {
    RATIO: "in (0, 1]",
    NUM_TOKENS: "an integer >= 1",
    GLOBAL_FRACTION: "in [0, 1]",
    REGIONS: "two integers [rows, cols]",
    LAYER_START: "an integer >= 0",
    NUM_LAYERS: "an integer >= 1",
    SELECTION: f"one of {', '.join(repr(s) for s in SELECTIONS)}",
}
_INTEGER_KEYS = frozenset({NUM_TOKENS, LAYER_START, NUM_LAYERS})


def _key_error(key: str, allowed: frozenset[str], where: str) -> HivtpParamError:
    """A key outside the model: a server-only key gets told where it belongs."""
    if key in SERVER_KEYS:
        return HivtpParamError(
            key,
            f"{key} can only be set on the server (--mm-processor-kwargs); "
            f"a request may set {', '.join(sorted(allowed))}",
        )
    return HivtpParamError(
        key, f"unknown {where} option {key!r}; known: {', '.join(sorted(allowed))}"
    )


def _value_error(error: ErrorDetails, options: Mapping[str, object]) -> HivtpParamError:
    """One pydantic error in this module's words: the key, the value, the allowed range.

    Values are quoted as the client sent them, except that an integer key
    quotes ``64.0`` as ``64``, the number it stands for. A bad member of
    ``hivtp_regions`` is named on its own; a pair of the wrong shape whole.
    """
    key = str(error["loc"][0])
    value = options[key]
    kind = error["type"]
    if key == REGIONS and len(error["loc"]) > 1 and kind != "missing":
        member = value[error["loc"][1]]  # type: ignore[index]
        return HivtpParamError(key, f"{key} must be an integer >= 1, got {_whole_number(member)!r}")
    if kind == "finite_number":
        need = "a finite number"
    elif kind == "float_type":
        need = "a number"
    else:
        need = _ALLOWED[key]
    if key in _INTEGER_KEYS:
        value = _whole_number(value)
    return HivtpParamError(key, f"{key} must be {need}, got {value!r}")


def _validate(
    adapter: TypeAdapter, options: Mapping[str, object], allowed: frozenset[str], where: str
) -> dict[str, Any]:
    """Validate ``options`` and raise the one error a client should fix first.

    Priority: a key that does not belong here (in the order given), then a
    ratio together with a budget, then the first bad value in key order
    ratio, budget, fraction, regions, layer start, layers. One error at a
    time, the same one for the same request, so a client's fix converges.
    """
    try:
        valid, errors = adapter.validate_python(dict(options)), []
    except ValidationError as exc:
        valid, errors = {}, exc.errors()
    for error in errors:
        if error["type"] == "extra_forbidden":
            raise _key_error(str(error["loc"][0]), allowed, where)
    if RATIO in options and NUM_TOKENS in options:
        raise HivtpParamError(NUM_TOKENS, f"give either {RATIO} or {NUM_TOKENS}, not both")
    if errors:
        raise _value_error(errors[0], options)
    return valid


def _apply(valid: Mapping[str, Any], base: PruningRequest) -> PruningRequest:
    """Validated request keys over ``base``.

    A request's ratio replaces the server's budget and vice versa, so a
    client that asks for ``hivtp_retain_ratio`` always gets that ratio.
    """
    ratio, tokens = base.retain_ratio, base.num_tokens
    if RATIO in valid:
        ratio, tokens = valid[RATIO], None
    if NUM_TOKENS in valid:
        ratio, tokens = None, valid[NUM_TOKENS]
    fraction = valid.get(GLOBAL_FRACTION, base.global_fraction)
    selection = valid.get(SELECTION, base.selection)
    return PruningRequest(
        retain_ratio=ratio, num_tokens=tokens, global_fraction=fraction, selection=selection
    )


def parse_request(
    options: Mapping[str, object], base: PruningRequest | None = None
) -> PruningRequest:
    """Validate a request's ``hivtp_`` keys and apply them over ``base``."""
    valid = _validate(_REQUEST, options, REQUEST_KEYS, "request")
    return _apply(valid, base or PruningRequest())


def parse_server(kwargs: Mapping[str, object] | None) -> ServerOptions:
    """Validate the ``hivtp_`` keys of the server's ``--mm-processor-kwargs``."""
    options, _ = split_hivtp_keys(kwargs)
    valid = _validate(_SERVER, options, SERVER_KEYS, "server")
    return ServerOptions(
        default=_apply(valid, PruningRequest()),
        regions=valid.get(REGIONS, DEFAULT_REGIONS),
        layer_start=valid.get(LAYER_START),
        num_layers=valid.get(NUM_LAYERS),
    )


def resolve(server: ServerOptions, request_kwargs: Mapping[str, object] | None) -> PruningRequest:
    """The pruning one request gets: its own ``hivtp_`` keys over the server's."""
    options, _ = split_hivtp_keys(request_kwargs)
    return parse_request(options, server.default)
