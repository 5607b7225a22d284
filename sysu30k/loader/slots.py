"""Batch buffers in shared memory, reused from batch to batch instead of allocated afresh.

A DataLoader worker that returns a new tensor has it copied into fresh shared memory, and every page of
that memory is faulted in and zeroed by the kernel: on this project's 2-core VMs that costs as much as
decoding the batch (a float32 256×128 batch of 180 is 70 MB). Here each worker owns a few slots created
once per iteration; it writes a batch into a free slot and sends only the slot's number. The main process
hands out a tensor over the slot and marks the slot free again when the last tensor using it is garbage-
collected. A worker that finds no free slot (the consumer keeps old batches) allocates fresh memory
instead, so nobody ever waits on the consumer and a batch is never overwritten while it is referenced.
The slots of one iteration share one segment: a batch kept after its epoch keeps that segment alive.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch


class SlotPool:
    """``per_worker`` buffers of ``shape`` for each of ``workers`` DataLoader workers, in shared memory."""

    def __init__(self, workers: int, per_worker: int, shape: tuple[int, ...], dtype: torch.dtype):
        n = workers * per_worker
        nbytes = n * int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        # a new shared segment, not a copy of private memory into one (what Tensor.share_memory_ does);
        # its pages are faulted in by the worker that first writes them
        storage = torch.UntypedStorage._new_shared(nbytes)
        self.buffers = torch.empty(0, dtype=dtype).set_(storage).view(n, *shape)
        self.busy = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self.per_worker = per_worker

    def acquire(self, worker: int) -> int | None:
        """A free slot of ``worker``, now marked busy; None when all of them are still referenced."""
        busy = self.busy.numpy()
        for slot in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            if not busy[slot]:
                busy[slot] = 1
                return slot
        return None

    def hand_out(self, slot: int) -> torch.Tensor:
        """The batch in ``slot`` as a tensor (main process); the slot is freed with the tensor's storage."""
        owner = self.buffers[slot].numpy()           # a new array object: the storage below holds it alone
        weakref.finalize(owner, self.busy.numpy().__setitem__, slot, 0)
        return torch.from_numpy(owner)
