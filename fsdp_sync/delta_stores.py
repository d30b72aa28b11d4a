"""Delta push on one-sided transports, inside the packer: the shadows its launches compare with.

Where grouped kernels store straight into the receivers' buffers (``cuda_ipc``, ``shm``),
the change is best found where the bytes are made: the FP8 cell launch and the grouped copy
launch load each task's shadow (the bytes the receiver holds) beside what they are about
to store, and store only the elements that differ, into the destination and the shadow
(``fsdp_sync.kernels.fp8_grouped``, ``fsdp_sync.kernels.delta``). Nothing is staged,
compacted or synced per task: the launches add their counts into ``changed`` (a row per
element size), read once at the push's end. Scale grids are stored whole and copied into
their shadows too, so that verification can digest every task.

An anchor (the first push of these shadows, or one the controller announces in full)
sets ``anchor`` and the same launches store every element: recorded once, they replay
either way.
"""

from __future__ import annotations

import torch

from .delta import digest, empty_shadow
from .plan import Task

ITEMSIZES = (1, 2, 4, 8)  # the rows of ``changed``
SPREAD = 64  # words per row: each program adds into one, so that atomics do not queue on one address


class DeltaStores:
    """The shadows of the tasks one packer stores itself, and the current push's counts."""

    def __init__(self, device: torch.device, *, pinned: bool = False):
        """``pinned``: shadows in pinned host memory, which the launches address over PCIe."""
        self.device = device
        self.pinned = pinned and device.type == "cuda"
        self.anchor = torch.ones(1, dtype=torch.int32, device=device)
        self.changed = torch.zeros(len(ITEMSIZES), SPREAD, dtype=torch.int64, device=device)
        self._itemsizes = torch.tensor(ITEMSIZES, dtype=torch.int64, device=device)
        self._shadows: dict[int, tuple[Task, torch.Tensor]] = {}
        self._anchored = False  # a push through these shadows has completed
        self._whole = [0, 0]  # this push: bytes, and weight elements, stored whole

    @property
    def shadow_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for _, s in self._shadows.values())

    def begin(self, delta: bool) -> bool:
        """Reset the counts before a push's first launch, on the stream that packs; returns
        whether this push stores everything (not a delta, or no complete push yet)."""
        full = not (delta and self._anchored)
        self.anchor.fill_(int(full))
        self.changed.zero_()
        self._whole = [0, 0]
        return full

    def target(self, itemsize: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the counters, the anchor flag) that a launch storing ``itemsize``-byte elements takes."""
        return self.changed[ITEMSIZES.index(itemsize)], self.anchor

    def shadow(self, task: Task, like: torch.Tensor) -> torch.Tensor:
        """``task``'s shadow: contiguous, of ``like``'s shape and dtype, made on first use
        (its bytes are unset until an anchor stores them all)."""
        hit = self._shadows.get(id(task))
        if hit is None:
            hit = self._shadows[id(task)] = (task, empty_shadow(like.shape, like.dtype, self.device, self.pinned))
        return hit[1]

    def whole(self, nbytes: int, elements: int) -> None:
        """Count bytes stored whole this push (``elements`` of them weight elements)."""
        self._whole[0] += nbytes
        self._whole[1] += elements

    def end(self) -> tuple[int, int]:
        """(bytes stored, weight elements stored) by this push, after its last launch, on the
        same stream: one read of the counters."""
        per_size = self.changed.sum(1)
        counted = torch.stack([(per_size * self._itemsizes).sum(), per_size.sum()]).tolist()
        self._anchored = True
        return counted[0] + self._whole[0], counted[1] + self._whole[1]

    def digests(self) -> dict[str, int]:
        """Each stored task's digest of what it now holds, keyed as the receivers check them."""
        return {f"{task.receiver}/{task.seq}": digest(shadow) for task, shadow in self._shadows.values()}
