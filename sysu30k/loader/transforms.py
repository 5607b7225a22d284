"""Image transforms shared by every decoder: the parameters are drawn once, in the sampler's process,
and each decoder applies exactly them, so decoders agree up to their own rounding.

Training: resize to H×W, pad by ``pad`` (by default 10 px at width 128, scaled with the width) and crop
H×W back at a random offset, horizontal flip, random erasing (area 2-40 %, aspect 0.3-3.3, filled with the
ImageNet mean, i.e. 0 after normalisation).
Evaluation: resize to H×W (bicubic, as the official evaluator), and optionally a flipped copy.
Images leave the decoders as uint8; :func:`normalize_` turns them into ImageNet-normalised floats on the
training device (or, for training on the CPU, in the Pillow workers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_U8 = tuple(round(m * 255) for m in MEAN)


@dataclass(frozen=True)
class TransformSpec:
    """Output size and augmentation strengths (the defaults follow common ReID practice)."""

    height: int = 256
    width: int = 128
    pad: int | None = None          # None: scaled_pad(width), the common 10 px at 256×128
    flip_p: float = 0.5
    erase_p: float = 0.5
    train: bool = True

    def __post_init__(self):
        if self.pad is None:
            object.__setattr__(self, "pad", scaled_pad(self.width))


def scaled_pad(width: int) -> int:
    """Crop padding proportional to the width: 10 px at 128 (ReID practice), 5 at 64, 3 at 32. A fixed 10 px
    would shift a 32-wide image by up to a third of its width, which stalled learning at CPU sizes."""
    return max(1, int(10 * width / 128 + 0.5))


@dataclass
class AugParams:
    """Per-image augmentation of a batch: crop offsets into the padded image, flips, erase boxes."""

    crop_y: np.ndarray      # int32 [N] in [0, 2*pad]
    crop_x: np.ndarray
    flip: np.ndarray        # bool [N]
    erase: np.ndarray       # int32 [N, 4]: y, x, h, w (h = 0: no erasing)


def draw_params(n: int, spec: TransformSpec, rng: np.random.Generator) -> AugParams:
    """Augmentation parameters for ``n`` images (all identity when ``spec.train`` is False)."""
    if not spec.train:
        z = np.zeros(n, np.int32)
        return AugParams(z + spec.pad, z + spec.pad, np.zeros(n, bool), np.zeros((n, 4), np.int32))
    crop = rng.integers(0, 2 * spec.pad + 1, size=(2, n)).astype(np.int32)
    flip = rng.random(n) < spec.flip_p
    erase = np.zeros((n, 4), np.int32)
    area = spec.height * spec.width
    for i in np.flatnonzero(rng.random(n) < spec.erase_p):
        for _ in range(10):                        # torchvision's RandomErasing: up to 10 tries
            target = area * rng.uniform(0.02, 0.4)
            ratio = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
            h, w = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
            if 0 < h < spec.height and 0 < w < spec.width:
                erase[i] = (rng.integers(0, spec.height - h + 1), rng.integers(0, spec.width - w + 1), h, w)
                break
    return AugParams(crop[0], crop[1], flip, erase)


def place(dst: np.ndarray, img: np.ndarray, i: int, p: AugParams, spec: TransformSpec) -> None:
    """Write image ``i`` (H×W×3 uint8, already resized) into ``dst`` pad-cropped, flipped and erased. The
    crop is one copy at an offset (the uncovered border is the black padding); the flip is torch's (a
    numpy copy with a negative stride over 3-byte pixels is ten times slower)."""
    h, w, pad = spec.height, spec.width, spec.pad
    dy, dx = pad - int(p.crop_y[i]), pad - int(p.crop_x[i])     # where the image's top-left corner lands
    dst[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h - max(dy, 0),
                                                                    max(-dx, 0):w - max(dx, 0)]
    dst[:max(dy, 0)] = 0
    dst[h + min(dy, 0):] = 0
    dst[:, :max(dx, 0)] = 0
    dst[:, w + min(dx, 0):] = 0
    if p.flip[i]:
        t = torch.from_numpy(dst)
        t.copy_(t.flip(1))
    y, x, eh, ew = p.erase[i]
    if eh:
        dst[y:y + eh, x:x + ew] = MEAN_U8


@functools.cache
def _affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1 / (255 * sd) for sd in STD], device=device).view(3, 1, 1)
    bias = torch.tensor([-m / sd for m, sd in zip(MEAN, STD)], device=device).view(3, 1, 1)
    return scale, bias


def normalize_(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] → ImageNet-normalised into float32 ``out`` of the same shape and device."""
    scale, bias = _affine(out.device)
    return out.copy_(images).mul_(scale).add_(bias)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as the decoder made them (uint8 [..., 3, H, W]): uint8 ones as they are, normalised float ones
    (:func:`normalize_`) mapped back, rounded and clipped, so a picture of a batch shows what was trained on."""
    if images.dtype == torch.uint8:
        return images
    scale, bias = _affine(images.device)
    return ((images.float() - bias) / scale).round_().clamp_(0, 255).to(torch.uint8)
