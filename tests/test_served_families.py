"""Every family, served on both of vLLM's model runners (V1 and V2).

Model Runner V2 is what every GPU runs; the CPU build runs V1, and V2 runs
here through the test-only shim (tests/runners.py). For each family, four
servers of one random checkpoint: the plugin and stock vLLM (the plugin not
loaded), on each runner.

- Server fuzz: extreme and random image shapes with mixed options,
  concurrently. Every response is either 200 with exactly the expected
  ``prompt_tokens`` or a 4xx naming the key, the server keeps answering
  afterwards, and with no hivtp keys every shape gets stock vLLM's status and
  ``prompt_tokens`` on the same runner. Expected counts come from
  transformers' helpers and the spec (tests/count_contract.py), not from the
  plugin's processor.
- Runners agree: the same requests (r = 1.0, 0.5, 0.25, a budget, uniform,
  two images, a video where the family takes one) give the same
  ``prompt_tokens``, the same greedy tokens and the same logprobs (float32
  tolerance) on V1 and V2, and r = 1.0 gives what stock vLLM gives on the
  same runner.
"""

from __future__ import annotations

import base64
import io
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.count_contract import EXTREME_SIZES, FAMILIES, reference_tokens, reference_views
from tests.helpers import media_chat, video_data_url
from tests.runners import RUNNERS

pytestmark = [
    pytest.mark.server,
    pytest.mark.parametrize("family_servers", list(FAMILIES), indirect=True),
]

# The property tests' extreme shapes (less the one at the pixel limit: a
# 179-megapixel PNG is slow to make and send) and a few more.
SHAPES = [s for s in EXTREME_SIZES if s[0] * s[1] < 10**8] + [
    (1, 337),
    (5, 5),
    (336, 336),
    (1000, 3),
    (3, 1000),
    (671, 1),
    (1009, 2),
]


