#!/usr/bin/env python
"""``sysu30k shard`` reading the release as downloaded (tar parts) against the extracted tree, side by side.

Groups (``--group``; repetitions interleave the configurations of a group, the order within a pair
alternating rep by rep; every run is a fresh child process writing a fresh DST):

  local         one synthetic dataset twice on local disk: the extracted tree (baseline) and the same tree
                packaged as the download (``package_release``: ``train/*_partN.tar``, ``test/*.tar``, lists at
                the root). ``run_shard`` of each, workers 1 and 2, for each ``--verify`` mode. Timed inside
                the child around ``run_shard`` only (indexing + planning + packing + publishing: what a user
                waits for; interpreter start and imports excluded). The page cache is warm (every file read
                once, untimed, before the group). All DSTs' ``shards/`` must be byte-identical (asserted).
  s3            a (smaller) synthetic dataset uploaded to a SeaweedFS bucket (``weed mini`` on 127.0.0.1,
                keys enforced, started by this script) as individual objects (``s3://bench/tree``, baseline)
                and as the release folder (``s3://bench/release``); ``run_shard`` of each into a local DST.
                The timed runs talk to the server directly (CPU seconds of the child and its workers are
                recorded too). One more run of each goes through a counting
                HTTP proxy defined here (tests/faultproxy.py counts connections only), which records every
                request (method, kind, bytes on the wire back) and splits them by phase using the child's
                timestamps: indexing (``index_archives``: finding, sizing and indexing the archives),
                planning + packing (they overlap), publishing.
  index-memory  the member index of the full release shape, 29,606,918 members in 10 parts, with no bytes
                stored: ``members.scan`` is fed by a ``read_at(pos, n)`` that generates a GNU tar stream on
                the fly (every member a 512-byte header for
                ``sysu_train_set_all/<10-digit folder>/<folder>_<6-digit>.jpg`` with 2,561-3,072 data bytes of
                zeros, so its position gives its header). Then ``Source(Storage(<empty dir>), indexes)`` over
                the 10 parts and ``listdir`` of a few folders. As ``run_shard`` does it (``--index-mode
                as-shard``, where the package supports it), each part's index is saved under a DST and dropped,
                and the Source reads them back one at a time; ``held`` keeps every table in memory. Peak RSS
                of the child from ``os.wait4``.
                Baseline: ``tarfile`` reading the same streams (``getmembers``: one TarInfo per member held),
                at ``--index-sizes`` side by side with ours, extrapolated linearly to 29.6 M. Ours also runs
                alone at ``--index-large`` sizes (the full release, or 3 M and 10 M when time is short). The
                generator's own cost is timed on part 1 in the same child and reported beside the scan.

Usage:
  python benchmarks/bench_release.py --group local [--reps 5] [--folders 1300 --images-per-folder 20]
  python benchmarks/bench_release.py --group s3 [--reps 3] [--s3-folders 300]
  python benchmarks/bench_release.py --group index-memory [--reps 3] [--index-large 3000000,29606918]
Raw results: bench-out/bench_release-<group>-<stamp>.json (with the machine and package_sources).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from common import machine, package_digest  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RELEASE_MEMBERS = 29_606_918          # SYSU30K.md: 29,126,188 train + 1,000 query + 479,730 gallery
RELEASE_FOLDERS = 28_310
MEMORY_TARGET_MB = 4096


# ============================================================================ data

def _synth_config(folders: int, per_folder: int, test_ids: int, distractors: int, height: int):
    from sysu30k.synth import SynthConfig

    return SynthConfig(folders=folders, images_per_folder=per_folder, test_ids=test_ids, distractors=distractors,
                       height=height, seed=0)


def ensure_data(base: Path, cfg, parts: int) -> tuple[Path, Path, int]:
    """The tree of ``cfg`` under base/tree and its release packaging (``parts`` training tars) under
    base/release, each made once and reused while the recorded settings match; and the image count."""
    from dataclasses import asdict

    from sysu30k.synth import package_release, write_synth

    tree, release = base / "tree", base / "release"
    want = json.loads(json.dumps(asdict(cfg)))
    stamp = tree / "synth.json"
    if not (stamp.exists() and json.loads(stamp.read_text())["config"] == want):
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(release, ignore_errors=True)
        t = time.perf_counter()
        s = write_synth(str(tree), cfg, workers=2)
        print(f"generated {tree}: {s} in {time.perf_counter() - t:.0f} s", flush=True)
    made = base / "release.json"
    key = {"synth": json.loads(stamp.read_text()), "parts": parts}
    if not (release.is_dir() and made.exists() and json.loads(made.read_text()) == key):
        shutil.rmtree(release, ignore_errors=True)
        t = time.perf_counter()
        s = package_release(str(tree), str(release), parts=parts)
        print(f"packaged {release}: {len(s.archives)} archives, {s.images} images, {s.bytes / 1e6:.1f} MB in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        made.write_text(json.dumps(key))
    images = sum(1 for _, _, files in os.walk(tree) for f in files if f.endswith(".jpg"))
    return tree, release, images


def read_all(path: Path) -> int:
    """Read every file under ``path`` once (warms the page cache); returns the bytes read."""
    n = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while chunk := fh.read(1 << 20):
                    n += len(chunk)
    return n


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def shard_digests(dst: Path) -> dict[str, str]:
    """sha256 of every file under DST/shards (the tars and their DALI indexes)."""
    from sysu30k.manifests import SHARD_DIR

    root = dst / SHARD_DIR
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ============================================================================ child processes

def run_child(spec: dict, env: dict | None = None) -> dict:
    """Run ``spec`` in a fresh interpreter; its RESULT line, plus peak RSS (os.wait4) and wall time."""
    log = Path(spec["log"])
    t0 = time.perf_counter()
    with open(log, "w+") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
                                env=dict(os.environ, **(env or {}), PYTHONPATH=str(ROOT)))
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        f.seek(0)
        out = f.read()
    if code != 0:
        sys.stderr.write(out[-5000:])
        raise SystemExit(f"child {spec['config']} failed with exit status {code} (log {log})")
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    # CPU seconds of the whole child, imports included, and of the workers it reaped
    res.update(peak_rss_mb=usage.ru_maxrss / 1024, proc_s=time.perf_counter() - t0,
               cpu_s=usage.ru_utime + usage.ru_stime)
    return res


def child_shard(spec: dict) -> dict:
    """One ``run_shard`` of spec["src"] into spec["dst"], timed, with the phases' wall-clock marks."""
    import sysu30k.ingest.shard as sh
    from sysu30k.ingest.config import ImageOptions, ShardingOptions, ShardJob

    marks: dict[str, float] = {}

    def wrap(name: str, fn):
        def timed(*a, **k):
            marks[f"{name}_start"] = time.time()
            try:
                return fn(*a, **k)
            finally:
                marks[f"{name}_end"] = time.time()
        return timed

    sh.index_archives = wrap("index", sh.index_archives)
    sh.make_plan = wrap("plan", sh.make_plan)
    sh.publish = wrap("publish", sh.publish)
    job = ShardJob(ShardingOptions(shard_size=spec["shard_size"]), ImageOptions(verify=spec["verify"]))
    def cpu() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    marks["start"] = time.time()
    c0, t0 = cpu(), time.perf_counter()
    summary = sh.run_shard(spec["src"], spec["dst"], job, workers=spec["workers"], show_progress=False)
    seconds, run_cpu = time.perf_counter() - t0, cpu() - c0
    marks["end"] = time.time()
    return {"seconds": seconds, "run_cpu_s": run_cpu, "marks": marks,
            "index_s": marks["index_end"] - marks["index_start"],
            "source_s": marks["plan_start"] - marks["index_end"],       # Source + subsets + worker pool start
            "plan_s": marks["plan_end"] - marks["plan_start"],          # overlaps packing
            "pack_tail_s": marks["publish_start"] - marks["plan_end"],
            "publish_s": marks["publish_end"] - marks["publish_start"],
            "images": sum(s["images"] for s in summary["subsets"].values()),
            "rejects": sum(s["rejects"] for s in summary["subsets"].values()),
            "shards": sum(s["shards"] for s in summary["subsets"].values()),
            "archives": len(summary.get("archives") or [])}


