"""Procedural pedestrian crops: an identity fixes what the person looks like, a per-image RNG adds nuisance.

The identity signal (clothing colours and texture, body shape, colouring, accessory) is drawn from an RNG
seeded by the identity alone, so the same id always looks the same. Everything else (pose, scale, shift,
view, background clutter, colour jitter, blur, occlusion) comes from the caller's per-image RNG, and the
camera and global ``style`` set the colour cast and background palette (a domain shift for adaptation).
All geometry is in fractions of the body height, so 144- and 288-high crops show the same scene.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

TEXTURES = ("plain", "hstripes", "vstripes", "checks", "dots")
LOWER_KINDS = ("trousers", "shorts", "skirt")
ACCESSORIES = ("none", "backpack", "bag")

_TEXTURE_P = (0.3, 0.2, 0.15, 0.15, 0.2)
_LOWER_P = (0.6, 0.2, 0.2)
_ACCESSORY_P = (0.5, 0.25, 0.25)
_APPEARANCE_CODE = 0x1D  # RNG stream of identity looks: default_rng([_APPEARANCE_CODE, identity])
_LOOK_CODE = 0x57        # RNG stream of style/camera looks: default_rng([_LOOK_CODE, style(, camera)])
_GOLDEN = 0.6180339887498949  # hue step between consecutive styles: keeps neighbouring styles far apart
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_HAIR = ((0.08, 0.3, 0.1), (0.07, 0.6, 0.25), (0.08, 0.6, 0.45), (0.12, 0.5, 0.8), (0.0, 0.0, 0.7))
_TROUSERS = ((0.6, 0.55, 0.45), (0.0, 0.0, 0.12), (0.0, 0.0, 0.45), (0.11, 0.35, 0.7), (0.6, 0.4, 0.25))


def _hsv(h: float, s: float, v: float) -> RGB:
    """An 8-bit RGB colour from HSV in [0, 1] (hue wraps, saturation and value are clipped)."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


@dataclass(frozen=True)
class Appearance:
    """What one identity always looks like: clothing, body shape, colouring and accessory."""

    upper: RGB
    lower: RGB
    lower_kind: str
    texture: str
    texture_colour: RGB
    texture_period: float  # fraction of body height
    coat_length: float     # how far the upper garment reaches below the hips, fraction of body height
    long_sleeves: bool
    shoulder_width: float  # fraction of body height
    hip_ratio: float       # hip width / shoulder width
    leg_length: float      # fraction of body height
    head_radius: float     # fraction of body height
    skin: RGB
    hair: RGB
    long_hair: bool
    shoes: RGB
    accessory: str
    accessory_colour: RGB
    accessory_side: int    # -1: carried on the left of the image (front view), +1: on the right


