"""``sysu30k shard``: plan, pack every shard (resuming completed ones), publish the manifests.

Distribution follows img2dataset's split: the planner decides every shard, workers pack one shard per
task and return only small stats, and the manifests are published once at the end. Each shard is handed
to a worker as soon as it is planned, so packing overlaps the walk of the rest of the tree.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import InvalidStateError, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from ..errors import UserError
from ..io.lock import exclusive
from ..io.progress import progress
from ..io.retry import RetryPolicy
from ..io.storage import Storage
from ..manifests import LOCK, PARTS_DIR, PLAN_DIR, SHARD_DIR, SUMMARY
from .config import ShardJob, ShardRun
from .layout import present_subsets
from .members import ArchiveIndex, index_archive, load_index, save_index
from .packer import ShardStats, ShardTask, is_complete, pack_shard, start_worker
from .plan import load_plan, load_run, make_plan, planned_shards, run_record, shard_name, start_plan
from .publish import load_summary, publish
from .source import Source, find_archives
from .verify import missing_or_resized

log = logging.getLogger("sysu30k")
OUTPUT_DIRS = (SHARD_DIR, PARTS_DIR, PLAN_DIR, "manifests")
SCHEDULER_TIMEOUT = "20s"             # how long to wait for an existing Dask scheduler to answer


class Runner:
    """Shard tasks handed over while planning goes on; ``results`` yields the stats of every task handed
    over, as each completes. ``start`` turns a task into something with ``result()`` and ``cancel()``;
    ``call(fn, *args)`` runs any other small task (indexing an archive) in the same place."""

    def __init__(self, start: Callable[[ShardTask], Any], completed: Callable[[list], Iterator[Any]],
                 call: Callable[..., Any] | None = None):
        self._start, self._completed, self._pending = start, completed, []
        self._call = call

    @property
    def in_process(self) -> bool:
        """Whether tasks run in this process (no pool, no cluster)."""
        return self._call is None

    def each(self, fn: Callable, args: list[tuple]) -> Iterator[Any]:
        """``fn(*a)`` for each of ``args``, run where the shard tasks run, yielded as each completes (here, in
        this process, one by one when there is no pool or cluster)."""
        if self._call is None:
            yield from (fn(*a) for a in args)
            return
        futures = [self._call(fn, *a) for a in args]
        try:
            for future in self._completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def submit(self, task: ShardTask) -> None:
        self._pending.append(self._start(task))

    def results(self) -> Iterator[ShardStats]:
        try:
            for future in self._completed(self._pending):
                yield future.result()
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Drop every task not started yet (after an error, nothing waits for them)."""
        for future in self._pending:
            future.cancel()


@dataclass(frozen=True)
class _Deferred:
    """A task this process packs when its result is asked for (the one-worker runner)."""

    task: ShardTask

    def result(self) -> ShardStats:
        return pack_shard(self.task)

    def cancel(self) -> None:
        pass


