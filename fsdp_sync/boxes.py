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
        if self.sizes and min(self.sizes) < 0:  # min, not a generator: plans build ~10^6 boxes
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

    def minus(self, other: "Box") -> list["Box"]:
        """Disjoint boxes that cover this box less ``other``: slabs peeled off dim by dim."""
        inter = self.intersect(other)
        if inter is None:
            return [] if self.is_empty() else [self]
        out, offsets, sizes = [], list(self.offsets), list(self.sizes)
        for d in range(self.ndim):
            lo, hi, ilo, ihi = offsets[d], offsets[d] + sizes[d], inter.offsets[d], inter.ends[d]
            for start, end in ((lo, ilo), (ihi, hi)):
                if end > start:
                    out.append(Box(tuple(offsets[:d] + [start] + offsets[d + 1:]),
                                   tuple(sizes[:d] + [end - start] + sizes[d + 1:])))
            offsets[d], sizes[d] = ilo, ihi - ilo
        return out

    def whole_blocks(self, block: Sequence[int], shape: Sequence[int]) -> "Box | None":
        """The largest part of this box made of whole blocks of a tensor of ``shape``.

        A block that the tensor's end cuts counts as whole. None if there is no such part.
        """
        offsets, sizes = [], []
        for o, n, b, full in zip(self.offsets, self.sizes, block, shape):
            start = -(-o // b) * b
            end = o + n if o + n == full else (o + n) // b * b
            if end <= start:
                return None
            offsets.append(start)
            sizes.append(end - start)
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
    a proof of exactly-once coverage. Plans check hundreds of thousands of tensors, so
    this works on plain tuples: boxes that are all row ranges (the common case) are
    proven by one sort of their row spans; any other set, and any set that fails, takes
    the general check, which also says why.
    """
    shape = tuple(int(n) for n in shape)
    if _rows_tile(boxes, shape):
        return None
    total, nonempty = 0, []
    for b in boxes:
        for o, size, n in zip(b.offsets, b.sizes, shape):
            if o < 0 or o + size > n:
                return f"{b} is outside the tensor bounds {shape}"
        numel = 1
        for size in b.sizes:
            numel *= size
        if numel:
            total += numel
            nonempty.append(b)
    if len(nonempty) > 1:
        why = _first_overlap(nonempty, shape)
        if why is not None:
            return why
    full = 1
    for n in shape:
        full *= n
    if total != full:
        return f"boxes cover {total} of {full} elements"
    return None


def _rows_tile(boxes: Sequence[Box], shape: tuple[int, ...]) -> bool:
    """Whether boxes spanning every dim but the first tile the rows of ``shape`` exactly once.

    Each box in bounds, the nonempty row spans disjoint once sorted, and their rows adding
    up to the tensor's: the general proof, for row ranges. False means "not proven here".
    """
    if not shape:
        return False
    tail, zeros, rows = shape[1:], (0,) * (len(shape) - 1), shape[0]
    spans = []
    for b in boxes:
        start, size = b.offsets[0], b.sizes[0]
        if b.sizes[1:] != tail or b.offsets[1:] != zeros or start < 0 or start + size > rows:
            return False
        if size:
            spans.append((start, size))
    spans.sort()
    end = 0
    for start, size in spans:
        if start < end:
            return False
        end = start + size
    return sum(size for _, size in spans) == rows


def _first_overlap(boxes: list[Box], shape: tuple[int, ...]) -> str | None:
    ordered = sorted(boxes, key=lambda b: b.offsets)
    if not shape:
        return f"{ordered[0]} and {ordered[1]} overlap"
    if all(b.sizes[1:] == shape[1:] for b in ordered):  # row ranges: neighbours must not overlap
        for a, b in zip(ordered, ordered[1:]):
            if b.offsets[0] < a.offsets[0] + a.sizes[0]:
                return f"{a} and {b} overlap"
        return None
    active: list[Box] = []  # sweep along dim 0
    for b in ordered:
        start = b.offsets[0]
        active = [a for a in active if a.offsets[0] + a.sizes[0] > start]
        for a in active:
            if a.intersect(b) is not None:
                return f"{a} and {b} overlap"
        active.append(b)
    return None
