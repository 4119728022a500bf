"""Progress and rate reporting for long steps (embedding, clustering, labelling, training).

A tqdm bar on a terminal, and in every case a log line every ``log_every_s`` seconds and at the end
with items done, items/s and (optionally) a second unit such as tokens/s, so Airflow task logs show
rates too.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class Progress:
    """Usage: ``with Progress("embed", total=n, unit="memories") as p: ... p.update(k, tokens=t)``."""

    name: str
    total: int | None = None
    unit: str = "items"
    extra_unit: str | None = None  # e.g. "tokens"
    log_every_s: float = 10.0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("persona_tasks.progress"))
    done: int = 0
    extra: int = 0

    def __enter__(self) -> Progress:
        self._t0 = self._last = time.perf_counter()
        self._bar = tqdm(
            total=self.total, desc=self.name, unit=self.unit.rstrip("s") or "it",
            disable=not sys.stderr.isatty(), leave=False,
        )
        self.logger.info("%s: started (%s %s)", self.name, self.total if self.total is not None else "?", self.unit)
        return self

    def update(self, n: int = 1, **extra: int) -> None:
        self.done += n
        if self.extra_unit:
            self.extra += int(extra.get(self.extra_unit, 0))
        self._bar.update(n)
        now = time.perf_counter()
        if now - self._last >= self.log_every_s:
            self._last = now
            self.logger.info("%s: %s", self.name, self.summary())

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._t0

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        el = max(self.elapsed_s, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        s = f"{self.done}{total} {self.unit} in {el:.1f}s ({self.done / el:.1f} {self.unit}/s"
        if self.extra_unit:
            s += f", {self.extra / el:.1f} {self.extra_unit}/s"
        return s + ")"

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bar.close()
        if exc_type is None:
            self.logger.info("%s: done: %s", self.name, self.summary())
        else:
            self.logger.warning("%s: failed after %s", self.name, self.summary())


def set_threads(n: int) -> None:
    """Pin torch and BLAS/OpenMP thread pools to ``n`` (oversubscription on 2 cores collapses torch 3-20x)."""
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
