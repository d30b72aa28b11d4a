"""Delta push, decided once per plan: what each task's change looks like on the wire.

Pure: tasks in, per-task programs out, no tensors moved. The executor (``fsdp_sync.delta``)
only counts changed elements and picks among the encodings sized here.

A task's payload is its destination box in row-major order. A change is encoded as:

* ``DENSE``: the whole payload (what a full push sends);
* ``POSITIONS``: the flat indices of changed elements, then their values;
* ``BITMAP``: one bit per element (little-endian within a byte), padded to whole 8-byte
  words so the values after it stay aligned for their dtype, then the changed values.

Two-sided transports send a 16-byte header (encoding, count) before each body. One-sided
transports store the changed elements straight into the destination; scale grids go whole
(almost every block's amax moves each step, and they are small).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import DATA, Task

DENSE, POSITIONS, BITMAP = 0, 1, 2
ENCODINGS = (DENSE, POSITIONS, BITMAP)
HEADER_BYTES = 16  # two int64: encoding, number of changed elements
# Transports by how a delta reaches the destination; the others always push in full.
DELTA_KINDS = {"shm": "one_sided", "cuda_ipc": "one_sided", "gloo": "two_sided"}
BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # compare bits, not values


@dataclass(frozen=True, slots=True)
class DeltaProgram:
    """How one task's change is found and encoded."""

    numel: int
    itemsize: int
    index_dtype: torch.dtype  # of POSITIONS indices
    dense: bool  # always sent whole (scale grids on one-sided transports)

    @property
    def bits_dtype(self) -> torch.dtype:
        return BITS_DTYPES[self.itemsize]

    @property
    def bitmap_nbytes(self) -> int:
        return (self.numel + 63) // 64 * 8

    def body_nbytes(self, encoding: int, count: int) -> int:
        """Bytes of the encoded body with ``count`` changed elements."""
        if encoding == DENSE:
            return self.numel * self.itemsize
        if encoding == POSITIONS:
            return count * (self.index_dtype.itemsize + self.itemsize)
        if encoding == BITMAP:
            return self.bitmap_nbytes + count * self.itemsize
        raise ValueError(f"unknown delta encoding {encoding!r}, not one of {list(ENCODINGS)}")

    def choose(self, count: int, mode: str) -> int:
        """The encoding a two-sided push sends: the smaller of positions and bitmap, and under
        ``auto`` dense where neither is smaller than the payload itself."""
        sparse = min((POSITIONS, BITMAP), key=lambda e: self.body_nbytes(e, count))
        if self.dense or (mode == "auto" and self.body_nbytes(DENSE, 0) <= self.body_nbytes(sparse, count)):
            return DENSE
        return sparse


def lower(tasks: list[Task], *, one_sided: bool) -> list[DeltaProgram]:
    """One program per task, in order: element size and count from the plan's byte sizes."""
    programs = []
    for t in tasks:
        numel = t.dst_box.numel()
        assert numel == t.src_box.numel() and (numel == 0 or t.nbytes % numel == 0), f"task {t.src!r} -> {t.dst!r}"
        itemsize = t.nbytes // numel if numel else 1
        index = torch.int32 if numel < 2**31 else torch.int64
        programs.append(DeltaProgram(numel, itemsize, index, dense=one_sided and t.kind != DATA))
    return programs
