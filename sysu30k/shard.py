"""``sysu30k shard``: plan, pack every shard (resuming completed ones), publish the manifests.

Distribution follows img2dataset's split: the planner decides every shard up front, workers pack one
shard per task and return only small stats, and the manifests are published once at the end.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import fsspec
import pyarrow as pa

from .constants import SUBSETS
from .errors import UserError
from .imageproc import VERIFY_MODES, ImageOptions
from .layout import present_subsets
from .packer import PARTS_DIR, SHARD_DIR, ShardStats, ShardTask, is_complete, pack_shard, warm_up
from .plan import PLAN_DIR, ShardingOptions, load_plan, make_plan, shard_name
from .retry import RetryPolicy
from .progress import progress
from .publish import SUMMARY, load_summary, planned_shards, publish
from .storage import Storage

log = logging.getLogger("sysu30k")
OUTPUT_DIRS = (SHARD_DIR, PARTS_DIR, PLAN_DIR, "manifests")
SCHEDULER_TIMEOUT = "20s"             # how long to wait for an existing Dask scheduler to answer


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


Runner = Callable[[list[ShardTask]], Iterator[ShardStats]]


@contextlib.contextmanager
def _runner(workers: int, scheduler: str | None) -> Iterator[Runner]:
    """Where shard tasks run: an existing Dask cluster, local worker processes, or this process.

    Workers start at once, so their imports overlap with planning. Tasks carry no image bytes and
    return only their small stats; a task that runs twice publishes the same bytes twice.
    """
    if scheduler:
        from distributed import Client
        from distributed import as_completed as dask_completed

        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            def on_dask(tasks: list[ShardTask]) -> Iterator[ShardStats]:
                run = uuid.uuid4().hex[:8]
                keys = [f"sysu30k-pack-{shard_name(t.subset, t.index)}-{run}" for t in tasks]
                for future in dask_completed(client.map(pack_shard, tasks, key=keys, retries=2)):
                    yield future.result()
            yield on_dask
        return
    if workers <= 1:
        yield lambda tasks: map(pack_shard, tasks)
        return
    # fork where the platform has it: workers start at once, without re-importing anything (spawn
    # costs each worker 0.3 s of imports that compete with planning on a small machine). No thread
    # exists yet when the pool forks: it is created before planning and before any progress bar.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # pyarrow imports pandas (0.24 s here) when it first builds an array from Python objects, as planning
    # and every packed shard do. Paid once before the fork, the workers inherit it instead of each paying
    # it again after planning, on the critical path.
    pa.array([0])
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for _ in range(workers):
            pool.submit(warm_up)

        def on_pool(tasks: list[ShardTask]) -> Iterator[ShardStats]:
            futures = [pool.submit(pack_shard, t) for t in tasks]
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()
        yield on_pool


def _options_for(url: str, options: dict) -> dict:
    """Storage options apply to remote URLs only (a local path takes none)."""
    protocol, _ = fsspec.core.split_protocol(url)
    return {} if protocol in (None, "file", "local") else options


def run_shard(src_url: str, dst_url: str, job: ShardJob = ShardJob(), workers: int = 1,
              overwrite: bool = False, show_progress: bool = True, storage_options: dict | None = None,
              scheduler: str | None = None, retry: RetryPolicy = RetryPolicy()) -> dict:
    """Pack SRC into shards and manifests under DST; resumes a previous run. Returns the summary.

    SRC and DST are local paths or fsspec URLs; ``storage_options`` go to the remote ones. Shards are
    packed by ``workers`` local processes, or by the Dask cluster at ``scheduler`` when given.
    """
    job.check()
    src_options = _options_for(src_url, storage_options or {})
    dst_options = _options_for(dst_url, storage_options or {})
    src, dst = Storage(src_url, src_options, retry), Storage(dst_url, dst_options, retry)
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
    with _runner(workers, scheduler) as run:
        if plan is None:
            with progress(None, "planning", "file", show_progress) as bar:
                plan = make_plan(src, dst, subsets, job.sharding, settings, on_item=lambda: bar.update())
        for d in OUTPUT_DIRS:
            dst.remove_temporaries(d)
        shards = planned_shards(plan)
        finished = {name: s for _, _, name in shards if (s := is_complete(dst, name)) is not None}
        todo = [ShardTask(src.url, dst.url, subset, i, job.image, src_options, dst_options, retry)
                for subset, i, name in shards if name not in finished]
        if finished:
            log.info("resuming: %d of %d shards complete", len(finished), len(shards))
        total = sum(info["images"] for info in plan["subsets"].values())
        with progress(total, "packing", "img", show_progress) as bar:
            bar.update(sum(s.count + s.rejects for s in finished.values()))
            for stats in run(todo):
                bar.update(stats.count + stats.rejects)
                finished[stats.shard] = stats
    for d in OUTPUT_DIRS:                 # what a worker killed mid-write left behind
        dst.remove_temporaries(d)
    return publish(dst, plan, [finished[name] for _, _, name in shards])
