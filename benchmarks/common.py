"""What every benchmark records beside its figures: the machine, the versions, the package snapshot."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DISTS = ("torch", "torchvision", "pyarrow", "webdataset", "fsspec", "s3fs", "dask", "distributed",
          "nvidia-dali-cuda130", "pillow-simd")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (the platform's processor string where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def machine() -> dict:
    """CPU model and count, memory, Python and library versions, and the load when the run started."""
    import PIL

    return {"date": datetime.date.today().isoformat(), "nproc": os.cpu_count(), "cpu": cpu_name(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "pillow": PIL.__version__,
            **{d: _version(d) for d in _DISTS}, "pillow_simd": _version("pillow-simd") is not None,
            "dali": _version("nvidia-dali-cuda130"), "loadavg_start": os.getloadavg()}


def package_digest() -> dict:
    """sha256 (first 12 hex) of every sysu30k source file: which package version a figure belongs to."""
    pkg = ROOT / "sysu30k"
    return {str(f.relative_to(pkg)): hashlib.sha256(f.read_bytes()).hexdigest()[:12] for f in sorted(pkg.rglob("*.py"))}
