"""``sysu30k shard``: plan, pack every shard (resuming completed ones), publish the manifests.

Distribution follows img2dataset's split: the planner decides every shard up front, workers pack one
shard per task and return only small stats, and the manifests are published once at the end.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Iterator

from .constants import SUBSETS
from .errors import UserError
from .imageproc import VERIFY_MODES, ImageOptions
from .layout import present_subsets
from .packer import PARTS_DIR, SHARD_DIR, ShardStats, ShardTask, is_complete, pack_shard
from .plan import PLAN_DIR, ShardingOptions, load_plan, make_plan
from .progress import progress
from .publish import SUMMARY, load_summary, planned_shards, publish
from .storage import Storage
from .tuning import tune_malloc

log = logging.getLogger("sysu30k")
OUTPUT_DIRS = (SHARD_DIR, PARTS_DIR, PLAN_DIR, "manifests")


@dataclass(frozen=True)
class ShardJob:
    """What to pack and how: the options that decide the output bytes."""

    sharding: ShardingOptions = field(default_factory=ShardingOptions)
    image: ImageOptions = field(default_factory=ImageOptions)
    subsets: tuple[str, ...] = SUBSETS

    def settings(self) -> dict:
        """The options as plain data, recorded in the plan and compared on resume."""
        return {"sharding": asdict(self.sharding), "image": asdict(self.image), "subsets": list(self.subsets)}

    def check(self) -> None:
        """Raise UserError for options that cannot work."""
        if self.image.verify not in VERIFY_MODES:
            raise UserError(f"--verify must be one of {', '.join(VERIFY_MODES)}")
        if self.image.resize is not None and self.image.resize < 8:
            raise UserError("--resize must be at least 8 pixels")
        if not 1 <= self.image.quality <= 100:
            raise UserError("--quality must be between 1 and 100")
        if self.sharding.shard_count < 1 or self.sharding.shard_size < 1024:
            raise UserError("--shard-count must be >= 1 and --shard-size >= 1 KiB")
        unknown = set(self.subsets) - set(SUBSETS)
        if unknown or not self.subsets:
            raise UserError(f"--subsets takes a comma-separated choice of {', '.join(SUBSETS)}")


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes, started at once so their imports overlap with planning; None for in-process."""
    if workers <= 1:
        tune_malloc()
        yield None
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=tune_malloc) as pool:
        for _ in range(workers):
            pool.submit(tune_malloc)
        yield pool


def _run_tasks(pool: ProcessPoolExecutor | None, tasks: list[ShardTask], bar) -> list[ShardStats]:
    done: list[ShardStats] = []
    if pool is None:
        for task in tasks:
            done.append(pack_shard(task))
            bar.update(done[-1].count + done[-1].rejects)
        return done
    futures = [pool.submit(pack_shard, t) for t in tasks]
    try:
        for fut in as_completed(futures):
            done.append(fut.result())
            bar.update(done[-1].count + done[-1].rejects)
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    return done


def run_shard(src_url: str, dst_url: str, job: ShardJob = ShardJob(), workers: int = 1,
              overwrite: bool = False, show_progress: bool = True) -> dict:
    """Pack SRC into shards and manifests under DST; resumes a previous run. Returns the summary."""
    job.check()
    src, dst = Storage(src_url), Storage(dst_url)
    if overwrite:
        for d in OUTPUT_DIRS:
            dst.remove(d)
    subsets = present_subsets(src, job.subsets)
    settings = job.settings()
    plan = load_plan(dst)
    if plan is not None and (plan["settings"] != settings or plan["source"] != src.url):
        raise UserError(f"{dst_url} holds a run of other settings or source ({plan['source']}); "
                        "pass --overwrite to start over")
    if plan is None and dst.exists(SHARD_DIR):
        raise UserError(f"{dst_url} holds shards but no plan; pass --overwrite to start over")
    summary = load_summary(dst)
    if summary is not None:
        log.info("%s is complete already (%s); nothing to do", dst_url, SUMMARY)
        return summary
    with _executor(workers) as pool:
        if plan is None:
            with progress(None, "planning", "file", show_progress) as bar:
                plan = make_plan(src, dst, subsets, job.sharding, settings, on_item=lambda: bar.update())
        for d in OUTPUT_DIRS:
            dst.remove_temporaries(d)
        shards = planned_shards(plan)
        finished = {name: s for _, _, name in shards if (s := is_complete(dst, name)) is not None}
        todo = [ShardTask(src.url, dst.url, subset, i, job.image) for subset, i, name in shards
                if name not in finished]
        if finished:
            log.info("resuming: %d of %d shards complete", len(finished), len(shards))
        total = sum(info["images"] for info in plan["subsets"].values())
        with progress(total, "packing", "img", show_progress) as bar:
            bar.update(sum(s.count + s.rejects for s in finished.values()))
            for stats in _run_tasks(pool, todo, bar):
                finished[stats.shard] = stats
    return publish(dst, plan, [finished[name] for _, _, name in shards])
