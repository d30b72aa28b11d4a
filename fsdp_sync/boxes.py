"""Box algebra: every ownership and mapping question in fsdp_sync is a question about boxes.

A box is an N-d rectangle of a tensor, an offset and a size per dim. Sender shards,
receiver slices, FP8 scale blocks and transfer tasks are all boxes, so one small set
of operations (intersect, shift, block-align) answers every planning question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True, slots=True)
class Box:
    """An N-d rectangle: ``offsets[d] <= i < offsets[d] + sizes[d]`` in every dim ``d``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.sizes):
            raise ValueError(f"box offsets {self.offsets} and sizes {self.sizes} differ in rank")
        if any(s < 0 for s in self.sizes):
            raise ValueError(f"box sizes must be >= 0, got {self.sizes}")

    @staticmethod
    def full(shape: Sequence[int]) -> "Box":
        return Box((0,) * len(shape), tuple(int(s) for s in shape))

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n

    def is_empty(self) -> bool:
        return any(s == 0 for s in self.sizes)

    def intersect(self, other: "Box") -> "Box | None":
        """The common part of two boxes, or None when they share no element."""
        offsets, sizes = [], []
        for o1, s1, o2, s2 in zip(self.offsets, self.sizes, other.offsets, other.sizes):
            lo, hi = max(o1, o2), min(o1 + s1, o2 + s2)
            if hi <= lo:
                return None
            offsets.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offsets), tuple(sizes))

    def contains(self, other: "Box") -> bool:
        return all(
            o1 <= o2 and o2 + s2 <= o1 + s1
            for o1, s1, o2, s2 in zip(self.offsets, self.sizes, other.offsets, other.sizes)
        )

    def shift(self, delta: Sequence[int]) -> "Box":
        """The same box with ``delta`` added to its offsets (negative moves it towards 0)."""
        return Box(tuple(o + d for o, d in zip(self.offsets, delta)), self.sizes)

    def relative_to(self, origin: "Box") -> "Box":
        """This box in the coordinates of ``origin`` (whose first element becomes 0)."""
        return self.shift(tuple(-o for o in origin.offsets))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` this box covers (a view, no copy)."""
        return tensor[self.slices()]

    def to_blocks(self, block: Sequence[int]) -> "Box":
        """The box of block indices that this box touches (blocks of shape ``block``)."""
        offsets, sizes = [], []
        for o, s, b in zip(self.offsets, self.sizes, block):
            first = o // b
            last = -(-(o + s) // b)
            offsets.append(first)
            sizes.append(max(0, last - first))
        return Box(tuple(offsets), tuple(sizes))

    def owned_blocks(self, piece: "Box", block: Sequence[int]) -> "Box":
        """The blocks of ``piece`` whose first element inside ``piece`` lies in this box.

        ``self`` must be a part of ``piece``. Every block touched by ``piece`` has exactly
        one such first element, so splitting a piece into disjoint parts splits its
        scale grid into disjoint boxes too: that is how each scale gets one writer.
        """
        offsets, sizes = [], []
        for o, e, po, pe, b in zip(self.offsets, self.ends, piece.offsets, piece.ends, block):
            lo = po // b if o == po else -(-o // b)
            hi = -(-pe // b) if e == pe else -(-e // b)
            offsets.append(lo)
            sizes.append(max(0, hi - lo))
        return Box(tuple(offsets), tuple(sizes))

    def __repr__(self) -> str:
        dims = ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes))
        return f"Box[{dims}]"


def check_exact_cover(boxes: Sequence[Box], shape: Sequence[int]) -> str | None:
    """Why ``boxes`` fail to cover ``shape`` exactly once, or None when they do.

    In-bounds plus pairwise disjoint plus total volume equal to the tensor's volume is
    a proof of exactly-once coverage.
    """
    full = Box.full(shape)
    total = 0
    for b in boxes:
        if not full.contains(b):
            return f"{b} is outside the tensor bounds {tuple(shape)}"
        total += b.numel()
    # Sweep along dim 0 so the disjointness check stays near-linear for many boxes.
    ordered = sorted((b for b in boxes if not b.is_empty()), key=lambda b: b.offsets)
    active: list[Box] = []
    for b in ordered:
        start = b.offsets[0] if b.ndim else 0
        active = [a for a in active if (a.ends[0] if a.ndim else 1) > start]
        for a in active:
            if a.intersect(b) is not None:
                return f"{a} and {b} overlap"
        active.append(b)
    if total != full.numel():
        return f"boxes cover {total} of {full.numel()} elements"
    return None
