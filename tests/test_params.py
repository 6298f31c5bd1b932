"""Request and server option parsing: values, ranges, precedence, messages."""

from __future__ import annotations

import math

import pytest

from hivtp_vllm import params
from hivtp_vllm.params import HivtpParamError, PruningRequest


def error_of(options: dict, base: PruningRequest | None = None) -> HivtpParamError:
    with pytest.raises(HivtpParamError) as info:
        params.parse_request(options, base)
    return info.value


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        ({"hivtp_retain_ratio": 0}, "hivtp_retain_ratio", "(0, 1]"),
        ({"hivtp_retain_ratio": -0.1}, "hivtp_retain_ratio", "(0, 1]"),
        ({"hivtp_retain_ratio": 1.5}, "hivtp_retain_ratio", "(0, 1]"),
        ({"hivtp_retain_ratio": math.nan}, "hivtp_retain_ratio", "finite"),
        ({"hivtp_retain_ratio": "0.5"}, "hivtp_retain_ratio", "must be a number"),
        ({"hivtp_retain_ratio": True}, "hivtp_retain_ratio", "must be a number"),
        ({"hivtp_num_tokens": 0}, "hivtp_num_tokens", ">= 1"),
        ({"hivtp_num_tokens": 2.5}, "hivtp_num_tokens", "integer"),
        ({"hivtp_num_tokens": "64"}, "hivtp_num_tokens", "integer"),
        ({"hivtp_global_fraction": 1.01}, "hivtp_global_fraction", "[0, 1]"),
        ({"hivtp_retain_ratio": 0.5, "hivtp_num_tokens": 64}, "hivtp_num_tokens", "not both"),
        ({"hivtp_ratio": 0.5}, "hivtp_ratio", "unknown request option"),
        ({"hivtp_layer_start": 3}, "hivtp_layer_start", "only be set on the server"),
    ],
)
def test_bad_request_options_name_the_key(options, key, fragment):
    err = error_of(options)
    assert err.key == key
    assert key in str(err) and fragment in str(err)


def test_request_wins_over_server_default():
    server = params.parse_server({"hivtp_retain_ratio": 0.5, "hivtp_global_fraction": 0.25})
    assert params.resolve(server, {}) == PruningRequest(0.5, None, 0.25)
    assert params.resolve(server, {"hivtp_num_tokens": 64}) == PruningRequest(None, 64, 0.25)
    assert params.resolve(server, {"hivtp_retain_ratio": 1.0}).prunes is False
    # Non-hivtp keys are not ours to judge.
    assert params.resolve(server, {"do_resize": False}) == PruningRequest(0.5, None, 0.25)


def test_num_keep():
    assert PruningRequest().num_keep(576) == 576
    assert PruningRequest(retain_ratio=0.25).num_keep(576) == 144
    assert PruningRequest(num_tokens=64).num_keep(576) == 64
    assert PruningRequest(num_tokens=64).num_keep(64) == 64
    with pytest.raises(HivtpParamError, match=r"\[1, 576\]") as info:
        PruningRequest(num_tokens=577).num_keep(576)
    assert info.value.key == "hivtp_num_tokens"


def test_integral_float_budget_is_accepted():
    assert params.parse_request({"hivtp_num_tokens": 64.0}).num_tokens == 64


def test_server_options():
    opts = params.parse_server(
        {"hivtp_regions": [3, 2], "hivtp_layer_start": 4, "hivtp_num_layers": 2, "other": 1}
    )
    assert opts.regions == (3, 2) and opts.layer_start == 4 and opts.num_layers == 2
    assert params.parse_server(None) == params.ServerOptions()
    with pytest.raises(HivtpParamError, match="hivtp_regions"):
        params.parse_server({"hivtp_regions": [2]})
    with pytest.raises(HivtpParamError, match="unknown server option"):
        params.parse_server({"hivtp_bogus": 1})


def test_split_keeps_other_keys_apart():
    ours, rest = params.split_hivtp_keys({"hivtp_retain_ratio": 0.5, "do_resize": False})
    assert ours == {"hivtp_retain_ratio": 0.5} and rest == {"do_resize": False}
    assert params.split_hivtp_keys(None) == ({}, {})


def test_view_budgets_split_a_budget_over_views():
    from hivtp_vllm.pruning import split_budget

    request = PruningRequest(num_tokens=100)
    assert request.view_budgets([576, 912]) == [39, 61] == split_budget(100, [576, 912])
    # 2 tokens over (576, 2304): largest remainder gives (0, 2); each view keeps one.
    assert PruningRequest(num_tokens=2).view_budgets([576, 2304]) == [1, 1]
    assert PruningRequest(num_tokens=2880).view_budgets([576, 2304]) == [576, 2304]
    assert PruningRequest(retain_ratio=0.25).view_budgets([576, 912]) == [144, 228]
    with pytest.raises(HivtpParamError, match=r"\[2, 1488\]"):
        PruningRequest(num_tokens=1).view_budgets([576, 912])
    with pytest.raises(ValueError):
        split_budget(1, [3, 4])


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        ({"hivtp_retain_ratio": math.inf}, "hivtp_retain_ratio", "finite"),
        ({"hivtp_retain_ratio": None}, "hivtp_retain_ratio", "must be a number"),
        ({"hivtp_retain_ratio": [0.5]}, "hivtp_retain_ratio", "must be a number"),
        ({"hivtp_global_fraction": -0.1}, "hivtp_global_fraction", "[0, 1]"),
        ({"hivtp_global_fraction": math.nan}, "hivtp_global_fraction", "finite"),
        ({"hivtp_global_fraction": False}, "hivtp_global_fraction", "must be a number"),
        ({"hivtp_num_tokens": True}, "hivtp_num_tokens", "integer >= 1"),
        ({"hivtp_num_tokens": math.inf}, "hivtp_num_tokens", "integer >= 1"),
        ({"hivtp_num_tokens": None}, "hivtp_num_tokens", "integer >= 1"),
    ],
)
def test_more_bad_request_options(options, key, fragment):
    err = error_of(options)
    assert err.key == key
    assert key in str(err) and fragment in str(err)
    # The message is ours, in one style, never pydantic's own text.
    assert "validation error" not in str(err) and "Input should" not in str(err)
    assert repr(options[key]) in str(err)