def random_shapes(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    shapes = []
    for _ in range(count):
        short = rng.choice([1, 2, 3, rng.randint(1, 50), rng.randint(50, 1500)])
        long = min(4000, int(short * rng.choice([1, 1.5, 3, 40, 400, 2000])))
        shapes.append((long, short) if rng.random() < 0.5 else (short, long))
    return shapes


def random_options(rng: random.Random) -> dict | None:
    kind = rng.choice(["none", "ratio", "budget", "budget-huge"])
    if kind == "none":
        return None
    if kind == "ratio":
        options: dict = {"hivtp_retain_ratio": rng.choice([1.0, 0.5, 0.25, 0.1, rng.random()])}
    elif kind == "budget":
        options = {"hivtp_num_tokens": rng.choice([1, 2, 3, 64, rng.randint(1, 700)])}
    else:
        options = {"hivtp_num_tokens": rng.randint(700, 5000)}
    if rng.random() < 0.3:
        options["hivtp_global_fraction"] = rng.random()
    if rng.random() < 0.25:
        options["hivtp_selection"] = "uniform"
    return options or None


def picture(width: int, height: int, seed: int) -> str:
    """A smooth image (cheap PNG at any size) as a data URL."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    tint = rng.random(3, dtype=np.float32)[None, None, :]
    pixels = ((x * 0.6 + y * 0.4) * tint * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def status_and_tokens(response) -> tuple[int, int | None, dict]:
    body = response.json()
    tokens = body["usage"]["prompt_tokens"] if response.status_code == 200 else None
    return response.status_code, tokens, body


@pytest.mark.parametrize("runner", RUNNERS)
def test_fuzz_shapes_and_options(family_servers, runner):
    family = family_servers.family
    ours, stock = family_servers.pair(runner)
    rng = random.Random(10)
    shapes = SHAPES + random_shapes(11, 20)
    images = {shape: picture(*shape, seed=i) for i, shape in enumerate(shapes)}

    # Stock vLLM, no keys: the reference status and prompt size of each shape.
    with ThreadPoolExecutor(8) as pool:
        stock_answers = list(pool.map(lambda s: stock.chat([images[s]], max_tokens=1), shapes))
        plain_answers = list(pool.map(lambda s: ours.chat([images[s]], max_tokens=1), shapes))
    text_tokens = {}
    for shape, theirs, mine in zip(shapes, stock_answers, plain_answers, strict=True):
        want, got = status_and_tokens(theirs), status_and_tokens(mine)
        assert got[:2] == want[:2], (shape, want[2], got[2])
        if want[0] == 200:
            sizes, newlines = reference_views(family, *shape, family.own_pinpoints)
            text_tokens[shape] = want[1] - reference_tokens(sizes, newlines, None)

    # Mixed options, several requests at once (two images in some).
    jobs = []
    for shape in shapes:
        if shape not in text_tokens:
            continue
        for _ in range(2):
            jobs.append(([shape], random_options(rng)))
    servable = list(text_tokens)
    for _ in range(6):
        jobs.append((rng.sample(servable, 2), random_options(rng)))

    def send(job):
        shapes_, options = job
        return ours.chat([images[s] for s in shapes_], options, max_tokens=2)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs))
    outcomes = {"200": 0, "400": 0}
    for (shapes_, options), response in zip(jobs, answers, strict=True):
        expected = []
        for shape in shapes_:
            sizes, newlines = reference_views(family, *shape, family.own_pinpoints)
            expected.append(reference_tokens(sizes, newlines, options))
        status, tokens, body = status_and_tokens(response)
        if None in expected:
            assert status == 400, (shapes_, options, body)
            assert body["error"]["param"] == "hivtp_num_tokens", body
            assert "hivtp_num_tokens" in body["error"]["message"], body
            assert "num_keep" not in body["error"]["message"], body
            outcomes["400"] += 1
            continue
        # Two images of one prompt share its text: count it once.
        text = text_tokens[shapes_[0]] if len(shapes_) == 1 else None
        assert status == 200, (shapes_, options, body)
        if text is not None:
            assert tokens == text + expected[0], (shapes_, options)
        outcomes["200"] += 1
    assert outcomes["200"] > 20 and outcomes["400"] > 0, outcomes

    # The engine survived all of it and still serves.
    assert ours.alive()
    again = ours.chat([images[(336, 336)]], {"hivtp_retain_ratio": 0.5}, max_tokens=2)
    assert again.status_code == 200, again.text


# -- the runners agree --------------------------------------------------------

# (name, image sizes, mm_processor_kwargs, with a video)
COMPARED = [
    ("r=1.0", [(448, 224)], {"hivtp_retain_ratio": 1.0}, False),
    ("r=0.5", [(448, 224)], {"hivtp_retain_ratio": 0.5}, False),
    ("r=0.25", [(224, 448)], {"hivtp_retain_ratio": 0.25}, False),
    ("budget", [(500, 300)], {"hivtp_num_tokens": 7}, False),
    ("uniform", [(448, 224)], {"hivtp_retain_ratio": 0.5, "hivtp_selection": "uniform"}, False),
    ("two images", [(448, 224), (300, 500)], {"hivtp_retain_ratio": 0.5}, False),
    ("server default", [(336, 336)], None, False),
    ("video", [(336, 336)], {"hivtp_retain_ratio": 0.5}, True),
]
LOGPROB_TOLERANCE = 1e-4  # float32 through two runners' batching and kernels


def ask(server, sizes, kwargs, video: bool) -> dict:
    """One greedy chat request: prompt tokens, token ids, their logprobs."""
    images = [picture(width, height, i) for i, (width, height) in enumerate(sizes)]
    response = media_chat(
        server,
        images,
        kwargs,
        video=video_data_url(7, frames=4, size=(112, 112)) if video else None,
        logprobs=True,
        return_tokens_as_token_ids=True,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    steps = answer["choices"][0]["logprobs"]["content"]
    return {
        "prompt_tokens": answer["usage"]["prompt_tokens"],
        "tokens": [step["token"] for step in steps],
        "logprobs": [step["logprob"] for step in steps],
    }


def compared(family) -> list[tuple]:
    return [c for c in COMPARED if not c[3] or family.videos]


def test_runners_agree_and_full_ratio_is_stock(family_servers):
    family, started = family_servers.family, family_servers.servers
    answers = {
        runner: {name: ask(started[(runner, True)], *rest) for name, *rest in compared(family)}
        for runner in RUNNERS
    }
    for name, *_ in compared(family):
        v1, v2 = answers["V1"][name], answers["V2"][name]
        assert v1["prompt_tokens"] == v2["prompt_tokens"], (family.arch, name)
        assert v1["tokens"] == v2["tokens"], (family.arch, name)
        assert v1["logprobs"] == pytest.approx(v2["logprobs"], abs=LOGPROB_TOLERANCE), name
    # Pruning really happened, and the options really differ.
    full = answers["V1"]["r=1.0"]["prompt_tokens"]
    assert answers["V1"]["r=0.5"]["prompt_tokens"] < full
    assert answers["V1"]["budget"]["prompt_tokens"] < answers["V1"]["r=0.5"]["prompt_tokens"]
    # r = 1.0 is stock vLLM on the same runner: the same prompt, tokens, logprobs.
    _, sizes, _, video = COMPARED[0]
    for runner in RUNNERS:
        stock = ask(started[(runner, False)], sizes, None, video)
        ours = answers[runner]["r=1.0"]
        assert stock["prompt_tokens"] == ours["prompt_tokens"], runner
        assert stock["tokens"] == ours["tokens"], runner
        assert stock["logprobs"] == pytest.approx(ours["logprobs"], abs=LOGPROB_TOLERANCE)
