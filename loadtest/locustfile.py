"""Locust load test: OpenAI streaming chat requests with images against vLLM.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8000 --hivtp-ratio 0.25 --images 1 --max-tokens 32

``--hivtp-selection uniform`` (with a ratio or a budget) asks the plugin for
its scoring-free uniform baseline: the same number of tokens spread evenly.

Each request streams; three series are recorded as locust requests:

- ``TTFT``: time to the first content chunk; its content size is the
  request's prompt tokens (from the final usage chunk), so the CSV shows
  what pruning did to the prompt.
- ``E2E``: time to the last chunk; content size = output tokens.
- ``OUTPUT_TPS``: output tokens per second after the first token, recorded
  in the response-time column (milliseconds there mean tokens/s here).

Images come from a small set the script makes itself (the project's example
picture at several sizes), so runs are reproducible and need no download.
Each request's image gets a unique stamp (a few pixels in a corner) unless
``--repeat-images``: vLLM caches an image's encoder output and its prompt's
KV by content, so a repeated image measures those caches, not the work.
Stamps count up from ``--stamp-base`` (default: from the clock), so two
runs against one server send different images too.

``--record FILE`` also appends one JSON line per request (start time, TTFT,
end-to-end time, prompt and output tokens, error): locust rounds its
percentiles to two significant digits, too coarse to compare phases within
10%, so the phase runner (``loadtest/runner.py``) computes its own.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import time
from pathlib import Path

from locust import HttpUser, events, task
from PIL import Image

from hivtp_vllm.tools.local_server import read_stream

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    group = parser.add_argument_group("hivtp")
    group.add_argument("--model", default="", help="served model name (default: the server's)")
    group.add_argument("--hivtp-ratio", type=float, default=None, help="per-request retain ratio")
    group.add_argument("--hivtp-num-tokens", type=int, default=None, help="per-request budget")
    group.add_argument(
        "--hivtp-selection",
        choices=("hivtp", "uniform"),
        default=None,
        help="per-request selection: HIVTP (the server's default) or the uniform baseline",
    )
    group.add_argument("--images", type=int, default=1, help="images per request")
    group.add_argument(
        "--image-sizes", default="336x336,672x336,500x500", help="WxH list, used in turn"
    )
    group.add_argument("--prompt", default="Describe the picture in detail.")
    group.add_argument("--max-tokens", type=int, default=32)
    group.add_argument("--record", default="", help="append one JSON line per request here")
    group.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds a request may take (connect and each read): one past it is a failed "
        "request, recorded, rather than a user stuck until locust's --stop-timeout",
    )
    group.add_argument(
        "--repeat-images", action="store_true", help="send the image set as is (cache hits)"
    )
    group.add_argument(
        "--stamp-base",
        type=int,
        default=None,
        help="first image stamp (default: from the clock; the runner gives each phase its own)",
    )


def image_set(sizes: str) -> list[Image.Image]:
    """The example picture resized to each ``WxH``."""
    base = Image.open(EXAMPLE).convert("RGB")
    images = []
    for size in sizes.split(","):
        width, height = (int(x) for x in size.lower().split("x"))
        images.append(base.resize((width, height)))
    return images


_STAMPS = itertools.count()
_STAMP_BASE = [0]


@events.init.add_listener
def _stamp_base(environment, **_kwargs) -> None:
    options = environment.parsed_options
    base = getattr(options, "stamp_base", None) if options else None
    _STAMP_BASE[0] = int(time.time() * 1000) if base is None else base


def data_url(image: Image.Image, unique: bool = True) -> str:
    """A PNG data URL; ``unique`` stamps a process-wide counter into 4 pixels."""
    if unique:
        image = image.copy()
        n = (_STAMP_BASE[0] + next(_STAMPS)) % 2**32
        for i in range(4):  # 4 pixels x 8 bits: 2**32 distinct stamps
            image.putpixel((i, 0), ((n >> (8 * i)) & 255, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mm_kwargs(options) -> dict | None:
    """The request's ``mm_processor_kwargs`` from the hivtp options (None: none)."""
    kwargs: dict = {}
    if options.hivtp_num_tokens is not None:
        kwargs["hivtp_num_tokens"] = options.hivtp_num_tokens
    elif options.hivtp_ratio is not None:
        kwargs["hivtp_retain_ratio"] = options.hivtp_ratio
    if options.hivtp_selection is not None:
        kwargs["hivtp_selection"] = options.hivtp_selection
    return kwargs or None


class ChatUser(HttpUser):
    """One client: streaming chat requests back to back."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.model = options.model or self.client.get("/v1/models").json()["data"][0]["id"]
        self.images = itertools.cycle(image_set(options.image_sizes))
        self.repeated = {}  # image -> data URL, with --repeat-images
        self.extra = mm_kwargs(options)
        self.log = open(options.record, "a", buffering=1) if options.record else None

    def on_stop(self) -> None:
        if self.log:
            self.log.close()

    def _log(self, start: float, **fields: object) -> None:
        if self.log:
            wall = time.time() - (time.perf_counter() - start)
            self.log.write(json.dumps({"start": wall, **fields}) + "\n")

    def _url(self, image: Image.Image) -> str:
        if not self.options.repeat_images:
            return data_url(image)
        if id(image) not in self.repeated:
            self.repeated[id(image)] = data_url(image, unique=False)
        return self.repeated[id(image)]

    def _record(self, name: str, value_ms: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="chat",
            name=name,
            response_time=value_ms,
            response_length=length,
            exception=exc,
            context={},
        )

    @task
    def chat(self) -> None:
        content = [
            {"type": "image_url", "image_url": {"url": self._url(next(self.images))}}
            for _ in range(self.options.images)
        ]
        content.append({"type": "text", "text": self.options.prompt})
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.options.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.extra:
            body["mm_processor_kwargs"] = self.extra
        start = time.perf_counter()
        try:
            with self.client.post(
                "/v1/chat/completions",
                json=body,
                stream=True,
                catch_response=True,
                timeout=self.options.request_timeout,
                name="request",
            ) as response:
                if response.status_code != 200:
                    # Status 0: no response at all (locust keeps the cause,
                    # a timeout or a refused connection, in .error).
                    detail = response.text or repr(getattr(response, "error", None))
                    error = f"HTTP {response.status_code}: {detail[:200]}"
                    response.failure(error)
                    self._log(start, error=error)
                    return
                first, usage = read_stream(response.iter_lines())
                response.success()
        except Exception as exc:  # a disconnect mid-stream is a failed request
            self._record("E2E", (time.perf_counter() - start) * 1e3, 0, exc)
            self._log(start, error=repr(exc))
            return
        end = time.perf_counter()
        first = end if first is None else first
        output = usage.get("completion_tokens", 0)
        self._log(
            start,
            ttft=first - start,
            e2e=end - start,
            prompt_tokens=usage.get("prompt_tokens", 0),
            output_tokens=output,
        )
        self._record("TTFT", (first - start) * 1e3, usage.get("prompt_tokens", 0), None)
        self._record("E2E", (end - start) * 1e3, output, None)
        if output > 1 and end > first:
            self._record("OUTPUT_TPS", (output - 1) / (end - first), output, None)