def _clothing_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A garment colour as HSV: mostly saturated, sometimes black, grey or white."""
    if rng.random() < 0.15:
        return (rng.random(), rng.uniform(0.0, 0.08), rng.choice((0.12, 0.45, 0.9)) + rng.uniform(-0.05, 0.05))
    return (rng.random(), rng.uniform(0.35, 0.95), rng.uniform(0.3, 0.95))


@lru_cache(maxsize=4096)
def appearance(identity: int) -> Appearance:
    """The fixed look of ``identity``, drawn from an RNG seeded by the id alone so it is learnable."""
    rng = np.random.default_rng([_APPEARANCE_CODE, identity])
    upper = _clothing_colour(rng)
    if rng.random() < 0.35:
        h, s, v = _TROUSERS[rng.integers(len(_TROUSERS))]
        lower = (h + rng.uniform(-0.03, 0.03), s, v + rng.uniform(-0.06, 0.06))
    else:
        lower = _clothing_colour(rng)
    # The pattern contrasts in value with the garment so it survives 4:2:0 chroma subsampling.
    tex_value = upper[2] - 0.45 if upper[2] > 0.5 else upper[2] + 0.45
    hair = _HAIR[rng.integers(len(_HAIR))]
    return Appearance(
        upper=_hsv(*upper),
        lower=_hsv(*lower),
        lower_kind=LOWER_KINDS[rng.choice(len(LOWER_KINDS), p=_LOWER_P)],
        texture=TEXTURES[rng.choice(len(TEXTURES), p=_TEXTURE_P)],
        texture_colour=_hsv(rng.random(), rng.uniform(0.0, 0.9), tex_value),
        texture_period=rng.uniform(0.035, 0.08),
        coat_length=rng.uniform(0.03, 0.2) if rng.random() < 0.33 else 0.0,
        long_sleeves=bool(rng.random() < 0.7),
        shoulder_width=rng.uniform(0.2, 0.28),
        hip_ratio=rng.uniform(0.72, 0.95),
        leg_length=rng.uniform(0.44, 0.52),
        head_radius=rng.uniform(0.055, 0.07),
        skin=_hsv(rng.uniform(0.04, 0.09), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95)),
        hair=_hsv(hair[0], hair[1], hair[2] + rng.uniform(-0.05, 0.05)),
        long_hair=bool(rng.random() < 0.35),
        shoes=_hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.1, 0.9)),
        accessory=ACCESSORIES[rng.choice(len(ACCESSORIES), p=_ACCESSORY_P)],
        accessory_colour=_hsv(*_clothing_colour(rng)),
        accessory_side=int(rng.choice((-1, 1))),
    )


@dataclass(frozen=True)
class CameraLook:
    """How one camera under one global style renders a scene: colour cast, saturation, background palette."""

    gains: tuple[float, float, float]  # per-channel gain (colour cast and exposure)
    saturation: float
    palette: tuple[RGB, ...]           # background colours


@lru_cache(maxsize=256)
def camera_look(style: int, camera: int) -> CameraLook:
    """The look of ``camera`` under ``style``: the style sets a strong cast and palette, the camera varies it."""
    srng = np.random.default_rng([_LOOK_CODE, style])
    crng = np.random.default_rng([_LOOK_CODE, style, camera])
    style_hue = 0.1 + style * _GOLDEN
    cast = np.array(colorsys.hsv_to_rgb((style_hue + crng.uniform(-0.06, 0.06)) % 1.0, 1.0, 1.0))
    strength = srng.uniform(0.12, 0.2) + crng.uniform(-0.04, 0.04)
    exposure = srng.uniform(0.88, 1.08) * crng.uniform(0.93, 1.07)
    gains = exposure * (1.0 + 1.5 * strength * (cast - cast.mean()))
    bg_hue = style_hue + crng.uniform(-0.08, 0.08)
    bg_sat = srng.uniform(0.08, 0.45)
    palette = tuple(_hsv(bg_hue + crng.uniform(-0.12, 0.12), bg_sat * crng.uniform(0.5, 1.5), v)
                    for v in np.sort(crng.uniform(0.2, 0.9, size=6)))
    return CameraLook(gains=tuple(float(g) for g in gains), saturation=float(srng.uniform(0.7, 1.15)),
                      palette=palette)


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre row and column coordinates of a ``height`` x ``width`` image (cached, read-only)."""
    yy, xx = np.indices((height, width), dtype=np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _background(rng: np.random.Generator, height: int, width: int, look: CameraLook) -> Image.Image:
    """A cluttered scene behind the person: wall/floor gradient, rectangles and lines in the camera palette."""
    palette = np.array(look.palette, dtype=np.float32)
    top, wall, floor = palette[rng.integers(len(palette), size=3)] + rng.normal(0.0, 12.0, size=(3, 3))
    horizon = int(rng.uniform(0.55, 0.85) * height)
    column = np.empty((height, 3), dtype=np.float32)
    column[:horizon] = np.linspace(top, wall, horizon, dtype=np.float32)
    column[horizon:] = np.linspace(floor * 0.9, floor * 1.1, height - horizon, dtype=np.float32)
    img = Image.fromarray(column.clip(0, 255).astype(np.uint8)[:, None]).resize((width, height), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 6)):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.1, 0.9) * height
        w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.05, 0.5) * height
        colour = palette[rng.integers(len(palette))] + rng.normal(0.0, 25.0, size=3)
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in colour.clip(0, 255)))
    line_width = max(1, round(height / 144))
    for _ in range(rng.integers(0, 4)):
        x0, y0, x1, y1 = rng.uniform(-0.2, 1.2, size=4) * (width, height, width, height)
        shade = int(rng.uniform(20, 235))
        draw.line((x0, y0, x1, y1), fill=(shade, shade, shade), width=int(line_width * rng.integers(1, 4)))
    return img


def _texture_mask(kind: str, yy: np.ndarray, xx: np.ndarray, period: float) -> np.ndarray:
    """Where the pattern colour goes, for coordinates relative to the garment and ``period`` in px."""
    ys, xs = yy / period, xx / period
    if kind == "hstripes":
        return np.floor(ys) % 2 == 0
    if kind == "vstripes":
        return np.floor(xs) % 2 == 0
    if kind == "checks":
        return (np.floor(ys) + np.floor(xs)) % 2 == 0
    return (ys % 1.0 - 0.5) ** 2 + (xs % 1.0 - 0.5) ** 2 < 0.09  # dots


