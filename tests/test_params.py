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
