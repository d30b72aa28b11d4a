"""Tensor-parallel slicing of unfused HF names (Megatron-style column and row parallel).

Column-parallel weights (q/k/v/gate/up, the vocab-parallel embedding and LM head) are
split along dim 0, row-parallel ones (o/down) along dim 1; everything else is
replicated on every TP rank.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..boxes import Box
from ..meta import SourceParam
from .base import Piece

# (pattern, dim to split or None to replicate); the first match wins.
LLAMA_TP_RULES: tuple[tuple[str, int | None], ...] = (
    (r"\.(q|k|v|gate|up)_proj\.(weight|bias)$", 0),
    (r"\.(o|down)_proj\.weight$", 1),
    (r"embed_tokens\.weight$", 0),
    (r"lm_head\.weight$", 0),
    (r".*", None),
)


class TensorParallelLayout:
    """Rank ``tp_rank`` of ``tp_size`` holds an even slice of each split parameter."""

    def __init__(self, *, tp_rank: int, tp_size: int, rules: Sequence[tuple[str, int | None]] = LLAMA_TP_RULES):
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.rules = [(re.compile(p), d) for p, d in rules]

    def split_dim(self, name: str) -> int | None:
        for pattern, dim in self.rules:
            if pattern.search(name):
                return dim
        return None

    def pieces(self, src: SourceParam) -> list[Piece]:
        dim = self.split_dim(src.name)
        full = Box.full(src.shape)
        if dim is None or self.tp_size == 1:
            return [Piece(src.name, full, src.name, full)]
        if dim >= len(src.shape):
            raise ValueError(f"tensor {src.name!r} of shape {src.shape} has no dim {dim} to split for TP")
        size = src.shape[dim]
        if size % self.tp_size:
            raise ValueError(
                f"tensor {src.name!r}: dim {dim} of size {size} does not divide by tp_size {self.tp_size}"
            )
        part = size // self.tp_size
        offsets = [0] * len(src.shape)
        sizes = list(src.shape)
        offsets[dim] = self.tp_rank * part
        sizes[dim] = part
        src_box = Box(tuple(offsets), tuple(sizes))
        return [Piece(src.name, src_box, src.name, Box.full(tuple(sizes)))]
