"""``hivtp-vllm serve``: every spelling of ``--mm-processor-kwargs`` reaches
vLLM merged with ``--retain-ratio``, and is validated before vLLM starts.

The command line ``serve`` builds is parsed here by vLLM's own argument
parser (the one ``python -m vllm.entrypoints.openai.api_server`` runs), so the test
reads the processor options vLLM would start with.
"""

from __future__ import annotations

import importlib

import pytest

from hivtp_vllm.cli import serve_command


def vllm_sees(cmd: list[str]) -> dict:
    """The ``mm_processor_kwargs`` vLLM's server parser makes of ``cmd``."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # Where the server's ``main`` takes it from: 0.32, then 0.33.
    for module in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.common.cli_args"):
        try:
            make_arg_parser = importlib.import_module(module).make_arg_parser
            break
        except ModuleNotFoundError:
            continue
    parser = make_arg_parser(FlexibleArgumentParser())
    args = cmd[cmd.index("--model") :]
    return parser.parse_args(args).mm_processor_kwargs


SPELLINGS = {
    "space": ["--mm-processor-kwargs", '{"hivtp_global_fraction": 0.25, "num_crops": 4}'],
    "equals": ['--mm-processor-kwargs={"hivtp_global_fraction": 0.25, "num_crops": 4}'],
    "underscores": ['--mm_processor_kwargs={"hivtp_global_fraction": 0.25, "num_crops": 4}'],
    "dotted": [
        "--mm-processor-kwargs.hivtp_global_fraction",
        "0.25",
        "--mm-processor-kwargs.num_crops=4",
    ],
    "split": [
        "--mm-processor-kwargs",
        '{"num_crops": 4}',
        "--mm-processor-kwargs.hivtp_global_fraction=0.25",
    ],
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_every_spelling_keeps_the_ratio_and_the_users_options(spelling):
    cmd = serve_command("m", 0.5, None, [*SPELLINGS[spelling], "--max-model-len", "2048"])
    assert vllm_sees(cmd) == {
        "hivtp_global_fraction": 0.25,
        "num_crops": 4,
        "hivtp_retain_ratio": 0.5,
    }
    assert sum(a.startswith("--mm") and "kwargs" in a for a in cmd) == 1
    assert cmd[-2:] == ["--max-model-len", "2048"]


def test_the_flag_wins_over_the_json_and_no_flag_keeps_it():
    given = ['--mm-processor-kwargs={"hivtp_retain_ratio": 0.25}']
    assert vllm_sees(serve_command("m", 0.5, None, given))["hivtp_retain_ratio"] == 0.5
    assert vllm_sees(serve_command("m", None, None, given))["hivtp_retain_ratio"] == 0.25
    # The merged options are validated: a ratio and a budget together are refused.
    from hivtp_vllm.params import HivtpParamError

    with pytest.raises(HivtpParamError, match="either hivtp_retain_ratio or hivtp_num_tokens"):
        serve_command("m", None, 64, given)


@pytest.mark.parametrize(
    ("rest", "says"),
    [
        (['--mm-processor-kwargs={"hivtp_retain_ratio": 2}'], "hivtp_retain_ratio"),
        (["--mm-processor-kwargs.hivtp_num_tokens", "0"], "hivtp_num_tokens"),
        (['--mm-processor-kwargs={"hivtp_ratio": 0.5}'], "hivtp_ratio"),
        (["--mm-processor-kwargs={not json"], "not valid JSON"),
        (["--mm-processor-kwargs", "[1, 2]"], "expects a JSON object"),
        (["--mm-processor-kwargs"], "expects a value"),
    ],
)
def test_a_bad_option_fails_before_vllm_starts_naming_it(rest, says):
    from hivtp_vllm.params import HivtpParamError

    with pytest.raises((HivtpParamError, ValueError), match=says):
        serve_command("m", None, None, rest)


def test_the_cache_type_is_chosen_in_any_spelling():
    for chosen in (["--mm-processor-cache-type", "lru"], ["--mm_processor_cache_type=lru"]):
        cmd = serve_command("m", 0.5, None, chosen)
        assert cmd.count("shm") == 0 and cmd[-len(chosen) :] == chosen
