"""`sysu30k shard` on object storage (a real SeaweedFS S3 server) and on a real Dask cluster."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import s3fs
from conftest import cli, tree_digest
from faultproxy import FaultProxy

from sysu30k.errors import UserError
from sysu30k.ingest.config import ImageOptions, ShardingOptions, ShardJob
from sysu30k.ingest.shard import run_shard
from sysu30k.io.retry import RetryPolicy

JOB = ShardJob(ShardingOptions(shard_count=4), ImageOptions(resize=100))
CLI_JOB = ["--shard-count", "4", "--resize", "100"]


@pytest.fixture
def fs(s3):
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def bucket(fs):
    name = f"t{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name


@pytest.fixture(scope="module")
def reference(tiny_tree, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ref") / "dst"
    run_shard(str(tiny_tree), str(dst), JOB, show_progress=False)
    return dst


def download(fs, url: str, to: Path) -> Path:
    fs.get(url.removeprefix("s3://") + "/", str(to) + "/", recursive=True)
    return to


def same_output(a: Path, b: Path) -> bool:
    """Byte-identical trees, except that the run records may name a different source URL."""
    da, db = tree_digest(a), tree_digest(b)
    for rel in ("_plan/run.json", "_plan/plan.json", "manifests/summary.json"):
        ja, jb = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
        assert {**ja, "source": None} == {**jb, "source": None}, rel
        da.pop(rel), db.pop(rel)
    return da == db


def test_local_to_s3_and_s3_to_s3_are_byte_identical_to_local(fs, bucket, tiny_tree, reference, tmp_path):
    run_shard(str(tiny_tree), f"s3://{bucket}/from-local", JOB, show_progress=False)
    assert tree_digest(download(fs, f"s3://{bucket}/from-local", tmp_path / "a")) == tree_digest(reference)
    fs.put(str(tiny_tree) + "/", f"{bucket}/raw/", recursive=True)
    run_shard(f"s3://{bucket}/raw", f"s3://{bucket}/from-s3", JOB, workers=2, show_progress=False)
    assert same_output(download(fs, f"s3://{bucket}/from-s3", tmp_path / "b"), reference)
    summary = json.loads(fs.cat(f"{bucket}/from-s3/manifests/summary.json"))
    assert summary["source"] == f"s3://{bucket}/raw"


def test_resume_after_kill_on_s3(fs, bucket, tiny_tree, reference, tmp_path):
    url = f"s3://{bucket}/killed"
    proc = subprocess.Popen([sys.executable, "-m", "sysu30k", "-q", "shard", str(tiny_tree), url, *CLI_JOB],
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(fs.glob(f"{bucket}/killed/_parts/*.done.json")) < 3:
        fs.invalidate_cache()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/killed/manifests/summary.json"), "finished before the kill"
    assert cli("shard", str(tiny_tree), url, *CLI_JOB).returncode == 0
    assert tree_digest(download(fs, url, tmp_path / "k")) == tree_digest(reference)


def test_dropped_connections_and_delays_are_retried(s3, fs, bucket, tiny_tree, reference, tmp_path):
    proxy = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    proxy.drop_after, proxy.drops_left, proxy.delay = 3000, 8, 0.002
    try:
        run_shard(str(tiny_tree), f"s3://{bucket}/flaky", JOB, show_progress=False,
                  storage_options={"client_kwargs": {"endpoint_url": proxy.endpoint}})
    finally:
        proxy.stop()
    assert proxy.dropped >= 4, proxy.dropped
    assert tree_digest(download(fs, f"s3://{bucket}/flaky", tmp_path / "f")) == tree_digest(reference)


def test_outage_mid_run_leaves_nothing_that_looks_complete(s3, fs, bucket, tiny_tree, reference, tmp_path,
                                                           monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("SYSU30K_SPOOL", str(spool))
    proxy = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    proxy.delay = 0.003

    def outage():                                   # the store becomes unreachable after 3 shards
        while len(fs.glob(f"{bucket}/cut/_parts/*.done.json")) < 3:
            fs.invalidate_cache()
            time.sleep(0.02)
        proxy.refuse = True

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    options = {"client_kwargs": {"endpoint_url": proxy.endpoint}, "config_kwargs": {"retries": {"max_attempts": 1}},
               "retries": 1}
    try:
        with pytest.raises(UserError, match=f"s3://{bucket}/cut"):
            run_shard(str(tiny_tree), f"s3://{bucket}/cut", JOB, show_progress=False, storage_options=options,
                      retry=RetryPolicy(attempts=2, base=0.01))
    finally:
        proxy.stop()
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/cut/manifests/summary.json")
    for marker in fs.glob(f"{bucket}/cut/_parts/*.done.json"):       # whatever looks complete is complete
        stats = json.loads(fs.cat(marker))
        tar = fs.cat(f"{bucket}/cut/shards/{stats['shard']}.tar")
        assert len(tar) == stats["bytes"] and hashlib.sha256(tar).hexdigest() == stats["sha256"]
    assert list(spool.iterdir()) == []                               # no staged upload left behind
    run_shard(str(tiny_tree), f"s3://{bucket}/cut", JOB, show_progress=False)
    assert tree_digest(download(fs, f"s3://{bucket}/cut", tmp_path / "c")) == tree_digest(reference)


@pytest.mark.parametrize("case", ["wrong-secret", "missing-bucket", "unreachable"])
def test_permanent_errors_are_one_line_naming_the_url(s3, bucket, tiny_tree, case):
    env, url = {}, f"s3://{bucket}/x"
    if case == "wrong-secret":
        env = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    elif case == "missing-bucket":
        url = "s3://no-such-bucket-here/x"
    else:
        env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}                  # nothing listens on the discard port
    result = cli("shard", str(tiny_tree), url, "--retries", "1", *CLI_JOB, env=env, timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith("sysu30k: error:") and url.split("/x")[0] in lines[-1], lines
    if case == "unreachable":                        # transient: retried (a warning each), then one error line
        assert all(ln.startswith("retrying ") for ln in lines[:-1]) and "attempts" in lines[-1]
    else:                                            # permanent: no retries, just the error
        assert len(lines) == 1


@pytest.fixture(scope="module")
def dask_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def bigger_tree(tmp_path_factory):
    from sysu30k.synth import write_synth
    from sysu30k.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("synth-big") / "tree"
    write_synth(str(root), SynthConfig(folders=30, images_per_folder=12, test_ids=10, distractors=40, height=288,
                                       seed=3), workers=2)
    return root


DASK_JOB = ShardJob(ShardingOptions(shard_count=6), ImageOptions(resize=144))


def test_dask_cluster_gives_the_local_result(dask_cluster, tiny_tree, reference, tmp_path):
    run_shard(str(tiny_tree), str(tmp_path / "d"), JOB, scheduler=dask_cluster.scheduler_address,
              show_progress=False)
    assert tree_digest(tmp_path / "d") == tree_digest(reference)


def test_killing_a_dask_worker_loses_and_duplicates_nothing(dask_cluster, bigger_tree, tmp_path):
    from distributed import Client

    expected = tmp_path / "expected"
    run_shard(str(bigger_tree), str(expected), DASK_JOB, workers=2, show_progress=False)
    dst = tmp_path / "dask"
    killed = {}

    def kill_one_worker():
        while len(list((dst / "_parts").glob("*.done.json"))) < 2:
            time.sleep(0.005)
        with Client(dask_cluster.scheduler_address) as client:
            pid = next(iter(client.run(os.getpid).values()))
        killed["complete_before"] = (dst / "manifests/summary.json").exists()
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    run_shard(str(bigger_tree), str(dst), DASK_JOB, scheduler=dask_cluster.scheduler_address, show_progress=False)
    killer.join(5)
    assert killed.get("pid") and killed["complete_before"] is False
    assert tree_digest(dst) == tree_digest(expected)


def test_unreachable_scheduler_is_a_user_error(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.setattr("sysu30k.ingest.shard.SCHEDULER_TIMEOUT", "2s")
    with pytest.raises(UserError, match="Dask scheduler"):
        run_shard(str(tiny_tree), str(tmp_path / "x"), JOB, scheduler="tcp://127.0.0.1:9", show_progress=False)


def test_the_lock_object_on_s3_refuses_a_live_holder_and_goes_away(s3, bucket):
    from sysu30k.io.lock import exclusive
    from sysu30k.io.storage import Storage

    store = Storage(f"s3://{bucket}/locked")
    with exclusive(store, "_lock.json", "sysu30k shard"):
        with pytest.raises(UserError, match=f"pid {os.getpid()}.*remove s3://{bucket}/locked/_lock.json"):
            with exclusive(Storage(f"s3://{bucket}/locked"), "_lock.json", "sysu30k split"):
                pass
    assert not store.exists("_lock.json")


def test_dask_cluster_indexes_and_packs_the_release(dask_cluster, bigger_tree, tmp_path):
    from sysu30k.synth.release import package_release

    package_release(str(bigger_tree), str(tmp_path / "download"), parts=4)
    run_shard(str(bigger_tree), str(tmp_path / "tree"), DASK_JOB, workers=2, show_progress=False)
    run_shard(str(tmp_path / "download"), str(tmp_path / "dask"), DASK_JOB, scheduler=dask_cluster.scheduler_address,
              show_progress=False)
    shards = {k: v for k, v in tree_digest(tmp_path / "tree").items() if k.startswith("shards/")}
    assert shards == {k: v for k, v in tree_digest(tmp_path / "dask").items() if k.startswith("shards/")}
    assert len(list((tmp_path / "dask/_plan/archives").glob("*.parquet"))) == 5
