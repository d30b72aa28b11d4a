"""Tensor-parallel slicing of unfused HF names (Megatron-style column and row parallel).

Column-parallel weights (q/k/v/gate/up, the vocab-parallel embedding and LM head) are
split along dim 0, row-parallel ones (o/down) along dim 1; the names every TP rank keeps
whole (norms, row-parallel biases, routers, experts, MLA's projections) are listed, and a
name neither list matches is refused: silently replicating an unknown weight could hand
each rank a tensor its engine expects sliced. Rules are ``(pattern, dim or None)`` pairs,
plain data a receiver can publish, turned into a rule table here.
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
)
# Kept whole on every TP rank; ``replicated=`` adds patterns of a model's own.
REPLICATED: tuple[str, ...] = (
    r"norm\.weight$",  # every *norm / *layernorm
    r"\.bias$",  # biases of row-parallel layers (column-parallel ones are split above)
    r"\.mlp\.gate\.(weight|e_score_correction_bias)$",  # MoE routers
    r"\.mlp\.(shared_)?experts?\.",  # hf_tp has no expert parallelism: experts stay whole
    r"\.self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)\.weight$",  # MLA
)


class TensorParallelLayout:
    """Rank ``tp_rank`` of ``tp_size`` holds an even slice of each split parameter."""

    def __init__(self, *, tp_rank: int, tp_size: int, rules: Sequence[tuple[str, int | None]] = LLAMA_TP_RULES,
                 replicated: Sequence[str] = ()):
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        kept = [(p, Keep()) for p in (*REPLICATED, *replicated)]
        self.table = RuleTable([(p, Keep() if d is None else Split(d)) for p, d in rules] + kept, what="hf_tp")

    def pieces(self, src: SourceParam) -> list[Piece]:
        try:
            return self.table.pieces(self, src)
        except ValueError as e:
            if "matches no rule" not in str(e):
                raise
            raise ValueError(f"{e}: hf_tp splits q/k/v/o/gate/up/down projections, embeddings and lm_head, and "
                             f"keeps norms, biases, routers, experts and MLA projections whole; add a pattern for "
                             f"it to layout_kwargs['replicated'] to keep it whole on every TP rank, or a "
                             f"(pattern, dim) to layout_kwargs['rules'] to split it") from None
