"""Sample keys: the tar member of an image is ``KEY.jpg``, so KEY must be safe for every reader.

webdataset and DALI split a member name at its first dot, and names over 100 bytes become PAX records
that DALI 2.4 cannot see (ANCHORS.md §0.2), so keys are dot-free ASCII of at most 64 characters.
A name that has to be changed to get there keeps a readable prefix and gains a hash of its source path,
so two different sources never share a key.
"""

from __future__ import annotations

import hashlib
import re

from ..release.constants import KEY_MAX_LEN

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_HASH_LEN = 10


def make_key(parts: tuple[str, ...], source_path: str) -> str:
    """Key for the image at ``source_path`` built from ``parts`` (e.g. folder and file stem) joined by '_'."""
    raw = "_".join(parts)
    safe = _UNSAFE.sub("_", raw)
    if safe == raw and len(safe) <= KEY_MAX_LEN:
        return safe
    digest = hashlib.sha1(source_path.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_LEN]
    return f"{safe[:KEY_MAX_LEN - _HASH_LEN - 1]}_{digest}"


def is_valid_key(key: str) -> bool:
    """True for a key every reader accepts."""
    return 0 < len(key) <= KEY_MAX_LEN and not _UNSAFE.search(key)
