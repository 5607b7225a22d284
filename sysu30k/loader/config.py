"""The loader's choices that the command line offers (light to import: no torch)."""

from __future__ import annotations

from typing import Any

from ..options import opt

DECODERS = ("auto", "pil", "dali")


def decoder_field() -> Any:
    """The ``--decoder`` field of every command that reads images through the loader."""
    return opt("auto", "auto: DALI when it can decode on a GPU, else Pillow-SIMD; pil; dali.", choices=DECODERS)
