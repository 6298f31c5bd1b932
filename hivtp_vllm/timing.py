"""Time spent pruning, per forward: device time on CUDA, host time elsewhere.

On a GPU the host only queues kernels, so a host clock around scoring and
selection measures launch overhead, not work. There the spans are bracketed
by CUDA events, and an event pair is read once the device has passed it:
:meth:`PruningTimer.finish` queries events without waiting (``query``, never
``synchronize``), so timing never stalls the forward; a forward's time is
observed at a later forward, or when its events complete. On a CPU the
host clock is the device clock and the time is observed at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["PruningTimer"]

# Forwards whose device time is still unread; older ones are dropped rather
# than let a stalled device grow this without bound.
_MAX_PENDING = 256


class PruningTimer:
    """Sums the spans of one forward and hands the total to ``observe``."""

    def __init__(self, observe: Callable[[float], None]) -> None:
        self._observe = observe
        self._host = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._pending: deque[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = deque(
            maxlen=_MAX_PENDING
        )

    @contextmanager
    def span(self, device: torch.device) -> Iterator[None]:
        """Time the work queued inside, on ``device``."""
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
            return
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._host += time.perf_counter() - begin

    def finish(self, counted: bool) -> None:
        """Close one forward; observe it (if ``counted``) and any earlier one now done."""
        host, events = self._host, self._events
        self._host, self._events = 0.0, []
        if counted and events:
            self._pending.append(events)
        elif counted and host > 0.0:
            self._observe(host)
        while self._pending and all(end.query() for _, end in self._pending[0]):
            done = self._pending.popleft()
            self._observe(sum(start.elapsed_time(end) for start, end in done) / 1000.0)
