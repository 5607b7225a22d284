"""Progress reporting: a tqdm bar on a terminal, a plain log line every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("sysu30k")


class _Lines:
    """tqdm's update/close interface, printing ``desc: n/total`` lines for logs and CI."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = 10.0, silent: bool = False):
        self.total, self.desc, self.unit, self.every, self.silent = total, desc, unit, every, silent
        self.n = 0
        self._start = self._last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if not self.silent and now - self._last >= self.every:
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        rate = self.n / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s (%.0f %s/s)", self.desc, self.n, of, self.unit, rate, self.unit)

    def close(self) -> None:
        if not self.silent:
            self._emit(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "img", enabled: bool = True):
    """A progress counter with ``update(n)``; silent when not ``enabled``."""
    if enabled and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)
    return _Lines(total, desc, unit, silent=not enabled)
