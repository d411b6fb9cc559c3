"""Several replays of a largest-fit search at once.

A long generation's replay takes seconds (every decode step's requests through the allocator
model: 816,000 for Qwen3-0.6B at 512 + 512 tokens), and a search replays tens of values. The
values one step of the search needs (the bisection's next midpoints, the values below an edge) do
not depend on each other, so when a replay is slow they run in worker processes, forked from this
one. The search reads their results in the order it would have computed them, so its answer is the
same with one worker or many.

Workers are forked, never spawned (a spawned worker would import the caller's main module), and
only from a single-threaded process (a fork copies no other thread, and a lock another thread held
would stay held in the worker); elsewhere, and off Linux, the replays run one at a time.
`VRAMPLAN_WORKERS` sets how many (1: none).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from ...errors import WorkloadError

WORKERS_VARIABLE = "VRAMPLAN_WORKERS"
# a replay slower than this is worth a worker: forking the process and sending the run's
# description to it take milliseconds; the 16-token replays of most searches take less
SLOW_REPLAY_SECONDS = 0.25


def worker_count() -> int:
    """The CPUs this process may use, or VRAMPLAN_WORKERS."""
    setting = os.environ.get(WORKERS_VARIABLE, "").strip()
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise WorkloadError(f"{WORKERS_VARIABLE} is a number of worker processes (1 or more), not {setting!r}.")
        return int(setting)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def can_fork() -> bool:
    """Linux, and no thread but this one (Python's or native: /proc lists them all)."""
    if not sys.platform.startswith("linux") or threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class ReplayPool:
    """Runs `replay(value)` for many values: in forked workers once `slow` is set, else here."""

    def __init__(self, replay: Callable[[int], Any], workers: int) -> None:
        self.replay = replay
        self.workers = workers
        self.slow = False
        self._executor: ProcessPoolExecutor | None = None

    def timed(self, value: int) -> Any:
        """One replay here; a slow one turns the workers on for the next."""
        started = time.perf_counter()
        result = self.replay(value)
        self.slow = self.slow or time.perf_counter() - started >= SLOW_REPLAY_SECONDS
        return result

    @property
    def parallel(self) -> bool:
        return self.slow and self.workers > 1

    @property
    def batch_size(self) -> int:
        """How many replays one step of a search should ask for at once."""
        return self.workers if self.parallel else 1

    def map(self, values: Iterable[int]) -> list[Any]:
        values = list(values)
        if len(values) < 2 or not self.parallel:
            return [self.replay(value) for value in values]
        if self._executor is None:
            if not can_fork():
                self.workers = 1
                return [self.replay(value) for value in values]
            global _REPLAY
            _REPLAY = self.replay  # the forked workers inherit it
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        return list(self._executor.map(_replay_in_worker, values))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self) -> ReplayPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_REPLAY: Callable[[int], Any] | None = None


def _replay_in_worker(value: int) -> Any:
    assert _REPLAY is not None
    return _REPLAY(value)
