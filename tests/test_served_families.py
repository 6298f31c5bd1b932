"""Every family, served on both of vLLM's model runners (V1 and V2).

Model Runner V2 is what every GPU runs; the CPU build runs V1, and V2 runs
here through the test-only shim (tests/runners.py). For each family (a row of
hivtp_vllm/families.py), three servers of one random checkpoint: the plugin
on each runner and stock vLLM (the plugin not loaded) on V1
(``family_servers``; tests/conftest.py says why V1 alone: what is compared
with stock is decided before any runner, or is greedy tokens, which the
runners-agree test below shows equal on both).
Expected counts come from transformers' helpers and the spec
(tests/count_contract.py), not from the plugin's processor; what differs
between families (which image sizes are worth sending) follows the row's
layout and tile size, not its name.

- Counts by aspect ratio: each image alone and two of different shapes in
  one request, under every option, give stock's text tokens plus the
  reference's visual tokens (or a 400 naming the key), the options of one
  prompt sent at once, each getting its own count; no option and r = 1.0
  give stock's answer and usage exactly.
- Bad input: each bad option is a 400 naming the key, and the server keeps
  serving. Videos (families that take them) are served as stock serves them,
  alone or next to a pruned image. The metrics count the images and visual
  tokens the reference expects, by selection.
- Server fuzz: extreme and random image shapes with mixed options,
  concurrently. Every response is either 200 with exactly the expected
  ``prompt_tokens`` or a 4xx naming the key, the server keeps answering
  afterwards, and with no hivtp keys every shape gets stock vLLM's status and
  ``prompt_tokens`` on the same runner.
- Runners agree: the same requests (r = 1.0, 0.5, 0.25, a budget, uniform,
  two images, a video where the family takes one) give the same
  ``prompt_tokens``, the same greedy tokens and the same logprobs (float32
  tolerance) on V1 and V2, and r = 1.0 gives what stock vLLM gives (tokens
  exactly, logprobs within that tolerance) on each.

Tests of one family alone (LLaVA-NeXT's views with no tokens, LLaVA-1.5's
caches, server defaults and streaming, Qwen-VL's positions) stay in its module.
"""

from __future__ import annotations

import base64
import io
import math
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from hivtp_vllm.families import FAMILIES as ROWS
from hivtp_vllm.tools.local_server import image_data_url, metric
from tests.count_contract import EXTREME_SIZES, FAMILIES, reference_tokens, reference_views
from tests.helpers import (
    assert_refused,
    chat_with_video,
    media_chat,
    ok,
    prompt_tokens,
    video_data_url,
)
from tests.runners import RUNNERS

pytestmark = pytest.mark.server

# Each family's shared servers (tests/conftest.py): every family, or those that take videos.
EVERY_FAMILY = pytest.mark.parametrize("family_servers", list(FAMILIES), indirect=True)
WITH_VIDEOS = pytest.mark.parametrize(
    "family_servers", [name for name, f in FAMILIES.items() if f.videos], indirect=True
)
BOTH_RUNNERS = pytest.mark.parametrize("runner", RUNNERS)

R, K, G, S = "hivtp_retain_ratio", "hivtp_num_tokens", "hivtp_global_fraction", "hivtp_selection"

# -- image sizes worth serving, from the family's layout ---------------------

# Qwen-VL resizes an image to multiples of its merged token's side (28 px for
# Qwen2.5-VL, 32 for Qwen3-VL) within its pixel bounds: multiples of this are
# kept as they are by every merged family.
MERGED_PX = math.lcm(*(f.unit for f in FAMILIES.values() if f.layout == "merged"))


def square(family) -> int:
    """Side of a square image of one view (LLaVA layouts, Gemma 3) or of MERGED_PX (Qwen-VL)."""
    return MERGED_PX if family.layout == "merged" else family.tile


