"""What an evaluation leaves in its run folder, and what it prints.

* ``metrics.json``: the headline numbers (rank-1/5/10/20, ``mAP_official`` = the official script's
  trapezoidal mAP, ``mAP_standard`` = non-interpolated mAP), the CMC curve, the definitions, the inputs.
* ``per_query.parquet``: table ``per_query`` of manifests/schema.toml.
* ``cmc.png``: the CMC curve up to rank 20.
* ``ranked.png``: for chosen queries (or the worst ones), the query and its top-10 gallery images
  read from the shards, true matches outlined in green, others in red.
Plus :func:`table` (the terminal summary) and :func:`compare` (two runs side by side).
"""

from __future__ import annotations

import datetime
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import manifests
from ..errors import UserError
from ..io.storage import Storage
from .scoring import TIE_RULE, Scores

log = logging.getLogger("sysu30k")

METRICS = "metrics.json"
PER_QUERY = "per_query.parquet"
CMC_PNG = "cmc.png"
RANKED_PNG = "ranked.png"
METRICS_VERSION = 1
DEFINITIONS = {
    "rank_k": "fraction of ALL queries whose first true match (same pid, other camera; junk removed) is "
              "within the top k; queries without a true match count as misses (official averaging)",
    "mAP_official": "Market-1501-style trapezoidal AP as Using_SYSU30k_Test_Set/test_sysu_combine.py: "
                    "one true match at rank r gives 1 if r = 0 else 1/(2(r+1)); summed, divided by ALL queries",
    "mAP_standard": "non-interpolated AP (mean precision at each true match; one true match: 1/(r+1)), "
                    "divided by ALL queries",
    "tie_rule": TIE_RULE,
    "junk": "same pid and same camera, or label -1; removed from the ranking. Distractors (pid -1000) are negatives",
}
THUMB_H, THUMB_W, BORDER = 128, 64, 4


# ----------------------------------------------------------------------------- writing a run

