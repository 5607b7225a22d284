"""``sysu30k peek``: a contact sheet of one training batch, one row per bag, labelled with its weak label,
so a user can see what the trainer is fed (augmentations included; normalised batches mapped back to their
pixels) before spending GPU hours."""

from __future__ import annotations

from PIL import Image, ImageDraw

from . import BagSpec, Batch
from .transforms import to_uint8

_LABEL_W = 150


def batch_sheet(batch: Batch, spec: BagSpec, thumb_height: int = 96) -> Image.Image:
    """Rows of bags: the bag's label (folder ids) then its images; padding/damaged slots are crossed out."""
    n, _, h, w = batch.images.shape
    tw = max(1, round(w * thumb_height / h))
    sheet = Image.new("RGB", (_LABEL_W + spec.per_bag * (tw + 2), spec.bags * (thumb_height + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    images = to_uint8(batch.images).permute(0, 2, 3, 1).contiguous().numpy()
    slot = {}
    for i in range(n):
        bag = int(batch.bag[i])
        col = slot.get(bag, 0)
        slot[bag] = col + 1
        x, y = _LABEL_W + col * (tw + 2), bag * (thumb_height + 4)
        sheet.paste(Image.fromarray(images[i]).resize((tw, thumb_height)), (x, y))
        if not bool(batch.valid[i]):
            draw.line([(x, y), (x + tw, y + thumb_height)], fill="red", width=3)
            draw.line([(x + tw, y), (x, y + thumb_height)], fill="red", width=3)
    for bag in range(spec.bags):
        labels = [int(v) for v in batch.bag_labels[batch.bag == bag][:1].flatten().tolist() if v >= 0]
        y = bag * (thumb_height + 4)
        text = f"bag {bag}: {len(labels)} folder(s)\n" + "\n".join(str(v) for v in labels)
        draw.multiline_text((6, y + 4), text, fill="black")
    return sheet
