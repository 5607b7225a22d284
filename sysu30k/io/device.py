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


def distributed(device: str | None = "auto") -> tuple[int, int, int]:
    """(rank, world, local rank), starting the process group when torchrun launched us: NCCL, bound to this
    rank's GPU, when ``device`` resolves to a GPU; gloo for CPU ranks."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            import torch

            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return int(os.environ.get("RANK", "0")), world, local_rank


WAIT_HOURS = 24        # how long the other ranks wait while rank 0 validates and writes checkpoints
_CONTROL = None


def _control_group():
    """The gloo group with a ``WAIT_HOURS`` timeout for control traffic; None in one process."""
    import datetime

    import torch.distributed as dist

    global _CONTROL
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=WAIT_HOURS))
    return _CONTROL


def wait_for_rank0() -> None:
    """Every rank meets here after rank 0's validation and checkpoints: a barrier on a gloo group with a
    ``WAIT_HOURS`` timeout, so no NCCL collective is in flight while they wait and NCCL's watchdog (10
    minutes by default) cannot kill a long validation. A no-op in one process."""
    import torch.distributed as dist

    group = _control_group()
    if group is not None:
        dist.barrier(group=group)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a CPU all-reduce on the control group), so ranks that
    saw a signal at different steps still stop together; ``flag`` itself in one process."""
    import torch
    import torch.distributed as dist

    group = _control_group()
    if group is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
