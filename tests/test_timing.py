"""hivtp_pruning_seconds: host time on a CPU, device time (CUDA events) on a GPU,
read without ever waiting on the device."""

from __future__ import annotations

import time

import pytest
import torch

from hivtp_vllm import timing
from hivtp_vllm.timing import PruningTimer


def test_cpu_time_is_observed_per_forward():
    seen: list[float] = []
    timer = PruningTimer(seen.append)
    for _ in range(2):
        with timer.span(torch.device("cpu")):
            time.sleep(0.01)
    timer.finish(counted=True)
    assert len(seen) == 1 and 0.02 <= seen[0] < 0.5
    with timer.span(torch.device("cpu")):
        time.sleep(0.01)
    timer.finish(counted=False)  # warm-up and profiling count nothing
    timer.finish(counted=True)  # a forward that pruned nothing observes nothing
    assert len(seen) == 1


class FakeEvent:
    """A CUDA event whose completion the test controls; waiting on it fails."""

    done = False
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None

    def record(self) -> None:
        FakeEvent.clock += 1.0
        self.at = FakeEvent.clock

    def query(self) -> bool:
        return FakeEvent.done

    def elapsed_time(self, end: FakeEvent) -> float:
        assert FakeEvent.done, "elapsed_time before the event completed would block"
        return (end.at - self.at) * 1000.0  # milliseconds, as CUDA reports

    def synchronize(self) -> None:
        raise AssertionError("the timer must not wait on the device")


def test_cuda_time_is_read_from_events_once_they_complete(monkeypatch):
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    FakeEvent.done, FakeEvent.clock = False, 0.0
    seen: list[float] = []
    timer = PruningTimer(seen.append)
    cuda = torch.device("cuda", 0)
    with timer.span(cuda):  # start at 1, end at 2
        pass
    with timer.span(cuda):  # start at 3, end at 4
        pass
    timer.finish(counted=True)
    assert seen == []  # the device is still busy: nothing waited, nothing read
    with timer.span(cuda):  # a warm-up forward: never observed
        pass
    timer.finish(counted=False)
    FakeEvent.done = True
    timer.finish(counted=True)  # the next forward reads the finished one
    assert seen == [pytest.approx(2.0)]  # 1 s + 1 s of device time
