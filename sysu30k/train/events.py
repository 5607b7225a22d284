"""TensorBoard event files beside ``metrics.jsonl``: each numeric field of a metrics record becomes the scalar
``EVENT/FIELD`` (``step/lr``, ``epoch/val_rank1``, ``cluster/nmi``) at the record's global step, so both logs
carry the same numbers. A resumed run appends a new event file to the same folder and hides what an earlier
process logged after the checkpoint it resumes from (steps it trains again).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError

FOLDER = "tensorboard"                                # RUN/tensorboard/, beside RUN/metrics.jsonl


def scalars(record: dict) -> dict[str, float]:
    """``{EVENT/FIELD: value}`` for the numeric fields of ``record`` but its x axis ``step`` (None, NaN and
    booleans are no scalar)."""
    return {f"{record['event']}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)}


class EventLog:
    """One process's TensorBoard writer, opened at its first record (a run that logs nothing leaves no file).

    ``purge_step``: TensorBoard hides the events of earlier files at this step or later (a resumed run
    passes the step after its checkpoint's, as those steps are trained again)."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(f"TensorBoard logging needs the tensorboard package ({exc}): pip install "
                            "tensorboard, or pass --no-tensorboard") from None
        self._open = lambda: SummaryWriter(str(folder), purge_step=purge_step)
        self._writer = None

    def write(self, record: dict) -> None:
        """The scalars of one metrics record, at its ``step``."""
        if self._writer is None:
            self._writer = self._open()
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        """Write what is queued to disk (the writer flushes by itself only every two minutes)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
