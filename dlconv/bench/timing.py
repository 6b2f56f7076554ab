"""Where and how the bench times a call: places (host memory with the host clock; CUDA
memory with CUDA events), warm-up and calibration, round-robin medians (:class:`Settings`).

Honesty rules: the first call of every case is the checked warm-up; ``warmup`` more calls
are discarded; a sample is ``inner`` back-to-back calls over ``inner`` (``inner`` chosen so
one sample lasts at least ``min_sample_s``); the samples of all contenders of one
layer/pass are taken round-robin, and the median is reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Callable, List, Optional, Sequence

import numpy as np  # noqa: F401  (HostPlace.put takes NumPy arrays)

from .cases import BATCH

#: Seconds one timing sample should last at least (many calls of a short op per sample,
#: so that timer resolution and call jitter do not dominate).
MIN_SAMPLE_S = 0.05
#: Upper bound on calls per sample.
MAX_INNER = 1000


# ----------------------------------------------------------------------------- places
class HostPlace:
    """Arrays in host memory, timed with ``time.perf_counter``."""

    device = "cpu"
    simulated = False

    def put(self, a: np.ndarray):
        return a

    def stream(self):
        return None

    def sync(self):
        pass

    def time_block(self, fn: Callable, inner: int) -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


class NumbaCudaPlace(HostPlace):
    """Arrays in CUDA memory (Numba device arrays), timed with CUDA events on one stream.

    Under the simulator (``simulated``) the events are replaced by the host clock; such
    timings are never reported as GPU figures.
    """

    device = "cuda"

    def __init__(self):
        from numba import cuda
        self._cuda = cuda
        self.simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        self._stream = cuda.stream()

    def put(self, a: np.ndarray):
        return self._cuda.to_device(a, stream=self._stream)

    def stream(self):
        return self._stream

    def sync(self):
        self._stream.synchronize()

    def time_block(self, fn, inner):
        if self.simulated:
            self.sync()
            t = HostPlace.time_block(self, fn, inner)
            self.sync()
            return t
        start, end = self._cuda.event(), self._cuda.event()
        self.sync()
        start.record(self._stream)
        for _ in range(inner):
            fn()
        end.record(self._stream)
        end.synchronize()
        return self._cuda.event_elapsed_time(start, end) / 1000.0 / inner


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
    median_s: float
    samples_s: List[float]
    inner: int
    warmup: int


def calibrate(fn: Callable, place, warmup: int, min_sample_s: float = MIN_SAMPLE_S) -> int:
    """``warmup`` discarded calls, then one timed call → ``inner``, the calls per sample."""
    for _ in range(max(warmup, 0)):
        fn()
    place.sync()
    t1 = place.time_block(fn, 1)
    return int(min(MAX_INNER, max(1, math.ceil(min_sample_s / max(t1, 1e-9)))))


def measure_interleaved(fns: Sequence[Callable], place, repeats: int, warmup: int,
                        min_sample_s: float = MIN_SAMPLE_S) -> List[Timing]:
    """Time several callables round-robin: sample 1 of each, then sample 2 of each, ...

    On a shared or noisy machine a load burst then hits every contender alike, so the
    ratios stay fair.  The caller has already made each first call (the checked warm-up).
    """
    inners = [calibrate(fn, place, warmup, min_sample_s) for fn in fns]
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(max(repeats, 1)):
        for i, fn in enumerate(fns):
            samples[i].append(place.time_block(fn, inners[i]))
    return [Timing(statistics.median(s), s, n, max(warmup, 0) + 1) for s, n in zip(samples, inners)]


def measure(fn: Callable, place, repeats: int, warmup: int,
            min_sample_s: float = MIN_SAMPLE_S) -> Timing:
    """Median seconds per call of ``fn`` (see :func:`measure_interleaved`)."""
    return measure_interleaved([fn], place, repeats, warmup, min_sample_s)[0]


def rotating_round_robin(fns: dict, rounds: int) -> dict:
    """Host-clock seconds of one call of each zero-argument callable per round, sampled in
    turn, → {name: [seconds, ...]}.  Load that comes and goes on a shared machine hits every
    contender alike; the order rotates every round, because a call pays for what the call
    before it left behind (another model's threads and caches), so every contender follows
    every other equally often.  For calls long enough to time one by one (a train step)."""
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for j in range(len(names)):
            k = names[(r + j) % len(names)]
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return samples


@dataclasses.dataclass
class Settings:
    batch: int = BATCH
    #: True: every layer runs at ``batch`` (``--batch`` given); False: a layer with its own
    #: realistic batch (the shape suites', :mod:`.suites`) keeps it.
    batch_fixed: bool = False
    repeats: int = 7
    warmup: int = 2
    min_sample_s: float = MIN_SAMPLE_S
    train_repeats: int = 21
    seed: int = 0
    budget_s: Optional[float] = None       # stop timing new cases after this many seconds
