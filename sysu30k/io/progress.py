"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (no bar frames in logs and CI).

Shown only while the ``sysu30k`` logger passes INFO, so ``sysu30k -q`` (WARNING) silences progress too,
and under torchrun only on rank 0.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger("sysu30k")


class _Lines:
    """tqdm's update/close interface for logs: a ``desc: n/total unit (p%, rate, time left)`` line at each
    tenth of a known total and at least every ``every`` seconds, and one at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = self._shown = self._tenth = 0
        self._start = self._last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        tenth = 10 * self.n // self.total if self.total else 0
        if tenth > self._tenth or now - self._last >= self.every:
            self._tenth, self._last = tenth, now
            self._emit(now)

    def _emit(self, now: float) -> None:
        self._shown = self.n
        rate = self.n / max(now - self._start, 1e-9)
        if not self.total:
            log.info("%s: %d %s (%.0f %s/s)", self.desc, self.n, self.unit, rate, self.unit)
            return
        left = max(self.total - self.n, 0) / rate if rate else float("inf")
        log.info("%s: %d/%d %s (%.0f%%, %.0f %s/s, %.0f s left)", self.desc, self.n, self.total, self.unit,
                 100 * self.n / self.total, rate, self.unit, left)

    def close(self) -> None:
        """The closing line, unless the last line already said as much (or nothing was counted)."""
        if self.n != self._shown:
            self._emit(time.monotonic())

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:          # after an error, its one line is all the user needs
            self.close()


def progress(total: int | None, desc: str, unit: str = "img", enabled: bool = True):
    """A progress counter with ``update(n)``, used as a context manager; a no-op when not ``enabled``, when
    the ``sysu30k`` logger is quieter than INFO, or on a torchrun rank other than 0."""
    if not (enabled and log.isEnabledFor(logging.INFO) and os.environ.get("RANK", "0") == "0"):
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1)
    return _Lines(total, desc, unit)