# ---------------------------------------------------------------------------- synthetic tar stream

HEADER = 512
DATA_BLOCKS = 3072                    # every member's data is padded to 6 blocks: sizes 2,561..3,072
RECORD = HEADER + DATA_BLOCKS
NAME_LEN = len("sysu_train_set_all/0000000001/0000000001_000001.jpg")


class SynthTar:
    """Part ``p`` of a release-shaped archive set of ``total`` members in ``folders`` folders, generated on the
    fly: member j of the part is global member g = first + j; its header lies at j * RECORD."""

    def __init__(self, first: int, count: int, total: int, folders: int):
        self.first, self.count, self.total, self.folders = first, count, total, folders
        self.size = count * RECORD + 10240            # two zero blocks, padded to tar's 10 KiB record
        t = tarfile.TarInfo("x" * NAME_LEN)
        t.size, t.mode, t.mtime = DATA_BLOCKS, 0o644, 1_635_984_000
        tpl = t.tobuf(tarfile.GNU_FORMAT)
        assert len(tpl) == HEADER
        self.t1, self.t2, self.t3 = tpl[NAME_LEN:124], tpl[136:148], tpl[156:HEADER]
        self.base = sum(self.t1) + sum(self.t2) + sum(self.t3) + 8 * 32

    def folder_of(self, g: int) -> tuple[int, int]:
        """(folder number from 1, file number in it from 1) of global member g."""
        f = g * self.folders // self.total
        return f + 1, g - -(-(f * self.total) // self.folders) + 1

    def header(self, j: int) -> bytes:
        g = self.first + j
        f = g * self.folders // self.total
        k = g - -(-(f * self.total) // self.folders) + 1
        name = b"sysu_train_set_all/%010d/%010d_%06d.jpg" % (f + 1, f + 1, k)
        size = b"%011o\0" % (DATA_BLOCKS - (g * 2_654_435_761) % 512)
        chk = self.base + sum(name) + sum(size)
        return b"".join((name, self.t1, size, self.t2, b"%06o\0 " % chk, self.t3))

    def read_at(self, pos: int, n: int) -> bytes:
        end = min(pos + n, self.size)
        if pos >= end:
            return b""
        buf = bytearray(end - pos)
        header = self.header
        for j in range(pos // RECORD, min(self.count, (end - 1) // RECORD + 1)):
            h0 = j * RECORD
            if h0 + HEADER <= pos:
                continue
            a, b = max(h0, pos), min(h0 + HEADER, end)
            buf[a - pos:b - pos] = header(j)[a - h0:b - h0]
        return bytes(buf)


class SynthTarFile:
    """A seekable read-only file over a SynthTar (what tarfile needs); wrap in io.BufferedReader."""

    def __init__(self, tar: SynthTar):
        import io

        class Raw(io.RawIOBase):
            pos = 0

            def readable(self):
                return True

            def seekable(self):
                return True

            def seek(self, off, whence=0):
                self.pos = off if whence == 0 else self.pos + off if whence == 1 else tar.size + off
                return self.pos

            def tell(self):
                return self.pos

            def readinto(self, b):
                data = tar.read_at(self.pos, len(b))
                b[:len(data)] = data
                self.pos += len(data)
                return len(data)

        self.raw = Raw()


def _parts(total: int, parts: int) -> list[tuple[int, int]]:
    """(first member, count) of each part: ``total`` split as evenly as possible."""
    base, extra = divmod(total, parts)
    out, first = [], 0
    for p in range(parts):
        n = base + (1 if p < extra else 0)
        out.append((first, n))
        first += n
    return out


def _hwm_mb() -> dict:
    """VmRSS and VmHWM (peak so far) of this process, MB."""
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got


def child_index(spec: dict) -> dict:
    """ours: scan every part into an ArchiveIndex, lay them out as a Source, list a few folders.
    tarfile: getmembers() of every part, all TarInfo objects held."""
    import io

    total, nparts = spec["members"], spec["parts"]
    folders = max(1, round(RELEASE_FOLDERS * total / RELEASE_MEMBERS))
    tars = [SynthTar(first, count, total, folders) for first, count in _parts(total, nparts)]
    res: dict = {"members": total, "parts": nparts, "folders": folders, "rss_at_start": _hwm_mb()}
    if spec["config"] == "tarfile":
        held = []
        t0 = time.perf_counter()
        for t in tars:
            archive = tarfile.open(fileobj=io.BufferedReader(SynthTarFile(t).raw, 1 << 20), mode="r:")
            held.append(archive.getmembers())
            assert len(held[-1]) == t.count, (len(held[-1]), t.count)
        res["scan_s"] = time.perf_counter() - t0
        res["rss_after_scan"] = _hwm_mb()
        last = held[-1][-1]
        assert last.size == DATA_BLOCKS - ((total - 1) * 2_654_435_761) % 512
        return res

    from sysu30k.ingest import members
    from sysu30k.ingest.source import Source
    from sysu30k.io.storage import Storage

    block = spec.get("block", members.LOCAL_BLOCK)
    # the generator alone over part 1, stepping as scan's block reader does (a new window at the first
    # header that does not fit in the last one)
    t = tars[0]
    t0 = time.perf_counter()
    pos = 0
    while pos < t.size:
        buf = t.read_at(pos, block)
        pos += max(1, (len(buf) - HEADER) // RECORD + 1) * RECORD
    res["gen_part1_s"] = time.perf_counter() - t0
    res["gen_part1_members"] = t.count
    # as run_shard does it where the package can: each index kept under DST (Parquet) and dropped from memory,
    # read back one archive at a time while the Source is laid out; else (or with "held") every table held
    keep = spec.get("mode") != "held" and hasattr(members.ArchiveIndex, "without_members")
    empty, dst = Path(spec["empty"]), Storage(spec["index_dst"])
    shutil.rmtree(spec["index_dst"], ignore_errors=True)
    empty.mkdir(parents=True, exist_ok=True)
    indexes, index_mb, save_s = [], 0.0, 0.0
    t0 = time.perf_counter()
    for p, t in enumerate(tars):
        table, damage = members.scan(t.read_at, t.size, lambda: io.BufferedReader(SynthTarFile(t).raw), block)
        assert damage is None and table.num_rows == t.count, (damage, table.num_rows, t.count)
        index = members.ArchiveIndex(f"train/sysu_train_set_all_part{p + 1}.tar", t.size, table)
        index_mb += table.nbytes / 1e6
        if keep:
            t1 = time.perf_counter()
            members.save_index(dst, index)
            index = index.without_members()
            save_s += time.perf_counter() - t1
        indexes.append(index)
    res["scan_s"] = time.perf_counter() - t0 - save_s
    res["save_s"] = save_s
    res["mode"] = "kept under DST" if keep else "held"
    res["rss_after_scan"] = _hwm_mb()
    res["index_mb"] = index_mb
    res["index_parquet_mb"] = du(Path(spec["index_dst"])) / 1e6 if keep else None
    t0 = time.perf_counter()
    source = (Source(Storage(str(empty)), indexes, lambda i: members.load_index(dst, i.path, i.bytes).members)
              if keep else Source(Storage(str(empty)), indexes))
    res["source_s"] = time.perf_counter() - t0
    res["rss_after_source"] = _hwm_mb()
    t0 = time.perf_counter()
    top = source.listdir("sysu_train_set_all")
    assert len(top) == folders and all(e.is_dir for e in top), (len(top), folders)
    listed = {}
    for f in (1, folders // 2 + 1, folders):
        rel = f"sysu_train_set_all/{f:010d}"
        entries = source.listdir(rel)
        listed[rel] = len(entries)
        first = -(-((f - 1) * total) // folders)
        expect = -(-(f * total) // folders) - first
        assert len(entries) == expect and entries[0].name == f"{f:010d}_000001.jpg", (rel, len(entries), expect)
        assert all(e.archive and not e.is_dir and e.problem is None for e in entries)
    res["listdir_s"] = time.perf_counter() - t0
    res["listed"] = listed
    res["rss_after_listdir"] = _hwm_mb()
    return res


def child_main(spec: dict) -> None:
    fn = child_index if spec["config"] in ("ours", "tarfile") else child_shard
    print("RESULT " + json.dumps(fn(spec)), flush=True)


# ============================================================================ counting proxy

class CountingProxy:
    """An HTTP/1.1 forwarding proxy on 127.0.0.1 in front of ``target_port`` that records every request:
    wall time, method, path, query, whether it has a Range header, the status and the bytes sent back.
    Response bytes are charged to the last request seen on their connection (clients do not pipeline)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.requests: list[dict] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> list[dict]:
        with self._lock:
            got, self.requests, self.connections = self.requests, [], 0
        return got

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=30)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            conn: dict = {"current": None}
            threading.Thread(target=self._up, args=(client, upstream, conn), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, conn), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, conn: dict) -> None:
        buf, body_left = b"", 0
        try:
            while data := src.recv(1 << 16):
                buf += data
                while buf:
                    if body_left:
                        take = min(body_left, len(buf))
                        body_left -= take
                        buf = buf[take:]
                        continue
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head, buf = buf[:end].decode("latin-1").split("\r\n"), buf[end + 4:]
                    method, target, _ = head[0].split(" ", 2)
                    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
                    body_left = int(headers.get("content-length", 0) or 0)
                    url = urlsplit(target)
                    rec = {"t": time.time(), "method": method, "path": unquote(url.path), "query": url.query,
                           "range": "range" in headers, "req_body": body_left, "status": None, "resp": 0,
                           "resp_head": None}
                    with self._lock:
                        self.requests.append(rec)
                        conn["current"], conn["hbuf"] = rec, b""
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _down(self, src: socket.socket, dst: socket.socket, conn: dict) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    rec = conn["current"]
                    if rec is not None:
                        rec["resp"] += len(data)
                        if rec["status"] is None:
                            conn["hbuf"] += data
                            end = conn["hbuf"].find(b"\r\n\r\n")
                            if end >= 0:
                                line = conn["hbuf"][:conn["hbuf"].find(b"\r\n")].split()
                                rec["status"] = int(line[1]) if len(line) > 1 and line[1].isdigit() else -1
                                rec["resp_head"] = end + 4
                                conn["hbuf"] = b""
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def stop(self) -> None:
        self._stop.set()
        self._server.close()


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def request_kind(rec: dict, bucket: str) -> tuple[str, str]:
    """(kind, object class) of a recorded S3 request: LIST/HEAD/GET/GET-range/PUT..., and what it touched
    (image objects, archives, other objects such as the lists, or listings)."""
    parts = rec["path"].lstrip("/").split("/", 1)
    key = parts[1] if len(parts) > 1 and parts[0] == bucket else ""
    q = parse_qs(rec["query"], keep_blank_values=True)
    if rec["method"] == "GET" and (not key or "list-type" in q or "delimiter" in q or "prefix" in q):
        return "LIST", "listing"
    kind = "GET range" if rec["method"] == "GET" and rec["range"] else rec["method"]
    what = "image" if key.endswith(".jpg") else "archive" if key.endswith(".tar") else "other"
    return kind, what


def tally(requests: list[dict], marks: dict, bucket: str) -> dict:
    """Requests and bytes by phase (indexing / planning+packing / publishing, from the child's marks), then by
    kind and object class."""
    out: dict = {}
    for r in requests:
        phase = ("before-run" if r["t"] < marks["start"] else "indexing" if r["t"] < marks["index_end"]
                 else "planning+packing" if r["t"] < marks["publish_start"] else "publishing")
        kind, what = request_kind(r, bucket)
        d = out.setdefault(phase, {}).setdefault(f"{kind} {what}", {"requests": 0, "bytes": 0, "body_bytes": 0,
                                                                      "errors": 0})
        d["requests"] += 1
        d["bytes"] += r["resp"]
        d["body_bytes"] += r["resp"] - (r["resp_head"] or 0) if kind != "HEAD" else 0
        d["errors"] += (r["status"] or 0) >= 400
    return out


# ============================================================================ groups

def _interleaved(configs: list, reps: int):
    """Rep by rep, every configuration once; within each pair (baseline, ours) the order alternates."""
    for rep in range(reps):
        order = []
        for i in range(0, len(configs), 2):
            pair = configs[i:i + 2]
            order += pair if rep % 2 == 0 else pair[::-1]
        for c in order:
            yield rep, c


def group_local(args, out: Path) -> dict:
    cfg = _synth_config(args.folders, args.images_per_folder, args.test_ids, args.distractors, args.height)
    tree, release, images = ensure_data(Path(args.data), cfg, args.parts)
    sources = {"tree": tree, "archives": release}
    print(f"local: {images:,} images; tree {du(tree) / 1e6:.1f} MB, release {du(release) / 1e6:.1f} MB "
          f"({args.parts} training parts)", flush=True)
    for path in sources.values():
        read_all(path)
    configs = [(form, w, v) for v in args.verify for w in args.workers for form in ("tree", "archives")]
    runs: dict[str, list[dict]] = {}
    reference: dict[str, str] | None = None
    for rep, (form, w, v) in _interleaved(configs, args.reps):
        name = f"{form} w{w} {v}"
        dst = out / f"dst-{form}-w{w}-{v}"
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        res = run_child({"config": "shard", "src": str(sources[form]), "dst": str(dst), "workers": w, "verify": v,
                         "shard_size": args.shard_size, "log": str(out / "child.log")})
        digests = shard_digests(dst)
        reference = reference or digests
        assert digests == reference, f"{name}: shards differ from the first run's"
        assert res["images"] == images and res["rejects"] == 0, res
        res.pop("marks")
        runs.setdefault(name, []).append(res)
        print(f"  rep {rep} {name:<22} {res['seconds']:7.2f} s  {images / res['seconds']:7.0f} img/s  "
              f"cpu {res['run_cpu_s']:6.2f} s  "
              f"index {res['index_s']:.2f}  plan {res['plan_s']:.2f}  publish {res['publish_s']:.2f}  "
              f"shards {res['shards']}", flush=True)
        shutil.rmtree(dst)
    summary = {}
    for v in args.verify:
        for w in args.workers:
            t = statistics.median(r["seconds"] for r in runs[f"tree w{w} {v}"])
            a = statistics.median(r["seconds"] for r in runs[f"archives w{w} {v}"])
            per = [x["seconds"] / y["seconds"] for x, y in zip(runs[f"tree w{w} {v}"], runs[f"archives w{w} {v}"])]
            tc = statistics.median(r["run_cpu_s"] for r in runs[f"tree w{w} {v}"])
            ac = statistics.median(r["run_cpu_s"] for r in runs[f"archives w{w} {v}"])
            summary[f"w{w} {v}"] = {
                "tree_s": t, "archives_s": a, "ratio_tree_over_archives": t / a, "per_rep_ratio": per,
                "tree_cpu_s": tc, "archives_cpu_s": ac, "cpu_ratio_tree_over_archives": tc / ac,
                "archives_index_s": statistics.median(r["index_s"] for r in runs[f"archives w{w} {v}"]),
                "tree_plan_s": statistics.median(r["plan_s"] for r in runs[f"tree w{w} {v}"]),
                "archives_plan_s": statistics.median(r["plan_s"] for r in runs[f"archives w{w} {v}"]),
                "met": t / a >= 1.0}
    print(f"\n{'config':<14}{'tree s':>9}{'archives s':>12}{'tree/archives':>15}{'CPU s tree/archives':>22}  per rep")
    for k, s in summary.items():
        print(f"{k:<14}{s['tree_s']:>9.2f}{s['archives_s']:>12.2f}{s['ratio_tree_over_archives']:>14.2f}x"
              f"{s['tree_cpu_s']:>9.2f} /{s['archives_cpu_s']:>6.2f} ={s['cpu_ratio_tree_over_archives']:>5.2f}x  "
              + " / ".join(f"{x:.2f}" for x in s["per_rep_ratio"]))
    print(f"shards byte-identical in all {sum(len(r) for r in runs.values())} runs: {len(reference)} files")
    return {"images": images, "tree_bytes": du(tree), "release_bytes": du(release), "parts": args.parts,
            "synth": json.loads((tree / "synth.json").read_text())["config"], "summary": summary, "runs": runs,
            "shard_files": len(reference)}


def group_s3(args, out: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))            # the SeaweedFS launcher the tests use
    from s3server import SeaweedS3

    cfg = _synth_config(args.s3_folders, args.images_per_folder, args.s3_test_ids, args.s3_distractors, args.height)
    tree, release, images = ensure_data(Path(args.s3_data), cfg, args.parts)
    print(f"s3: {images:,} images; tree {du(tree) / 1e6:.1f} MB, release {du(release) / 1e6:.1f} MB", flush=True)
    work = out / "seaweed"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server = SeaweedS3(work)
    os.environ.update(server.env())
    import s3fs

    result: dict = {"images": images, "tree_bytes": du(tree), "release_bytes": du(release), "parts": args.parts,
                    "synth": json.loads((tree / "synth.json").read_text())["config"], "workers": args.s3_workers}
    proxy = None
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        uploads = {}
        for form, path in (("tree", tree), ("release", release)):
            t = time.perf_counter()
            fs.put(str(path) + "/", f"bench/{form}/", recursive=True)
            uploads[form] = time.perf_counter() - t
            print(f"  uploaded {form}: {sum(len(f) for _, _, f in os.walk(path)):,} objects in {uploads[form]:.1f} s",
                  flush=True)
        result["upload_s"] = uploads
        runs: dict[str, list[dict]] = {}
        reference: dict[str, str] | None = None

        def one(form: str, env: dict, tag: str) -> dict:
            nonlocal reference
            dst = out / f"dst-s3-{form}"
            shutil.rmtree(dst, ignore_errors=True)
            res = run_child({"config": "shard", "src": f"s3://bench/{form}", "dst": str(dst), "verify": args.s3_verify,
                             "workers": args.s3_workers, "shard_size": args.shard_size,
                             "log": str(out / "child.log")}, env)
            digests = shard_digests(dst)
            reference = reference or digests
            assert digests == reference, f"s3 {form}: shards differ from the first run's"
            assert res["images"] == images and res["rejects"] == 0, res
            shutil.rmtree(dst)
            print(f"  {tag} {form:<8} {res['seconds']:7.2f} s  {images / res['seconds']:7.0f} img/s  index "
                  f"{res['index_s']:.2f}  plan {res['plan_s']:.2f}", flush=True)
            return res

        for rep, form in _interleaved(["tree", "release"], args.reps):
            res = one(form, server.env(), f"rep {rep}")
            res.pop("marks")
            runs.setdefault(form, []).append(res)
        # one counted run of each, through the proxy
        port = int(server.endpoint.rsplit(":", 1)[1])
        proxy = CountingProxy(port)
        counted = {}
        for form in ("tree", "release"):
            proxy.reset()
            res = one(form, server.env(proxy.endpoint), "counted")
            requests = proxy.reset()
            res["by_phase"] = tally(requests, res["marks"], "bench")
            res["requests"] = len(requests)
            res["bytes"] = sum(r["resp"] for r in requests)
            counted[form] = res
        med = {f: statistics.median(r["seconds"] for r in rs) for f, rs in runs.items()}
        result.update(runs=runs, counted=counted, median_s=med, ratio_tree_over_release=med["tree"] / med["release"],
                      per_rep_ratio=[x["seconds"] / y["seconds"] for x, y in zip(runs["tree"], runs["release"])],
                      met=med["tree"] / med["release"] >= 10)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    print(f"\nmedian tree {med['tree']:.2f} s, release {med['release']:.2f} s: tree/release "
          f"{result['ratio_tree_over_release']:.1f}x (target >= 10x: {'met' if result['met'] else 'NOT met'})")
    for form, res in result["counted"].items():
        print(f"\n{form}: {res['requests']:,} requests, {res['bytes'] / 1e6:.1f} MB back, {res['seconds']:.2f} s "
              "through the proxy")
        for phase, kinds in res["by_phase"].items():
            for kind, d in sorted(kinds.items()):
                print(f"  {phase:<18}{kind:<22}{d['requests']:>8,} req {d['body_bytes'] / 1e6:>10.2f} MB body "
                      f"{d['bytes'] / 1e6:>10.2f} MB wire  errors {d['errors']}")
    return result


def group_index_memory(args, out: Path) -> dict:
    runs: dict[str, list[dict]] = {}

    def record(config: str, members: int) -> None:
        res = run_child({"config": config, "members": members, "parts": args.index_parts, "mode": args.index_mode,
                         "empty": str(out / "empty-src"), "index_dst": str(out / "index-dst"),
                         "log": str(out / "child.log")})
        shutil.rmtree(out / "index-dst", ignore_errors=True)
        runs.setdefault(f"{config}@{members}", []).append(res)
        extra = (f"  gen {res['gen_part1_s'] / res['gen_part1_members'] * 1e6:.2f} us/member (part 1)  "
                 f"source {res['source_s']:.1f} s  listdir {res['listdir_s']:.2f} s") if config == "ours" else ""
        print(f"  {config:<8}{members:>12,} members  scan {res['scan_s']:7.1f} s "
              f"({res['scan_s'] / members * 1e6:.2f} us/member)  peak RSS {res['peak_rss_mb']:8.0f} MB{extra}",
              flush=True)

    for _ in range(args.reps):
        for m in args.index_sizes:
            record("tarfile", m)
            record("ours", m)
    for _ in range(args.index_large_reps):
        for m in args.index_large:
            record("ours", m)
    summary = {}
    for name, rs in runs.items():
        s = {"reps": len(rs), "members": rs[0]["members"],
             "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
             "scan_s": statistics.median(r["scan_s"] for r in rs)}
        s["scan_us_per_member"] = s["scan_s"] / s["members"] * 1e6
        if name.startswith("ours"):
            s["gen_us_per_member"] = statistics.median(r["gen_part1_s"] / r["gen_part1_members"] for r in rs) * 1e6
            s["net_scan_us_per_member"] = s["scan_us_per_member"] - s["gen_us_per_member"]
            s["mode"] = rs[0]["mode"]
            for k in ("source_s", "listdir_s", "index_mb", "save_s"):
                s[k] = statistics.median(r[k] for r in rs)
            for k in ("rss_after_scan", "rss_after_source", "rss_after_listdir"):
                s[k + "_hwm_mb"] = statistics.median(r[k]["VmHWM"] for r in rs)
        summary[name] = s
    fits = {}
    for config in ("tarfile", "ours"):
        pts = sorted((summary[f"{config}@{m}"]["members"], summary[f"{config}@{m}"]["peak_rss_mb"],
                      summary[f"{config}@{m}"]["scan_s"]) for m in args.index_sizes if f"{config}@{m}" in summary)
        if len(pts) >= 2:
            (x0, y0, s0), (x1, y1, s1) = pts[0], pts[-1]
            slope, tslope = (y1 - y0) / (x1 - x0), (s1 - s0) / (x1 - x0)
            fits[config] = {"mb_per_million": slope * 1e6, "at_release_mb": y0 + slope * (RELEASE_MEMBERS - x0),
                            "s_per_million": tslope * 1e6, "at_release_s": s0 + tslope * (RELEASE_MEMBERS - x0)}
    large = sorted((s["members"], s["peak_rss_mb"]) for n, s in summary.items()
                   if n.startswith("ours@") and s["members"] in args.index_large)
    if len(large) >= 2 and large[-1][0] != RELEASE_MEMBERS:
        (x0, y0), (x1, y1) = large[0], large[-1]
        fits["ours_large"] = {"mb_per_million": (y1 - y0) / (x1 - x0) * 1e6,
                              "at_release_mb": y0 + (y1 - y0) / (x1 - x0) * (RELEASE_MEMBERS - x0)}
    print(f"\n{'config':<22}{'reps':>5}{'members':>13}{'scan s':>9}{'us/member':>11}{'peak RSS MB':>13}")
    for name, s in summary.items():
        print(f"{name:<22}{s['reps']:>5}{s['members']:>13,}{s['scan_s']:>9.1f}{s['scan_us_per_member']:>11.2f}"
              f"{s['peak_rss_mb']:>13,.0f}")
    for k, f in fits.items():
        print(f"{k}: {f['mb_per_million']:.0f} MB per million members; at {RELEASE_MEMBERS:,}: "
              f"{f['at_release_mb']:,.0f} MB (linear fit)")
    full = summary.get(f"ours@{RELEASE_MEMBERS}")
    peak = full["peak_rss_mb"] if full else fits.get("ours_large", {}).get("at_release_mb")
    if peak is not None:
        print(f"ours at {RELEASE_MEMBERS:,} members: peak RSS {peak:,.0f} MB "
              f"({'measured' if full else 'extrapolated'}); target < {MEMORY_TARGET_MB} MB: "
              f"{'met' if peak < MEMORY_TARGET_MB else 'NOT met'}")
    return {"summary": summary, "fits": fits, "runs": runs, "release_peak_mb": peak,
            "release_peak_measured": bool(full)}


# ============================================================================ main

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", choices=("local", "s3", "index-memory", "all"), default="all")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-out/release")
    # local
    ap.add_argument("--data", default="bench-out/release/data", help="where the local group's tree and release live")
    ap.add_argument("--folders", type=int, default=1300)
    ap.add_argument("--images-per-folder", type=int, default=20)
    ap.add_argument("--test-ids", type=int, default=100)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--height", type=int, default=144)
    ap.add_argument("--parts", type=int, default=10, help="training tars of the release packaging")
    ap.add_argument("--workers", type=_ints, default=[1, 2])
    ap.add_argument("--verify", type=lambda s: s.split(","), default=["full", "header"])
    ap.add_argument("--shard-size", type=int, default=16 * 10**6,
                    help="bytes per shard (16 MB: several shards, so a second worker has work)")
    # s3
    ap.add_argument("--s3-data", default="bench-out/release/s3data")
    ap.add_argument("--s3-folders", type=int, default=300)
    ap.add_argument("--s3-test-ids", type=int, default=100)
    ap.add_argument("--s3-distractors", type=int, default=300)
    ap.add_argument("--s3-workers", type=int, default=2)
    ap.add_argument("--s3-verify", default="full")
    # index-memory
    ap.add_argument("--index-parts", type=int, default=10)
    ap.add_argument("--index-sizes", type=_ints, default=[150_000, 300_000],
                    help="members, tarfile baseline and ours side by side (interleaved, --reps each)")
    ap.add_argument("--index-large", type=_ints, default=[3_000_000, RELEASE_MEMBERS],
                    help="members, ours alone")
    ap.add_argument("--index-large-reps", type=int, default=1)
    ap.add_argument("--index-mode", choices=("as-shard", "held"), default="as-shard",
                    help="as-shard: each part's index saved under a DST and dropped, read back one at a time "
                         "while the Source is laid out (what run_shard does, where the package supports it); "
                         "held: every index table kept in memory")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    sys.path.insert(0, str(ROOT))
    groups = ("local", "s3", "index-memory") if args.group == "all" else (args.group,)
    for group in groups:
        out = Path(args.out).resolve() / group
        out.mkdir(parents=True, exist_ok=True)
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        load_start, sources_start = os.getloadavg(), package_digest()
        print(f"== {group} ({started}, load {load_start[0]:.2f})", flush=True)
        fn = {"local": group_local, "s3": group_s3, "index-memory": group_index_memory}[group]
        result = fn(args, out)
        info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "group": group, "started": started,
                "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "machine": machine(),
                "package_sources": package_digest(), "package_sources_start": sources_start,
                "args": {k: v for k, v in vars(args).items() if k != "child"}, **result}
        stamp = started.replace(":", "").replace("-", "").split("+")[0]
        path = Path(args.out).resolve().parent / f"bench_release-{group}-{stamp}.json"
        path.write_text(json.dumps(info, indent=1))
        if changed := [k for k, v in info["package_sources"].items() if sources_start.get(k) != v]:
            print(f"WARNING: sysu30k changed during the run ({', '.join(changed)}): runs may mix versions")
        print(f"raw: {path}", flush=True)


if __name__ == "__main__":
    main()
