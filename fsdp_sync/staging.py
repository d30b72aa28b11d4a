"""Staged FP8 payloads in slots that outlive a push, so that a staged bucket replays its launches.

A two-sided transport (gloo, nccl, rdma), or a destination the kernels cannot store into,
sends each FP8 task from a payload the packer fills. With a fresh buffer per push such a
bucket was packed afresh every time (Python per task: ~95 us a quantize task on the H200
host), since a recorded launch holds its addresses. Here each such payload has a fixed
place in one of ``count`` slots, bucket by bucket in the pipeline's order (the i-th bucket
in slot i mod count), so its address stays and the packer records the bucket as it does a
direct one.

Why a slot is never refilled while it is read: the pipeline holds at most ``count``
buckets between the start of their packing and the end of their transfer
(``run_pipeline(slots=...)``), and every transport's ``send`` returns only once it has
read its payloads. Pushes do not overlap on a sender. The slots cost ``count`` times the
largest bucket's staged FP8 bytes, padded (buckets are at most half the watermark, but for
a parameter larger than that, alone in its bucket), held as long as the packer (the plan
and transport) lives.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .plan import Bucket, Task
from .quant import FP8_DTYPE

ALIGN = 256  # bytes between payloads: 16-byte aligned, as the kernels' 16-byte accesses need


class StagingSlots:
    """Where each staged FP8 payload of a plan lives: fixed per plan, in ``count`` slots."""

    def __init__(self, buckets: Sequence[Bucket], tasks_of: dict[int, list[Task]], staged: Callable[[Task], bool],
                 device: torch.device, *, count: int = 2):
        """``buckets`` in the order the pipeline packs them; ``staged(task)``: whether the
        task's FP8 goes into a payload (not straight into its destination)."""
        if count < 1:
            raise ValueError(f"StagingSlots needs at least one slot, got {count}")
        self.count = count
        self._slot_of = {b.index: i % count for i, b in enumerate(buckets)}
        self._offset: dict[int, int] = {}  # id(task) -> byte offset in its bucket's slot
        capacity = 0
        for b in buckets:
            at = 0
            for task in tasks_of.get(b.index, ()):
                if staged(task):
                    self._offset[id(task)] = at
                    at += -(-task.src_box.numel() // ALIGN) * ALIGN  # FP8: a byte an element
            capacity = max(capacity, at)
        self.capacity = capacity
        self._buffer = torch.empty((count, capacity), dtype=torch.uint8, device=device) if capacity else None

    @property
    def nbytes(self) -> int:
        """Bytes the slots hold."""
        return self.count * self.capacity

    def target(self, task: Task, shape: Sequence[int]) -> torch.Tensor | None:
        """The task's FP8 payload of ``shape``, in its bucket's slot; None if it has no place."""
        offset = self._offset.get(id(task))
        if offset is None or self._buffer is None:
            return None
        n = math.prod(shape)
        return self._buffer[self._slot_of[task.bucket], offset:offset + n].view(FP8_DTYPE).view(tuple(shape))
