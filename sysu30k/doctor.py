"""``sysu30k doctor``: what this environment offers the pipeline, one check per row."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    """One finding: a name, whether it is usable, and what was seen."""

    name: str
    ok: bool
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pillow() -> list[Check]:
    import PIL
    from PIL import features

    simd = "post" in PIL.__version__
    return [
        Check("Pillow-SIMD", simd,
              f"PIL {PIL.__version__} ({'SIMD fork' if simd else 'stock Pillow: 2-3x slower decode'})"),
        Check("libjpeg-turbo", bool(features.check_feature("libjpeg_turbo")),
              f"libjpeg {features.version('jpg') or 'missing'}"),
    ]


def _torch() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", False, "not installed")]
    cuda = torch.cuda.is_available()
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if cuda else "none"
    rows = [Check("torch", True, f"{torch.__version__}, {torch.get_num_threads()} threads"),
            Check("CUDA", cuda, f"CUDA {torch.version.cuda}; GPUs: {gpus}" if cuda else "no CUDA device")]
    try:
        from .io.compat import import_torchvision

        rows.append(Check("torchvision", True, import_torchvision().__version__))
    except Exception as exc:  # any import failure is a finding, not a crash
        rows.append(Check("torchvision", False, f"{type(exc).__name__}: {exc}"))
    return rows


def _dali() -> list[Check]:
    version = _version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda120")
    if version is None:
        return [Check("DALI", False, "not installed: the Pillow-SIMD loader serves instead")]
    try:
        from nvidia.dali import backend

        gpus = backend.GetCUDADeviceCount()
    except Exception:  # no driver: DALI still runs its CPU graph with device_id=None
        gpus = 0
    return [Check("DALI", True, f"{version}; "
                  + (f"GPU decoding (mixed) on {gpus} device(s)" if gpus else "CPU only (device_id=None)"))]


def _s3() -> list[Check]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    profile_file = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")).expanduser()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    creds = ("AWS_ACCESS_KEY_ID set" if key else
             f"profile file {profile_file}" if profile_file.exists() else "no credentials found")
    s3fs = _version("s3fs")
    return [Check("S3", bool(s3fs) and (bool(key) or profile_file.exists()),
                  f"s3fs {s3fs or 'not installed'}; endpoint {endpoint or 'AWS default'}; "
                  f"region {region or 'unset'}; {creds}")]


def run_checks() -> list[Check]:
    """Every check, in display order."""
    from .io.tuning import tune_malloc

    rows = [Check("python", True, f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")]
    rows += _pillow() + _torch() + _dali()
    for dist in ("webdataset", "pyarrow", "fsspec", "dask", "distributed"):
        v = _version(dist)
        rows.append(Check(dist, v is not None, v or "not installed"))
    rows += _s3()
    rows.append(Check("malloc tuning", tune_malloc(), "mallopt mmap/trim thresholds for Pillow"))
    return rows