def _apply_texture(img: Image.Image, garment: Image.Image, app: Appearance, x0: float, y0: float,
                   body: float) -> Image.Image:
    """``img`` with the identity's pattern painted inside the ``garment`` mask, anchored at (x0, y0)."""
    box = garment.getbbox()
    if app.texture == "plain" or box is None:
        return img
    left, top, right, bottom = box
    yy, xx = _grid(img.height, img.width)
    yy, xx = yy[top:bottom, left:right], xx[top:bottom, left:right]
    inside = np.asarray(garment)[top:bottom, left:right] > 0
    inside &= _texture_mask(app.texture, yy - y0, xx - x0, max(2.0, app.texture_period * body))
    arr = np.array(img)
    arr[top:bottom, left:right][inside] = app.texture_colour
    return Image.fromarray(arr)


def _draw_person(img: Image.Image, app: Appearance, rng: np.random.Generator) -> Image.Image:
    """``img`` with the person of ``app`` drawn in a random pose, scale, position and view."""
    height, width = img.height, img.width
    body = 0.86 * height * rng.uniform(0.9, 1.1)
    foot = height * rng.uniform(0.95, 0.99)
    top = foot - body
    cx = width * (0.5 + rng.uniform(-0.12, 0.12))
    back_view = bool(rng.random() < 0.5)
    head = app.head_radius * body
    shoulder_y = top + 2.0 * head + 0.02 * body
    hip = foot - app.leg_length * body
    shoulder_w = app.shoulder_width * body
    hip_w = shoulder_w * app.hip_ratio
    leg_w = hip_w * 0.42
    arm_w = shoulder_w * 0.2
    shoe_h = 0.035 * body
    knee = hip + 0.45 * (foot - hip)
    spread = rng.uniform(-0.01, 0.08) * body

    draw = ImageDraw.Draw(img)
    garment = Image.new("L", img.size, 0)
    garment_draw = ImageDraw.Draw(garment)
    if app.long_hair:
        draw.rectangle((cx - 0.9 * head, top + head, cx + 0.9 * head, shoulder_y + 0.1 * body), fill=app.hair)
    for side in (-1, 1):
        hip_x = cx + side * hip_w * 0.25
        foot_x = hip_x + side * spread * 0.5
        leg = ((hip_x, hip), (foot_x, foot - 0.5 * shoe_h))
        knee_x = hip_x + (foot_x - hip_x) * (knee - hip) / (foot - hip)
        draw.line(leg, fill=app.lower if app.lower_kind == "trousers" else app.skin, width=round(leg_w))
        if app.lower_kind == "shorts":
            draw.line(((hip_x, hip), (knee_x, knee)), fill=app.lower, width=round(leg_w * 1.1))
        draw.ellipse((foot_x - 0.65 * leg_w, foot - shoe_h, foot_x + 0.65 * leg_w, foot), fill=app.shoes)
    if app.lower_kind == "skirt":
        draw.polygon(((cx - 0.5 * hip_w, hip - 0.02 * body), (cx + 0.5 * hip_w, hip - 0.02 * body),
                      (cx + 0.75 * hip_w, knee), (cx - 0.75 * hip_w, knee)), fill=app.lower)
    hem = hip + app.coat_length * body
    flare = 1.0 + app.coat_length
    torso = ((cx - 0.5 * shoulder_w, shoulder_y), (cx + 0.5 * shoulder_w, shoulder_y),
             (cx + 0.5 * hip_w * flare, hem), (cx - 0.5 * hip_w * flare, hem))
    draw.polygon(torso, fill=app.upper)
    garment_draw.polygon(torso, fill=255)
    hands = []
    for side in (-1, 1):
        sx, sy = cx + side * (0.5 * shoulder_w - 0.4 * arm_w), shoulder_y + 0.5 * arm_w
        outward, swing, length = rng.uniform(0.04, 0.22), rng.uniform(-0.6, 0.6), 0.36 * body
        hx, hy = sx + side * length * math.sin(outward), sy + length * math.cos(outward) * math.cos(swing)
        sleeve_end = (hx, hy) if app.long_sleeves else ((sx + hx) / 2, (sy + hy) / 2)
        draw.line(((sx, sy), (hx, hy)), fill=app.skin, width=round(arm_w))
        draw.line(((sx, sy), sleeve_end), fill=app.upper, width=round(arm_w * 1.1))
        garment_draw.line(((sx, sy), sleeve_end), fill=255, width=round(arm_w * 1.1))
        hands.append((hx, hy))
    img = _apply_texture(img, garment, app, cx, shoulder_y, body)
    draw = ImageDraw.Draw(img)
    for hx, hy in hands:
        draw.ellipse((hx - 0.55 * arm_w, hy - 0.55 * arm_w, hx + 0.55 * arm_w, hy + 0.55 * arm_w), fill=app.skin)
    strap = max(1, round(0.08 * shoulder_w))
    if app.accessory == "backpack":
        if back_view:
            draw.rounded_rectangle((cx - 0.38 * shoulder_w, shoulder_y + 0.03 * body, cx + 0.38 * shoulder_w,
                                    shoulder_y + 0.28 * body), radius=0.03 * body, fill=app.accessory_colour)
        else:
            for side in (-1, 1):
                x = cx + side * 0.3 * shoulder_w
                draw.line(((x, shoulder_y), (x, shoulder_y + 0.2 * body)), fill=app.accessory_colour, width=strap)
    elif app.accessory == "bag":
        side = -app.accessory_side if back_view else app.accessory_side
        bag_x = cx + side * (0.5 * hip_w + 0.06 * body)
        draw.line(((cx - side * 0.4 * shoulder_w, shoulder_y), (bag_x, hip - 0.04 * body)),
                  fill=app.accessory_colour, width=strap)
        draw.rectangle((bag_x - 0.07 * body, hip - 0.05 * body, bag_x + 0.07 * body, hip + 0.08 * body),
                       fill=app.accessory_colour)
    draw.rectangle((cx - 0.35 * head, shoulder_y - 0.6 * head, cx + 0.35 * head, shoulder_y + 1), fill=app.skin)
    draw.ellipse((cx - 0.85 * head, top, cx + 0.85 * head, top + 2.0 * head), fill=app.hair)
    if not back_view:
        draw.ellipse((cx - 0.72 * head, top + 0.45 * head, cx + 0.72 * head, top + 2.0 * head), fill=app.skin)
    return img


