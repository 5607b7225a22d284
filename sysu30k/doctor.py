"""``sysu30k doctor``: what this environment offers the pipeline, one check per row."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    """One finding: a name, whether it is usable, what was seen, and a value for scripts (the decoder row's)."""

    name: str
    ok: bool
    detail: str
    value: str | None = None


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
            Check("CUDA", cuda, f"CUDA {torch.version.cuda}; GPUs: {gpus}" if cuda else "no CUDA device"),
            _needs("torch", int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None, _driver())]
    try:
        from .io.compat import import_torchvision

        rows.append(Check("torchvision", True, import_torchvision().__version__))
    except Exception as exc:  # any import failure is a finding, not a crash
        rows.append(Check("torchvision", False, f"{type(exc).__name__}: {exc}"))
    return rows


_DALI_WHEELS = {"nvidia-dali-cuda130": 13, "nvidia-dali-cuda120": 12}
_DRIVER_FOR_CUDA = {12: 525, 13: 580}      # the oldest driver branch each CUDA major runs on


def _driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None without one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _needs(what: str, cuda_major: int | None, driver: str | None) -> Check:
    """Whether the driver here is new enough for a build against CUDA ``cuda_major``."""
    if cuda_major is None:
        return Check(f"{what} driver", False, "a CPU-only build")
    need = _DRIVER_FOR_CUDA.get(cuda_major)
    have = int(driver.split(".")[0]) if driver and driver.split(".")[0].isdigit() else None
    ok = have is not None and need is not None and have >= need
    return Check(f"{what} driver", ok, f"built for CUDA {cuda_major}: needs driver R{need}+; "
                 + (f"have {driver}" if driver else "no driver found (nvidia-smi)"))


def _dali() -> list[Check]:
    wheel = next((w for w in _DALI_WHEELS if _version(w)), None)
    if wheel is None:
        return [Check("DALI", False, "not installed: the Pillow-SIMD loader serves instead")]
    return [Check("DALI", True, f"{_version(wheel)} ({wheel})"), _needs("DALI", _DALI_WHEELS[wheel], _driver())]


def _one_image() -> tuple[bytes, object, object]:
    """A 144×72 JPEG with detail, a 256×128 training spec without augmentation, and its identity parameters."""
    import io

    import numpy as np
    from PIL import Image

    from .loader.transforms import AugParams, TransformSpec

    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 40, (144, 72, 3)).cumsum(1) / np.arange(1, 73)[None, :, None], 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    spec = TransformSpec(height=256, width=128, flip_p=0, erase_p=0)
    pad = np.full(1, spec.pad, np.int32)
    return buf.getvalue(), spec, AugParams(pad, pad.copy(), np.zeros(1, bool), np.zeros((1, 4), np.int32))


def _decoders() -> list[Check]:
    """Decode one JPEG into a 256×128 batch with each decoder this machine offers and report what ran (DALI
    counts only when its graph decoded the image, not the Pillow fallback), and which one training uses."""
    import time

    import numpy as np
    import torch

    from .loader import decode_pil
    from .loader.transforms import place

    data, spec, params = _one_image()
    ref = np.zeros((spec.height, spec.width, 3), np.uint8)
    place(ref, decode_pil.decode(data, spec), 0, params, spec)
    rows = [Check("decode: Pillow", True, "1 image decoded and resized in the loader's own code")]
    devices = []
    if any(_version(w) for w in _DALI_WHEELS):
        devices = ["cpu"] + ([f"cuda:{torch.cuda.current_device()}"] if torch.cuda.is_available() else [])
    mixed = False
    for dev in devices:
        name = "decode: DALI " + ("mixed" if dev.startswith("cuda") else "cpu")
        try:
            from .loader.decode_dali import DaliDecoder

            dec = DaliDecoder(spec, 1, dev, threads=1, depth=1)
            t0 = time.perf_counter()
            (_, images, failed), = dec.stream([{"datas": [data], "params": params, "keys": ["doctor"]}])
            seconds = time.perf_counter() - t0
            ran = dec.decoded == 1 and not failed
            diff = int((images[0].permute(1, 2, 0).cpu().int() - torch.from_numpy(ref).int()).abs().max())
            rows.append(Check(name, ran, (f"1 image on {dev} in {1e3 * seconds:.0f} ms (pipeline build included), "
                                          f"max difference from Pillow {diff} grey level(s)") if ran
                              else f"the graph did not decode the image on {dev}"))
            mixed |= ran and dev.startswith("cuda")
        except Exception as exc:  # a decoder that cannot run here is a finding, not a crash
            rows.append(Check(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
    if torch.cuda.is_available():
        try:
            from .io.compat import import_torchvision

            tv = import_torchvision()
            out = tv.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device="cuda")
            rows.append(Check("decode: torchvision GPU", True, f"nvJPEG via torchvision: {tuple(out.shape)}"))
        except Exception as exc:  # as above
            rows.append(Check("decode: torchvision GPU", False, f"{type(exc).__name__}: {exc}"))
    choice = "dali" if mixed else "pil"
    rows.append(Check("decoder", True, f"{choice}: " + ("DALI's mixed decoding ran on this GPU" if mixed else
                      "Pillow-SIMD in the loader's workers (no GPU decoding ran here)"), value=choice))
    return rows


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
    rows += _pillow() + _torch() + _dali() + _decoders()
    for dist in ("webdataset", "pyarrow", "fsspec", "dask", "distributed"):
        v = _version(dist)
        rows.append(Check(dist, v is not None, v or "not installed"))
    rows += _s3()
    rows.append(Check("malloc tuning", tune_malloc(), "mallopt mmap/trim thresholds for Pillow"))
    return rows
