"""What a Prefect task run's log says while a stage runs: training progress (step/total and loss at the
engine's logging interval), cache hits with their time, and at the end the verdict and the version.

Outside a Prefect run (a plain function call, a test) the same lines go to the `perennial` logger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from perennial.tracking import METRICS_OBSERVER


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger of the task or flow run this code runs in (its lines show on that run's
    page), else the `perennial` logger."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # prefect's MissingContextError: not inside a flow or task run
        return logging.getLogger("perennial")


@dataclass
class Progress:
    """What a stage did, filled while it runs: training steps seen (step, loss) and the elapsed seconds."""

    label: str
    total: int | None
    steps: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trained(self) -> bool:
        return bool(self.steps)


@contextmanager
def stage_progress(label: str, total: int | None = None) -> Iterator[Progress]:
    """Log every `train/loss` the stage's tracker sends (the engine's log_every interval) as
    ``label: step 20/40, loss 1.2345 (31 s)``; at the end, either how many steps it trained or that
    its committed output was reused: ``label: committed output reused (cache hit), 0.4 s``."""
    logger = run_logger()
    progress = Progress(label, total)
    started = time.perf_counter()

    def observe(metrics: dict, step: int) -> None:
        loss = metrics.get("train/loss")
        if loss is None:
            return
        progress.steps.append((step, float(loss)))
        of = f"/{total}" if total else ""
        logger.info("%s: step %d%s, loss %.4f (%.0f s)", label, step, of, loss, time.perf_counter() - started)

    token = METRICS_OBSERVER.set(observe)
    try:
        yield progress
    finally:
        METRICS_OBSERVER.reset(token)
        progress.seconds = time.perf_counter() - started
    if progress.trained:
        step, loss = progress.steps[-1]
        logger.info("%s: trained to step %d%s in %.1f s, last loss %.4f", label, step, f"/{total}" if total else "",
                    progress.seconds, loss)
    else:
        logger.info("%s: committed output reused (cache hit), %.1f s", label, progress.seconds)

