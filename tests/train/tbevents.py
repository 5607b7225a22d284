"""A run's TensorBoard events read back with tensorboard's own reader, and what its metrics.jsonl says they
should be (worked out here from the JSON lines, not with sysu30k's mapping)."""

import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files of ``folder``, as TensorBoard shows them
    (events hidden by a resumed run's purge left out)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{EVENT/FIELD: [(step, value as float32), ...]} of every number in ``run/metrics.jsonl``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(f"{r['event']}/{k}", []).append((r["step"], float(np.float32(v))))
    return out


def assert_events_match_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard scalars are exactly metrics.jsonl's numbers (same tags, steps and float32 values,
    no step twice); returns them."""
    got = read_scalars(run / "tensorboard")
    assert got == metrics_scalars(run)
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: steps {steps}"
    return got


def event_files(run: Path) -> list[Path]:
    return sorted((run / "tensorboard").glob("events.out.tfevents.*"))
