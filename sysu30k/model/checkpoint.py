"""Checkpoints: plain tensors and Python containers only, so they load with ``weights_only=True``.

A checkpoint carries its run's config (to rebuild the model and to refuse resuming with other settings),
the model, optimiser and schedule states, the loader position and the RNG state. Writes are atomic: a
killed process leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import UserError


def save(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint without unpickling arbitrary objects."""
    try:
        with warnings.catch_warnings():          # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors and plain data: refused (checkpoints are "
                        "loaded with weights_only=True, never unpickled)") from None
    except Exception as exc:                  # a damaged or foreign file fails in the unpickler in many ways
        reason = (str(exc).splitlines() or [type(exc).__name__])[0] or type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint: {reason}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint (a {type(state).__name__}, not a dict of tensors)")
    return state