@contextlib.contextmanager
def _runner(workers: int, scheduler: str | None) -> Iterator[Runner]:
    """Where shard tasks run: an existing Dask cluster, local worker processes, or this process (after
    planning). Tasks carry no image bytes and return only their small stats; a task that runs twice
    publishes the same bytes twice.
    """
    if scheduler:
        from distributed import Client
        from distributed import as_completed as dask_completed

        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        run = uuid.uuid4().hex[:8]

        def on_dask(task: ShardTask) -> Any:
            key = f"sysu30k-pack-{shard_name(task.subset, task.index)}-{run}"
            return client.submit(pack_shard, task, key=key, retries=2)

        def call(fn: Callable, *args) -> Any:
            return client.submit(fn, *args, key=f"sysu30k-{fn.__name__}-{uuid.uuid4().hex[:12]}", retries=2)

        with client, _cancelling(Runner(on_dask, dask_completed, call)) as runner:
            yield runner
        return
    if workers <= 1:
        yield Runner(_Deferred, iter)
        return
    # fork where the platform has it: workers start at once, without re-importing anything (spawn
    # costs each worker 0.3 s of imports that compete with planning on a small machine). No thread
    # exists yet when the pool forks: it is created before planning and before any progress bar.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # pyarrow imports pandas (0.24 s here) when it first builds an array from Python objects, as planning
    # and every packed shard do. Paid once before the fork, the workers inherit it instead of each paying
    # it again on the critical path.
    pa.array([0])
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=start_worker)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)    # workers must not inherit the parent's handler
    try:
        pool.submit(int)                  # starts the workers now, before planning (all of them, when forking)
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        with _cancelling(Runner(lambda t: pool.submit(pack_shard, t), as_completed, pool.submit)) as runner:
            yield runner
    except BaseException:                 # Ctrl-C, SIGTERM, a failed shard: no worker outlives the run
        _stop(pool)
        raise
    pool.shutdown(wait=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers now (a shard in flight is dropped: its tar is a temporary file, and a
    rerun packs it again) and reap them. ``_processes`` is private, and the only handle on the workers
    before Python 3.14's ``terminate_workers``."""
    _quiet_cancelled_future_race()
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for p in workers:
        with contextlib.suppress(Exception):
            p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in workers:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _quiet_cancelled_future_race() -> None:
    """From now on, do not print the InvalidStateError that Python 3.11's pool management thread can raise
    when workers die while some futures are already cancelled (it sets BrokenProcessPool on every pending
    future, cancelled ones included; later versions skip them). The run is stopping; every other thread
    error still goes to the previous hook. Not restored: the thread may raise after the run has ended."""
    previous = threading.excepthook
    if getattr(previous, "quiets_cancelled_future_race", False):     # installed by an earlier stop
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.exc_value, InvalidStateError):
            previous(args)

    hook.quiets_cancelled_future_race = True
    threading.excepthook = hook


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: workers stopped, DST left resumable."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM stops the run the way Ctrl-C does (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(*_):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _cancelling(runner: Runner) -> Iterator[Runner]:
    """``runner``, whose tasks not started yet are dropped if the block fails (planning raised, Ctrl-C)."""
    try:
        yield runner
    except BaseException:
        runner.cancel()
        raise


def _options_for(url: str, options: dict) -> dict:
    """Storage options apply to remote URLs only (a local path takes none)."""
    protocol, _ = fsspec.core.split_protocol(url)
    return {} if protocol in (None, "file", "local") else options


def keep_index(src_url: str, src_options: dict, dst_url: str, dst_options: dict, retry: RetryPolicy,
               archive: str, size: int) -> int:
    """Index ``archive`` of SRC (``size`` bytes) and keep the index under DST (a task: it returns only the
    archive's size)."""
    index = index_archive(Storage(src_url, src_options, retry), archive, size=size)
    save_index(Storage(dst_url, dst_options, retry), index)
    return index.bytes


def index_archives(src: Storage, dst: Storage, runner: Runner, show_progress: bool = True) -> list[ArchiveIndex]:
    """The member index of every archive of SRC (without its member table, which is kept under DST): made by
    an earlier run, or now, one task per archive where the shards are packed (in this process: with
    progress in bytes)."""
    archives = find_archives(src)
    sizes = [src.size(a) for a in archives]
    indexes: list[ArchiveIndex | None] = [load_index(dst, a, n, members=False) for a, n in zip(archives, sizes)]
    todo = [i for i, index in enumerate(indexes) if index is None]
    with progress(sum(sizes[i] for i in todo), "indexing archives", "B", show_progress and bool(todo)) as bar:
        if runner.in_process:
            for i in todo:
                index = index_archive(src, archives[i], bar.update, sizes[i])
                save_index(dst, index)
                indexes[i] = index.without_members()
        else:
            jobs = [(src.url, src.options, dst.url, dst.options, src.policy, archives[i], sizes[i]) for i in todo]
            for size in runner.each(keep_index, jobs):
                bar.update(size)
    return [index or load_index(dst, a, n, members=False) for index, a, n in zip(indexes, archives, sizes)]


def _damaged(index: ArchiveIndex) -> str:
    d = index.damage
    return f"{index.path} is damaged at byte {d.offset}: {d.reason}" + (f" (member {d.member})" if d.member else "")


def damage_line(summary: dict) -> str | None:
    """One line on the damaged archives of a run and what they cost, or None when none is damaged."""
    damaged = [a for a in summary.get("archives", []) if a["damage"]]
    if not damaged:
        return None
    lost = summary["rejects_by_reason"].get("archive-truncated", 0)
    where = ", ".join(f"{a['path']} at byte {a['damage']['offset']}" for a in damaged)
    return f"damaged archive(s): {where}; {lost} image(s) rejected as archive-truncated (a complete download " \
           "packs them)"


