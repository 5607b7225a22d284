"""``KEY.json``, the labels packed beside each ``KEY.jpg``, so a shard describes itself to webdataset, Hugging
Face ``datasets`` and DALI users who never read our manifests (which stay the source of truth).

Every sample has the same five fields, null where they do not apply (a training image has a folder, a
test image a pid and camid), so columnar readers infer one schema from any shard. The bytes are canonical
JSON (sorted keys, no spaces), so the same labels always give the same shard bytes, and the verifier
rebuilds them from the manifest.
"""

from __future__ import annotations

import json

LABEL_EXT = "json"


def label_bytes(subset: str, folder: int | None, pid: int | None, camid: int | None, distractor: bool) -> bytes:
    """The content of ``KEY.json`` for one image."""
    return _FORMAT.format(_value(camid), "true" if distractor else "false", _value(folder), _value(pid),
                          json.dumps(subset)).encode("ascii")


_FORMAT = '{{"camid":{},"distractor":{},"folder":{},"pid":{},"subset":{}}}'   # json.dumps(sort_keys, no spaces)


def _value(number: int | None) -> str:
    return "null" if number is None else str(int(number))