def write_run(out_dir: str, scores: Scores, meta: dict, dst_url: str | None = None, show: tuple[str, ...] = (),
              worst: int = 6, storage_options: dict | None = None) -> dict:
    """Write metrics.json, per_query.parquet, cmc.png and ranked.png into ``out_dir``; returns metrics."""
    out = Storage(out_dir)
    n_match = int((scores.first_rank >= 0).sum())
    metrics = {"version": METRICS_VERSION, "metrics": scores.summary(), "cmc": [float(c) for c in scores.cmc],
               "queries_with_match": n_match, "queries_without_match": int(len(scores.first_rank) - n_match),
               "definitions": DEFINITIONS, "score_seconds": round(scores.seconds, 3),
               "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **meta}
    buf = io.BytesIO()
    pq.write_table(scores.per_query, buf, compression="zstd")
    out.write_atomic(PER_QUERY, buf.getvalue())
    out.write_atomic(CMC_PNG, cmc_png(scores.cmc, meta.get("label", "")))
    picked = pick_queries(scores.per_query, show, worst)
    thumbs = Thumbnails(dst_url, storage_options) if dst_url else None
    out.write_atomic(RANKED_PNG, ranked_png(scores.per_query, picked, thumbs))
    out.write_atomic(METRICS, (json.dumps(metrics, indent=1) + "\n").encode())
    return metrics


def pick_queries(per_query: pa.Table, show: tuple[str, ...], worst: int) -> list[int]:
    """Row numbers of the queries to draw: ``show`` keys, else the ``worst`` (latest first true match)."""
    keys = per_query["key"].to_pylist()
    if show:
        where = {k: i for i, k in enumerate(keys)}
        missing = [k for k in show if k not in where]
        if missing:
            raise UserError(f"--show: {missing[0]} is not a query key")
        return [where[k] for k in show]
    first = per_query["first_match_rank"].to_numpy()
    ap = per_query["ap_official"].to_numpy()
    cand = np.flatnonzero(first >= 0)
    order = cand[np.lexsort((cand, ap[cand], -first[cand]))]
    return order[:worst].tolist()


def cmc_png(cmc: np.ndarray, label: str = "") -> bytes:
    """The CMC curve as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = np.arange(1, len(cmc) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(ranks, 100 * np.asarray(cmc), marker="o", ms=3, label=label or None)
    for k in (1, 5, 10, 20):
        if k <= len(cmc):
            ax.annotate(f"{100 * cmc[k - 1]:.1f}", (k, 100 * cmc[k - 1]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_title("CMC (official protocol)")
    ax.set_xlim(0.5, len(cmc) + 0.5)
    ax.set_ylim(0, max(5.0, min(100.0, 100 * float(np.max(cmc)) * 1.15 + 2)))
    ax.grid(alpha=0.3)
    if label:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class Thumbnails:
    """Images by key, read from DST's shards through the images manifest (None when unavailable)."""

    def __init__(self, dst_url: str, storage_options: dict | None = None):
        self.dst = Storage(dst_url, storage_options)

    def get(self, keys: list[str]) -> dict:
        from PIL import Image

        rel = manifests.relpath("images")
        try:
            if not self.dst.exists(rel):
                return {}
            t = self.dst.read_table(rel, columns=["key", "shard", "offset", "size"],
                             filters=[("key", "in", list(set(keys)))])
        except Exception as exc:                     # thumbnails are decoration: never fail the run
            log.warning("ranked list without thumbnails: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return {}
        out = {}
        for key, shard, offset, size in zip(*(t[c].to_pylist() for c in ("key", "shard", "offset", "size"))):
            try:
                with self.dst.open(f"shards/{shard}.tar") as f:
                    f.seek(offset)
                    data = f.read(size)
                out[key] = Image.open(io.BytesIO(data)).convert("RGB")
            except Exception as exc:
                log.warning("no thumbnail for %s: %s", key, exc)
        return out


def ranked_png(per_query: pa.Table, rows: list[int], thumbs: Thumbnails | None) -> bytes:
    """One row per query: the query (blue frame) and its top gallery images (green: true match)."""
    from PIL import Image, ImageDraw

    sub = per_query.take(pa.array(rows, pa.int64())) if rows else per_query.slice(0, 0)
    qkeys = sub["key"].to_pylist()
    tops = sub["top_keys"].to_pylist()
    goods = sub["top_good"].to_pylist()
    firsts = sub["first_match_rank"].to_pylist()
    cols = 1 + max([len(t) for t in tops] + [10])
    images = thumbs.get(qkeys + [k for t in tops for k in t]) if thumbs is not None else {}
    cell_w, cell_h, label_h = THUMB_W + 2 * BORDER + 6, THUMB_H + 2 * BORDER, 14
    head = 20
    canvas = Image.new("RGB", (cols * cell_w + 10, head + max(1, len(rows)) * (cell_h + label_h) + 6), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "query | top-10 gallery (green: true match, red: other; junk removed)" if rows
              else "no query with a true match to show", fill="black")

    def cell(x, y, key, color):
        draw.rectangle([x, y, x + THUMB_W + 2 * BORDER - 1, y + THUMB_H + 2 * BORDER - 1], fill=color)
        img = images.get(key)
        if img is not None:
            canvas.paste(img.resize((THUMB_W, THUMB_H)), (x + BORDER, y + BORDER))
        else:
            draw.rectangle([x + BORDER, y + BORDER, x + BORDER + THUMB_W - 1, y + BORDER + THUMB_H - 1],
                           fill=(200, 200, 200))
            draw.text((x + BORDER + 2, y + BORDER + THUMB_H // 2), str(key)[-10:], fill="black")

    for r, (qk, top, good, first) in enumerate(zip(qkeys, tops, goods, firsts)):
        y = head + r * (cell_h + label_h)
        cell(5, y, qk, (40, 90, 220))
        draw.text((5, y + cell_h + 1), f"{str(qk)[-12:]} r={first}", fill="black")
        for c, (gk, ok) in enumerate(zip(top, good)):
            x = 5 + (c + 1) * cell_w
            cell(x, y, gk, (30, 170, 60) if ok else (210, 50, 50))
            draw.text((x, y + cell_h + 1), str(c + 1), fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- terminal

_ROWS = [("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"), ("rank20", "Rank-20"),
         ("mAP_official", "mAP (official, trapezoidal)"), ("mAP_standard", "mAP (standard)")]


def table(summary: dict) -> str:
    """The short terminal table of one run."""
    lines = [f"{'metric':<28} {'value':>8}"]
    lines += [f"{name:<28} {100 * summary[k]:>7.2f}%" for k, name in _ROWS if k in summary]
    lines.append(f"{'queries / gallery':<28} {summary.get('queries', 0):>8} / {summary.get('gallery', 0)}")
    return "\n".join(lines)


def load_metrics(run_dir: str) -> dict:
    """A run's metrics.json (a UserError naming the folder when it has none)."""
    store = Storage(run_dir)
    if not store.exists(METRICS):
        raise UserError(f"{run_dir} has no {METRICS} (not an evaluation run folder)")
    try:
        return json.loads(store.read_text(METRICS))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{run_dir}/{METRICS} is not valid JSON: {exc}") from None


def compare(run_a: str, run_b: str) -> str:
    """Two runs' metrics side by side, with B − A in points."""
    a, b = load_metrics(run_a)["metrics"], load_metrics(run_b)["metrics"]
    wa, wb = max(8, len(_short(run_a))), max(8, len(_short(run_b)))
    lines = [f"{'metric':<28} {_short(run_a):>{wa}} {_short(run_b):>{wb}} {'B-A':>8}"]
    for k, name in _ROWS:
        if k in a or k in b:
            va, vb = a.get(k), b.get(k)
            fa = f"{100 * va:.2f}" if va is not None else "-"
            fb = f"{100 * vb:.2f}" if vb is not None else "-"
            d = f"{100 * (vb - va):+.2f}" if va is not None and vb is not None else "-"
            lines.append(f"{name:<28} {fa:>{wa}} {fb:>{wb}} {d:>8}")
    qa, qb = f"{a.get('queries')}/{a.get('gallery')}", f"{b.get('queries')}/{b.get('gallery')}"
    lines.append(f"{'queries/gallery':<28} {qa:>{wa}} {qb:>{wb}}")
    return "\n".join(lines)


def _short(path: str) -> str:
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) if parts else str(path)