def test_which_error_a_client_hears_first():
    # Priority: a key that does not belong, then ratio with budget, then the
    # first bad value in key order (ratio, budget, fraction).
    assert error_of({"hivtp_retain_ratio": 0.5, "hivtp_num_tokens": 64, "hivtp_x": 1}).key == (
        "hivtp_x"
    )
    assert error_of({"hivtp_retain_ratio": 5, "hivtp_num_tokens": 64}).key == "hivtp_num_tokens"
    assert error_of({"hivtp_global_fraction": 5, "hivtp_retain_ratio": 5}).key == (
        "hivtp_retain_ratio"
    )
    assert error_of({"hivtp_global_fraction": 5, "hivtp_b": 1, "hivtp_a": 1}).key == "hivtp_b"


def test_values_keep_their_types():
    request = params.parse_request({"hivtp_retain_ratio": 1, "hivtp_global_fraction": 0})
    assert request == PruningRequest(1.0, None, 0.0)
    assert isinstance(request.retain_ratio, float)
    assert isinstance(request.global_fraction, float)
    assert type(params.parse_request({"hivtp_num_tokens": 64.0}).num_tokens) is int
    # A ratio over a server budget drops the budget, and the reverse.
    base = PruningRequest(None, 64, 0.25)
    assert params.parse_request({"hivtp_retain_ratio": 0.5}, base) == PruningRequest(
        0.5, None, 0.25
    )


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        ({"hivtp_regions": [2]}, "hivtp_regions", "two integers [rows, cols], got [2]"),
        ({"hivtp_regions": [2, 0]}, "hivtp_regions", "an integer >= 1, got 0"),
        ({"hivtp_regions": [2, 2, 2]}, "hivtp_regions", "got [2, 2, 2]"),
        ({"hivtp_regions": [True, 2]}, "hivtp_regions", "an integer >= 1, got True"),
        ({"hivtp_regions": [2, 1.5]}, "hivtp_regions", "an integer >= 1, got 1.5"),
        ({"hivtp_regions": [0.0, 0]}, "hivtp_regions", "an integer >= 1, got 0"),
        ({"hivtp_regions": "22"}, "hivtp_regions", "two integers"),
        ({"hivtp_regions": 2}, "hivtp_regions", "two integers"),
        ({"hivtp_layer_start": -1}, "hivtp_layer_start", ">= 0"),
        ({"hivtp_layer_start": -2.0}, "hivtp_layer_start", "an integer >= 0, got -2"),
        ({"hivtp_layer_start": "3"}, "hivtp_layer_start", "integer >= 0"),
        ({"hivtp_num_layers": 0}, "hivtp_num_layers", ">= 1"),
        ({"hivtp_num_layers": 2.5}, "hivtp_num_layers", "integer >= 1"),
        ({"hivtp_retain_ratio": 2}, "hivtp_retain_ratio", "(0, 1]"),
        ({"hivtp_retain_ratio": 0.5, "hivtp_num_tokens": 8}, "hivtp_num_tokens", "not both"),
        ({"hivtp_bogus": 1}, "hivtp_bogus", "unknown server option"),
    ],
)
def test_bad_server_options_name_the_key(options, key, fragment):
    with pytest.raises(HivtpParamError) as info:
        params.parse_server(options)
    assert info.value.key == key
    assert key in str(info.value) and fragment in str(info.value)


def test_server_option_forms():
    opts = params.parse_server({"hivtp_regions": (3, 1), "hivtp_layer_start": 0})
    assert opts.regions == (3, 1) and opts.layer_start == 0 and opts.num_layers is None
    opts = params.parse_server({"hivtp_regions": [2.0, 3.0], "hivtp_num_layers": 4.0})
    assert opts.regions == (2, 3) and type(opts.regions[0]) is int and opts.num_layers == 4
    # None for a band key has always meant the spec's default band.
    opts = params.parse_server({"hivtp_layer_start": None, "hivtp_num_layers": None})
    assert opts == params.ServerOptions()
    opts = params.parse_server({"hivtp_num_tokens": 64, "hivtp_global_fraction": 1})
    assert opts.default == PruningRequest(None, 64, 1.0)


def test_models_cover_exactly_the_keys():
    assert params._RequestModel.__optional_keys__ == params.REQUEST_KEYS
    assert params._ServerModel.__optional_keys__ == params.SERVER_KEYS
    assert set(params._ALLOWED) == params.SERVER_KEYS


def test_no_vllm_import():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(params))
    names = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ] + [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n and n.split(".")[0] == "vllm"]
