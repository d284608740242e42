"""The one benchmark timer, the one spread summary, and the engine's stage clock.

    from timing import Stopwatch, spread, time_ms
    samples = time_ms(lambda: adapter(x), device, warmup=5, repeats=30)   # ms per run, device synced
    spread(samples)                    # {"median", "min", "max"}; percentiles=True adds p10 and p90
    watch = Stopwatch(device)          # one timed stretch of work whose outputs are kept
    inputs = build(); vision_ms = watch.ms(); tokens = generate(inputs); total_ms = watch.ms()

Every benchmark times through `Stopwatch` (a device synchronisation, then `time.perf_counter`, at the
start and at every reading) or `time_ms` (`--warmup` untimed runs, then one Stopwatch per timed run);
`spread` summarises repeats and ratios the same way everywhere (the JSON keys `median`/`min`/`max`, and
`p10`/`p90` for the adapter latency table). The engine's `StageClock` times the stages of one answer.

Why not `torch.utils.benchmark.Timer` (as of torch 2.14, `torch/utils/benchmark/utils/timer.py`): it times
blocks, not runs. `timeit(number)` returns one mean over `number` runs after warm-ups of its own (at
least 2 per call), and `blocked_autorange` picks the block size and the number of blocks from a time
budget; the benchmarks here run exactly `--warmup` and `--repeats` runs (both recorded in their JSON) and
report the spread of single runs (p10/p90, min-max). Its default timer synchronises only the current
accelerator (a runner may sit on another device), it sets the thread pool to one thread unless told
otherwise (the CPU figures are taken on all threads), and it runs a string statement whose result it
drops, where a timed answer's tokens are kept for the lossless check and an extraction pass's outputs
for the equality check. Inside the decode loop stages are timed by CUDA events without a host
synchronisation (`StageClock.lap`), which no wall-clock timer can do.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from common import sync_device


class Stopwatch:
    """Milliseconds since it was made, read between device synchronisations (no-ops on CPU): the device's
    queued work counts where it runs, not where it was launched."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        sync_device(self.device)
        self.start = time.perf_counter()

    def ms(self) -> float:
        """Milliseconds so far (waits for the device's queued work first)."""
        sync_device(self.device)
        return (time.perf_counter() - self.start) * 1e3


def time_ms(fn: Callable[[], Any], device: torch.device | str, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` runs of fn() after `warmup` untimed ones, each run between
    device synchronisations."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        watch = Stopwatch(device)
        fn()
        samples.append(watch.ms())
    return samples


def spread(values: list[float], percentiles: bool = False) -> dict[str, float]:
    """Median, min and max of repeats (or of per-repeat ratios); with `percentiles` also p10 and p90,
    interpolated between measured values ("inclusive": the default "exclusive" method extrapolates
    beyond the fastest and slowest run when there are few repeats; needs two values or more)."""
    out = {"median": statistics.median(values)}
    if percentiles:
        q = statistics.quantiles(values, n=10, method="inclusive")
        out.update(p10=q[0], p90=q[-1])
    return {**out, "min": min(values), "max": max(values)}


def sync_stream(device: torch.device) -> None:
    """Wait for the current stream only: another thread's stream keeps running (the engine's phase 1)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class StageClock:
    """Milliseconds per named stage. `stage` times between synchronisations of the current stream (phase 1,
    where the two threads' intervals are compared on the wall clock); `lap` times the decode loop's stages
    without any: on CUDA it records a pair of events on the current stream and reads them all in `settle()`
    (once per answer), so the loop keeps one host sync per iteration, the read of the verified tokens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.origin = time.perf_counter()
        self._laps: list[tuple[dict[str, float], str, Any, Any]] = []

    def now_ms(self) -> float:
        return (time.perf_counter() - self.origin) * 1e3

    @contextlib.contextmanager
    def stage(self, record: dict[str, float], name: str) -> Iterator[None]:
        sync_stream(self.device)
        start = time.perf_counter()
        yield
        sync_stream(self.device)
        record[name] = record.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    @contextlib.contextmanager
    def lap(self, record: dict[str, float], name: str) -> Iterator[None]:
        if self.device.type != "cuda":  # CPU work is synchronous: `stage`'s wall clock, whose syncs are no-ops
            with self.stage(record, name):
                yield
            return
        stream = torch.cuda.current_stream(self.device)  # the clock's device, whichever device is current
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
        self._laps.append((record, name, begin, end))

    def settle(self) -> None:
        """Add every pending lap to its record (waits for the last one)."""
        if self._laps:
            self._laps[-1][3].synchronize()
        for record, name, begin, end in self._laps:
            record[name] = record.get(name, 0.0) + begin.elapsed_time(end)
        self._laps.clear()


__all__ = ["StageClock", "Stopwatch", "spread", "sync_stream", "time_ms"]