def run_shard(src_url: str, dst_url: str, job: ShardJob = ShardJob(), workers: int = ShardRun.workers,
              overwrite: bool = False, show_progress: bool = True, storage_options: dict | None = None,
              scheduler: str | None = None, retry: RetryPolicy = RetryPolicy(), strict: bool = ShardRun.strict) -> dict:
    """Pack SRC into shards and manifests under DST; resumes a previous run. Returns the summary.

    SRC (the extracted tree, the release folder as downloaded, or a mix) and DST are local paths or fsspec
    URLs; ``storage_options`` go to the remote ones. Shards are packed by ``workers`` local processes, or by
    the Dask cluster at ``scheduler`` when given. ``strict``: a damaged archive is an error.
    """
    job.check()
    src_options = _options_for(src_url, storage_options or {})
    dst_options = _options_for(dst_url, storage_options or {})
    src, dst = Storage(src_url, src_options, retry), Storage(dst_url, dst_options, retry)
    with exclusive(dst, LOCK, "sysu30k shard"), _sigterm_as_interrupt():     # one writer per DST
        if overwrite:
            for d in OUTPUT_DIRS:
                dst.remove(d)
        settings = job.settings()
        plan = load_plan(dst)
        recorded = plan or load_run(dst)         # a complete plan, or one an interrupted run started
        if recorded is not None and any(recorded.get(k) != v for k, v in run_record(src.url, settings).items()):
            raise UserError(f"{dst_url} holds a run of other settings, source ({recorded['source']}) or sysu30k "
                            "version; pass --overwrite to start over")
        if recorded is None and dst.exists(SHARD_DIR):
            raise UserError(f"{dst_url} holds shards but no plan; pass --overwrite to start over")
        summary = load_summary(dst)
        if summary is not None:
            if bad := missing_or_resized(dst):
                raise UserError(f"{dst_url} is complete, but {len(bad)} shard(s) are missing or resized, e.g. "
                                f"{bad[0]}: run `sysu30k verify DST`, or pass --overwrite to pack again")
            log.info("%s is complete already (%s); nothing to do", dst_url, SUMMARY)
            return summary
        for d in OUTPUT_DIRS:                 # what a killed run left behind, before any worker writes again
            dst.remove_temporaries(d)
        finished: dict[str, ShardStats] = {}
        with _runner(workers, scheduler) as runner:
            def dispatch(subset: str, index: int, digest: str) -> None:
                """Pack a planned shard unless an earlier run packed these very rows already."""
                name = shard_name(subset, index)
                if (stats := is_complete(dst, name, digest)) is not None:
                    finished[name] = stats
                else:
                    runner.submit(ShardTask(src.url, dst.url, subset, index, job.image, job.labels, src_options,
                                            dst_options, retry))

            if plan is None:
                indexes = index_archives(src, dst, runner, show_progress)
                damaged = [i for i in indexes if i.damage is not None]
                if strict and damaged:
                    raise UserError(f"{_damaged(damaged[0])}; download it again, or drop --strict to pack what it "
                                    "holds")
                for index in damaged:
                    log.warning("%s; what it holds before the damage is packed", _damaged(index))
                source = Source(src, indexes, lambda i: load_index(dst, i.path, i.bytes).members)
                subsets = present_subsets(source, job.subsets)
                start_plan(dst, src.url, settings)
                with progress(None, "planning", "file", show_progress) as bar:
                    plan = make_plan(source, dst, subsets, job.sharding, settings, on_item=lambda: bar.update(),
                                     on_shard=dispatch, labels=job.labels)
            else:
                if strict and (damaged := [a for a in plan["archives"] if a["damage"]]):
                    raise UserError(f"{damaged[0]['path']} is damaged at byte {damaged[0]['damage']['offset']} "
                                    "(--strict); download it again, or drop --strict to pack what it holds")
                for shard in planned_shards(plan):
                    dispatch(*shard)
            shards = [shard_name(subset, i) for subset, i, _ in planned_shards(plan)]
            if finished:
                log.info("resuming: %d of %d shards complete", len(finished), len(shards))
            total = sum(info["images"] for info in plan["subsets"].values())
            with progress(total, "packing", "img", show_progress) as bar:
                bar.update(sum(s.count + s.rejects for s in finished.values()))
                for stats in runner.results():
                    bar.update(stats.count + stats.rejects)
                    finished[stats.shard] = stats
        for d in OUTPUT_DIRS:                 # what a worker killed mid-write left behind
            dst.remove_temporaries(d)
        return publish(dst, plan, [finished[name] for name in shards])
