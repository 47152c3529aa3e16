"""Start-up progress: each stage of making an engine is logged as it ends and timed (benchmarks/startup.py reads
the times). A progress line, since start-up takes tens of seconds on a GPU."""

from __future__ import annotations

import logging
import time

startup_logger = logging.getLogger("nanovllm_ray.startup")


def show_startup_progress() -> None:
    """Start-up takes tens of seconds on a GPU: print its stages (INFO of "nanovllm_ray.startup") to stderr unless
    logging is configured already."""
    log = startup_logger
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("nanovllm-ray %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class StartupClock:
    """Where start-up goes: each stage is logged as it ends (a progress line) and kept in `stages` (seconds)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.stages, self._t = rank, {}, time.perf_counter()

    def done(self, stage: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._t
        self._t = now
        if self.rank == 0:
            startup_logger.info("start-up: %s%s (%.1f s)", stage, f" ({detail})" if detail else "", self.stages[stage])
