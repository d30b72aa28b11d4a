"""Tensor-parallel slicing of unfused HF names (Megatron-style column and row parallel).

Column-parallel weights (q/k/v/gate/up, the vocab-parallel embedding and LM head) are
split along dim 0, row-parallel ones (o/down) along dim 1; everything else is
replicated on every TP rank. Rules are ``(pattern, dim or None)`` pairs, plain data a
receiver can publish, turned into a rule table here.
"""

from __future__ import annotations

from typing import Sequence

from ..meta import SourceParam
from .base import Piece
from .rules import Keep, RuleTable, Split

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
        # A name no pattern matches is replicated, as before the rule tables existed.
        self.table = RuleTable([(p, Keep() if d is None else Split(d)) for p, d in rules] + [(r"", Keep())],
                               what="hf_tp")

    def pieces(self, src: SourceParam) -> list[Piece]:
        return self.table.pieces(self, src)
