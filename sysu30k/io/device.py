"""The one rule that turns a ``--device`` value into a torch device, for training, evaluation and clustering."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..options import opt

if TYPE_CHECKING:
    import torch


def device_field(help: str = "auto (this process's GPU when there is one, else the CPU), cpu, cuda, cuda:N.") -> Any:
    """The ``--device`` field of every command that computes with torch."""
    return opt("auto", help)


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto``/None: the GPU of this rank (``LOCAL_RANK`` under torchrun) when there is one, else the CPU;
    ``cuda`` without an index also means this rank's GPU, so ranks never share ``cuda:0`` by accident.
    Raises UserError for a device that is not a device or a GPU that is not there."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"--device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no GPU is available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def distributed() -> tuple[int, int, int]:
    """(rank, world, local rank), starting the process group when torchrun launched us (NCCL with GPUs,
    gloo without)."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))