def _occlude(img: Image.Image, rng: np.random.Generator, look: CameraLook) -> None:
    """Cover a random box of 10-30 % of ``img`` (a passer-by, a pole, a car) in place."""
    area = rng.uniform(0.1, 0.3) * img.width * img.height
    w = rng.uniform(0.4, 1.0) * img.width
    h = area / w
    x0, y0 = rng.uniform(0, img.width - w), rng.uniform(0, img.height - h)
    base = np.array(look.palette[rng.integers(len(look.palette))], dtype=np.float32)
    colour = base + rng.normal(0.0, 40.0, size=3)
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in colour.clip(0, 255)))


def _hue_rotation(theta: float) -> np.ndarray:
    """The RGB matrix that rotates hue by ``theta`` radians about the grey axis (Rodrigues' formula)."""
    k = np.full(3, 1.0 / math.sqrt(3.0))
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1.0 - math.cos(theta)) * np.outer(k, k)


def _colour_transform(img: Image.Image, rng: np.random.Generator, look: CameraLook) -> Image.Image:
    """Camera cast and saturation plus small per-image brightness, contrast and hue jitter, as one affine map."""
    contrast = rng.uniform(0.88, 1.12)
    brightness = rng.uniform(0.9, 1.1)
    saturation = look.saturation * np.eye(3) + (1.0 - look.saturation) * np.outer(np.ones(3), _LUMA)
    matrix = np.diag(np.array(look.gains) * brightness) @ saturation @ _hue_rotation(rng.uniform(-0.12, 0.12))
    offset = (1.0 - contrast) * 128.0 * matrix.sum(axis=1)
    affine = np.concatenate([contrast * matrix, offset[:, None]], axis=1)
    return img.convert("RGB", tuple(float(a) for a in affine.ravel()))


def render_person(identity: int, rng: np.random.Generator, height: int, camera: int, style: int) -> Image.Image:
    """An RGB pedestrian crop (``height`` x ``height // 2``) of ``identity``; all nuisance comes from ``rng``."""
    look = camera_look(style, camera)
    img = _draw_person(_background(rng, height, height // 2, look), appearance(identity), rng)
    if rng.random() < 0.15:
        _occlude(img, rng, look)
    img = _colour_transform(img, rng, look)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2) * height / 144))
    return img