def served_sizes(family) -> list[tuple[int, int]]:
    """(width, height) of the images whose counts are checked; the first two
    also go together in one request, the last is the largest."""
    t = square(family)
    if family.layout == "single":  # one grid whatever the image's size
        return [(t, t), (2 * t, t)]
    if family.layout == "pooled":
        # Gemma 3 (its servers cut pan-and-scan crops): a square and a 2:1 of
        # the view size (1 and 3 views), a 5:2 (4 views), one too small to
        # crop, and a 1:4 (5 views: the most tokens).
        return [(t, t), (2 * t, t), (1000, 400), (200, 150), (300, 1200)]
    if family.layout == "merged":
        # A wide and a tall one that smart_resize keeps, then ones it resizes:
        # 5:2, smaller than the lower pixel bound of some, larger than the upper.
        return [(2 * t, t), (t, 3 * t), (1000, 400), (200, 150), (2000, 1500)]
    # anyres: 5:2 and 1:4 (unpadded high-res grids), a tile, 2:1, 1:2 and 5:2
    # of tiles, smaller than a tile, and one larger than ``max_views`` tiles
    # (where the family has it, its grid shrinks: OneVision's anyres_max_9).
    return [
        (1000, 400),
        (300, 1200),
        (t, t),
        (2 * t, t),
        (t, 2 * t),
        (5 * t // 2, t),
        (200, 150),
        (2000, 1500),
    ]


def visual(family, size: tuple[int, int], options: dict | None) -> int | None:
    """The reference's visual tokens of one image under ``options`` (None: a 400)."""
    sizes, newlines = reference_views(family, *size, family.own_pinpoints)
    return reference_tokens(sizes, newlines, options)


# Every option whose count is checked on every image of every family.
# No option (the server's default) is r = 1.0 here; it is counted in the fuzz
# and the metrics tests, and compared with stock in the full-ratio test.
COUNTED = [
    {R: 1.0},
    {R: 0.5},
    {R: 0.25},
    {K: 9, G: 1.0},
    {K: 64},
    {K: 100, G: 0.0},
    {R: 0.25, S: "uniform"},
]


@EVERY_FAMILY
@BOTH_RUNNERS
def test_served_counts_by_aspect_ratio(family_servers, runner):
    """Each image alone, and two of different shapes in one prompt: every
    option's ``prompt_tokens`` is stock's text tokens plus the reference's
    visual tokens (with r = 1.0, stock's own count), or a 400
    naming the budget where the reference has it out of range. One prompt's
    options are sent side by side (each its own count; CI time)."""
    family = family_servers.family
    ours, stock = family_servers.pair(runner)
    sizes = served_sizes(family)
    for seed, shapes in enumerate([[size] for size in sizes] + [sizes[:2]]):
        images = [image_data_url(100 + 10 * seed + i, *size) for i, size in enumerate(shapes)]
        full = prompt_tokens(stock.chat(images, max_tokens=1))
        text = full - sum(visual(family, size, None) for size in shapes)
        with ThreadPoolExecutor(len(COUNTED)) as pool:
            responses = list(
                pool.map(lambda o: ours.chat(images, o, max_tokens=1), COUNTED)  # noqa: B023
            )
        for options, response in zip(COUNTED, responses, strict=True):
            want = [visual(family, size, options) for size in shapes]
            if None in want:
                assert_refused(response, K)
                continue
            assert prompt_tokens(response) == text + sum(want), (shapes, options)


@EVERY_FAMILY
@BOTH_RUNNERS
def test_served_full_ratio_matches_stock(family_servers, runner):
    """No option and r = 1.0 are stock vLLM: the same answer and usage, for
    one image of the largest size and for two images (the first two sizes)."""
    ours, stock = family_servers.pair(runner)
    sizes = served_sizes(family_servers.family)
    for seed, shapes in enumerate(([sizes[-1]], sizes[:2])):
        images = [image_data_url(200 + 10 * seed + i, *size) for i, size in enumerate(shapes)]
        want = ok(stock.chat(images, max_tokens=16))
        for kwargs in (None, {R: 1.0}):
            got = ok(ours.chat(images, kwargs, max_tokens=16))
            assert got["choices"][0]["message"] == want["choices"][0]["message"], (shapes, kwargs)
            assert got["usage"] == want["usage"], (shapes, kwargs)


def bad_options(family) -> list[tuple[dict, str]]:
    """(options, the key a 400 names) for an image of ``square`` px."""
    t = square(family)
    sizes, _ = reference_views(family, t, t, family.own_pinpoints)
    grid, views = sum(sizes), sum(1 for n in sizes if n > 0)
    bad = [
        ({R: 0}, R),
        ({R: -0.5}, R),
        ({R: 1.5}, R),
        ({R: "NaN"}, R),
        ({R: "half"}, R),
        ({K: 0}, K),
        ({K: grid + 1}, K),  # more than the grids hold
        ({K: 10**6}, K),
        ({R: 0.5, K: 64}, K),  # a ratio and a budget
        ({"hivtp_keep": 0.5}, "hivtp_keep"),
        ({G: 2}, G),
        ({G: -1}, G),
        ({S: "best"}, S),
    ]
    if views > 1:  # fewer tokens than views: each non-empty view keeps one
        bad.append(({K: views - 1}, K))
    return bad


@EVERY_FAMILY
@BOTH_RUNNERS
def test_bad_input_is_a_400_and_the_server_stays_up(family_servers, runner):
    family = family_servers.family
    ours, _ = family_servers.pair(runner)
    t = square(family)
    image = [image_data_url(400, t, t)]
    for kwargs, key in bad_options(family):
        assert_refused(ours.chat(image, kwargs, max_tokens=1), key)
        assert ours.alive(), kwargs
        assert prompt_tokens(ours.chat(image, {R: 0.5}, max_tokens=1)) > 0, kwargs


@WITH_VIDEOS
@BOTH_RUNNERS
def test_videos_are_served_as_stock(family_servers, runner):
    """hivtp keys apply to images only: a video's tokens and answer are stock's,
    alone or next to a pruned image (for Qwen-VL, whose positions are
    rewritten after the tower while the video's stay as vLLM made them)."""
    family = family_servers.family
    ours, stock = family_servers.pair(runner)
    t = square(family)
    # Frames of one tile (LLaVA-OneVision resizes them to it); Qwen-VL's
    # video tokens grow with the frames, so small ones.
    frame = t // 2 if family.layout == "merged" else t
    video = video_data_url(500, frames=4, size=(frame, frame))
    want = ok(chat_with_video(stock, video, None, None))
    for kwargs in (None, {R: 0.25}):
        got = ok(chat_with_video(ours, video, None, kwargs))
        assert got["usage"] == want["usage"], kwargs
        assert got["choices"][0]["message"] == want["choices"][0]["message"], kwargs
    size = (2 * t, t)
    image = image_data_url(501, *size)
    both = prompt_tokens(chat_with_video(stock, video, image, None))
    pruned = prompt_tokens(chat_with_video(ours, video, image, {R: 0.25}))
    saved = visual(family, size, None) - visual(family, size, {R: 0.25})
    assert both - pruned == saved > 0


@EVERY_FAMILY
@BOTH_RUNNERS
def test_metrics_count_images_and_tokens(family_servers, runner):
    """/metrics counts each request's images and their visual tokens, input
    and retained, by selection (the reference's counts), and the model's
    pruning time."""
    family = family_servers.family
    ours, _ = family_servers.pair(runner)
    sizes = served_sizes(family)
    sent = [  # (image sizes of one request, options, selection)
        (sizes[:2], {R: 0.25}, "hivtp"),
        (sizes[:1], {R: 0.25, S: "uniform"}, "uniform"),
        (sizes[-1:], {K: 300}, "hivtp"),
        ([(200, 150)], None, "hivtp"),
    ]
    before = ours.scrape()
    for j, (shapes, options, _) in enumerate(sent):
        images = [image_data_url(600 + 10 * j + i, *size) for i, size in enumerate(shapes)]
        ok(ours.chat(images, options, max_tokens=1))
    after = ours.scrape()
    labels = {"model_name": ours.model}

    def delta(name: str, **more: str) -> float:
        return metric(after, name, **more, **labels) - metric(before, name, **more, **labels)

    def total(selection: str | None, options_of: bool) -> int:
        """The reference's visual tokens of what was sent with ``selection``
        (None: all), retained (``options_of``) or input."""
        return sum(
            visual(family, size, options if options_of else None)
            for shapes, options, chosen in sent
            for size in shapes
            if selection in (None, chosen)
        )

    images = {
        selection: sum(len(s) for s, _, chosen in sent if chosen == selection)
        for selection in ("hivtp", "uniform")
    }
    assert delta("hivtp_images_total") == images["hivtp"] + images["uniform"] == 5
    for selection, count in images.items():
        assert delta("hivtp_images_total", selection=selection) == count, selection
        for kind, retained in (("input", False), ("retained", True)):
            want = total(selection, retained)
            assert delta("hivtp_visual_tokens_total", kind=kind, selection=selection) == want
    assert delta("hivtp_visual_tokens_total", kind="input") == total(None, False)
    assert delta("hivtp_visual_tokens_total", kind="retained") == total(None, True)
    assert total(None, True) < total(None, False)
    assert delta("hivtp_pruning_seconds_count") >= 1


@EVERY_FAMILY
@BOTH_RUNNERS
def test_prefix_cache_keys_on_the_image_and_its_options(family_servers, runner):
    """A repeated request (the same image and options) hits vLLM's prefix
    cache and answers as the first did, as a repeated request does on stock
    vLLM; the same image under other options hits only what a new image would
    (the text before it). For a hybrid LM (Qwen3.5) the cache also holds the
    delta-net state (vLLM's "align" mode), so an answer after a hit comes
    from a restored state. The image comes first and text longer than a
    cache block after it (a hybrid model's blocks are large: vLLM sizes them
    to hold the recurrent state), so every full block depends on the image."""
    ours, stock = family_servers.pair(runner)
    stock = stock.server  # each repeat really sent, not remembered
    t = square(family_servers.family)
    # Stock serves both runners' tests: a new image for each, so its first
    # request is a miss there too.
    image = [image_data_url(700 + RUNNERS.index(runner), 2 * t, t)]
    (config,) = (dict(labels) for labels in stock.scrape()["vllm:cache_config_info"])
    block = int(config["block_size"])  # KV blocks (and, hybrid, the state's granularity)
    text = " ".join(["the"] * (block + 32))

    def send(server, options) -> tuple[dict, float, float]:
        before = server.scrape()
        body = ok(server.chat(image, options, text=text, max_tokens=8))
        after = server.scrape()

        def delta(name: str) -> float:
            return metric(after, name) - metric(before, name)

        queries = delta("vllm:prefix_cache_queries_total")
        return body, delta("vllm:prefix_cache_hits_total"), queries

    results = {}
    for name, server, options in (
        ("stock", stock, None),
        ("a", ours, {R: 0.25}),
        ("b", ours, {R: 0.5}),
    ):
        results[name] = [send(server, options) for _ in range(3)]
    for name, (first, *repeats) in results.items():
        prompt = first[0]["usage"]["prompt_tokens"]
        for again in repeats:
            assert again[0]["choices"][0]["message"] == first[0]["choices"][0]["message"], name
            assert again[0]["usage"] == first[0]["usage"], name
            assert again[2] == prompt, (name, again[2], prompt)
        # A repeat finds every full block but the one holding the last token
        # (a hybrid model's state is cached at a block boundary of an earlier
        # run; stock vLLM's second or third run finds it, so three are sent).
        hits = [again[1] for again in repeats]
        assert max(hits) == (prompt - 1) // block * block > first[1], (name, block, prompt, hits)
    # Other options, the same image: only what a new image hits (the text before it).
    assert results["b"][0][1] == results["a"][0][1], (results["a"][0][1:], results["b"][0][1:])


# -- server fuzz --------------------------------------------------------------

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


@EVERY_FAMILY
@BOTH_RUNNERS
def test_fuzz_shapes_and_options(family_servers, runner):
    family = family_servers.family
    ours, stock = family_servers.pair(runner)
    rng = random.Random(10)
    shapes = SHAPES + random_shapes(11, 8)
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
        if shape in text_tokens:
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
    assert outcomes["200"] > 10 and outcomes["400"] > 0, outcomes

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


@EVERY_FAMILY
def test_runners_agree_and_full_ratio_is_stock(family_servers):
    family, started = family_servers.family, family_servers.servers
    answers = {
        runner: {name: ask(started[(runner, True)], *rest) for name, *rest in compared(family)}
        for runner in RUNNERS
    }
    for name, *_ in compared(family):
        v1, v2 = answers["V1"][name], answers["V2"][name]
        assert v1["prompt_tokens"] == v2["prompt_tokens"], (family.name, name)
        assert v1["tokens"] == v2["tokens"], (family.name, name)
        assert v1["logprobs"] == pytest.approx(v2["logprobs"], abs=LOGPROB_TOLERANCE), name
    # Pruning really happened, and the options really differ.
    full = answers["V1"]["r=1.0"]["prompt_tokens"]
    assert answers["V1"]["r=0.5"]["prompt_tokens"] < full
    assert answers["V1"]["budget"]["prompt_tokens"] < answers["V1"]["r=0.5"]["prompt_tokens"]
    # r = 1.0 is stock vLLM: the same prompt, tokens, logprobs, on each runner.
    _, sizes, _, video = COMPARED[0]
    stock = ask(family_servers.stock, sizes, None, video)
    for runner in RUNNERS:
        ours = answers[runner]["r=1.0"]
        assert stock["prompt_tokens"] == ours["prompt_tokens"], runner
        assert stock["tokens"] == ours["tokens"], runner
        assert stock["logprobs"] == pytest.approx(ours["logprobs"], abs=LOGPROB_TOLERANCE)


# -- a raw prompt ending in an image (M-RoPE families) ------------------------

MERGED = pytest.mark.parametrize(
    "family_servers", [name for name, f in FAMILIES.items() if f.layout == "merged"], indirect=True
)


def raw_template(name: str) -> str:
    """A chat template that renders a prompt ending in an image's pads (no
    end-of-image token, no generation prompt): a raw prompt, as a server
    takes one. The family's own image start and pad tokens (its row's
    ``Checkpoint.token_ids``)."""
    ids = dict(ROWS[name].checkpoint.token_ids)
    start = ids.get("vision_start_token_id") or ids["image_start_token_id"]
    return (
        "{%- for message in messages %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'text' %}{{ part['text'] }}"
        f"{{%- else %}}{start}{ids['image_token_id']}{{%- endif %}}"
        "{%- endfor %}{%- endfor %}"
    )


@MERGED
def test_a_prompt_ending_in_a_pruned_image_decodes_alike_on_both_runners(family_servers):
    """Decoding after a prompt whose last tokens are a pruned image's starts
    after the unpruned image on V1 (positions read in the model; see
    tests/test_qwen_positions.py); V2 hands the position hook a copy of the
    positions, and its offset comes from the rows' extent: the same greedy
    tokens and logprobs on both. (The family's servers take a request's chat
    template: ``--trust-request-chat-template``, tests/conftest.py.)"""
    # Uniform selection keeps the middle token: never on the longer side's edge,
    # so its position + 1 is short of where the unpruned image ends.
    image = image_data_url(96, 20 * 32, 6 * 32)
    answers = {}
    for runner in RUNNERS:
        server, _ = family_servers.pair(runner)
        body = {
            "model": server.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look:"},
                        {"type": "image_url", "image_url": {"url": image}},
                    ],
                }
            ],
            "chat_template": raw_template(family_servers.family.name),
            "add_generation_prompt": False,
            "mm_processor_kwargs": {"hivtp_num_tokens": 1, "hivtp_selection": "uniform"},
            "max_tokens": 8,
            "temperature": 0.0,
            "logprobs": True,
        }
        response = requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        answer = response.json()
        steps = answer["choices"][0]["logprobs"]["content"]
        answers[runner] = (
            answer["usage"]["prompt_tokens"],
            [step["token"] for step in steps],
            [step["logprob"] for step in steps],
        )
    (v1_tokens, v1_text, v1_logprobs), (v2_tokens, v2_text, v2_logprobs) = answers.values()
    assert v1_tokens == v2_tokens
    assert v1_text == v2_text
    assert v1_logprobs == pytest.approx(v2_logprobs, abs=1e-4)
