"""Image transforms shared by every decoder: the parameters are drawn once, in the sampler's process,
and each decoder applies exactly them, so decoders agree up to their own rounding.

Training: resize to H×W, pad by ``pad`` (by default 10 px at width 128, scaled with the width) and crop
H×W back at a random offset, horizontal flip, random erasing (area 2-40 %, aspect 0.3-3.3, filled with the
ImageNet mean, i.e. 0 after normalisation).
Evaluation: resize to H×W (bicubic, as the official evaluator), and optionally a flipped copy.
Images leave the decoders as uint8; normalisation happens on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_U8 = tuple(round(m * 255) for m in MEAN)
_LUT = np.stack([(np.arange(256, dtype=np.float32) / 255 - m) / sd for m, sd in zip(MEAN, STD)])   # [3, 256]


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


def apply_numpy(img: np.ndarray, i: int, p: AugParams, spec: TransformSpec) -> np.ndarray:
    """Pad-crop, flip and erase image ``i`` (H×W×3 uint8, already resized) in place of the decoders."""
    if spec.pad and (p.crop_y[i] != spec.pad or p.crop_x[i] != spec.pad):
        padded = np.zeros((spec.height + 2 * spec.pad, spec.width + 2 * spec.pad, 3), np.uint8)
        padded[spec.pad:spec.pad + spec.height, spec.pad:spec.pad + spec.width] = img
        img = padded[p.crop_y[i]:p.crop_y[i] + spec.height, p.crop_x[i]:p.crop_x[i] + spec.width]
    if p.flip[i]:
        img = img[:, ::-1]
    y, x, h, w = p.erase[i]
    if h:
        img = np.array(img)
        img[y:y + h, x:x + w] = MEAN_U8
    return img


def normalize_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] → ImageNet-normalised float32 [N,3,H,W] through a 3×256 lookup table (one gather
    per value: much cheaper than float arithmetic broadcast over channels-last memory)."""
    out = np.empty((images.shape[0], 3, *images.shape[1:3]), np.float32)
    for c in range(3):
        np.take(_LUT[c], images[..., c], out=out[:, c])
    return out
