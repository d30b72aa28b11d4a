"""Layouts for engines that serve fused, tensor- and expert-parallel weights: vLLM and SGLang.

Both engines name and slice the same way for the models covered here (Llama, Qwen2,
Qwen3, Qwen3-MoE, DeepSeek-V2/V3), with two differences: the fused MLA down-projection
(``fused_qkv_a_proj`` in vLLM, ``fused_qkv_a_proj_with_mqa`` in SGLang) and how MoE
ranks are laid out. The rules, as the engines' own loaders apply them:

* ``q/k/v_proj`` fuse into ``qkv_proj``: rank r holds its query heads, then its key and
  value heads. With fewer KV heads than TP ranks each rank holds one KV head, shared by
  ``tp_size / num_kv_heads`` consecutive ranks.
* ``gate/up_proj`` fuse into ``gate_up_proj`` (dense MLP and shared experts), each half a
  column-parallel slice; ``o_proj`` and ``down_proj`` are row-parallel.
* ``embed_tokens`` and ``lm_head`` are vocab-parallel: the vocabulary is padded to a
  multiple of 64 and split evenly; padding rows exist only on the engine and are
  declared ``unwritten``. Tied embeddings leave no ``lm_head`` on either side.
* MoE experts (transformers >= 5 stacks them as ``experts.gate_up_proj`` [E, 2I, H] and
  ``experts.down_proj`` [E, H, I]) land in ``w13_weight`` [E_local, 2 I_tp, H] and
  ``w2_weight`` [E_local, H, I_tp] (in vLLM >= 0.33 under ``experts.routed_experts``): a
  rank holds its experts (EP) and its slice of each expert's intermediate dim (TP inside
  experts). The router ``gate`` and its ``e_score_correction_bias`` are replicated.
* MLA (DeepSeek): ``q_a_proj`` and ``kv_a_proj_with_mqa`` fuse into one replicated
  tensor; ``q_b_proj`` and ``kv_b_proj`` are column-parallel by heads.

FP8 scales need no rule: the planner derives them from these pieces. The vLLM naming is
checked against vLLM 0.33.0 itself (tests/test_vllm_fixtures.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..boxes import Box
from ..meta import SourceParam
from .base import Piece
from .rules import Keep, Refuse, RuleTable, Split, even_part, slab, target

VOCAB_PADDING = 64  # vLLM's and SGLang's DEFAULT_VOCAB_PADDING_SIZE
# Engine parameters that no trainer tensor fills: adapters leave them out of registration,
# so they keep their loaded values. (The router's ``e_score_correction_bias`` is not one:
# it changes in training, transformers keeps it as a buffer, and senders sync it.)
ENGINE_ONLY: tuple[str, ...] = ()
# What the engine computes from other weights after loading, registered as parameters (vLLM
# 0.33 registers MLA's absorbed W_UK_T and W_UV): adapters leave them out of registration
# and re-derive them from the pushed weights at commit, as the engine's own reload does.
DERIVED = (r"\.W_UK_T$", r"\.W_UV$", r"\.W_UK_T_dcp_qrep$")
EXPERT_PLACEMENTS = ("linear", "round_robin")


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int, name: str) -> tuple[int, int]:
    """(first KV head, count) on a rank: a partition, or one replicated head when TP > heads."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"tensor {name!r}: num_key_value_heads {num_kv_heads} does not divide by "
                             f"tp_size {tp_size}")
        local = num_kv_heads // tp_size
        return tp_rank * local, local
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor {name!r}: tp_size {tp_size} is not a multiple of num_key_value_heads "
                         f"{num_kv_heads}, so KV heads cannot be replicated evenly")
    return tp_rank // (tp_size // num_kv_heads), 1


def expert_runs(experts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(first local index, first global expert, count) for each run of consecutive experts."""
    runs: list[list[int]] = []
    for local, e in enumerate(experts):
        if runs and runs[-1][1] + runs[-1][2] == e:
            runs[-1][2] += 1
        else:
            runs.append([local, e, 1])
    return [tuple(r) for r in runs]


@dataclass(frozen=True)
class QKV:
    """``q/k/v_proj`` (weight or bias) into the fused ``qkv_proj`` of this rank's heads."""

    dst: str

    def __call__(self, layout: "FusedLayout", match: re.Match, src: SourceParam) -> list[Piece]:
        part, rows = match["part"], src.shape[0]
        heads = layout.num_attention_heads if part == "q" else layout.num_key_value_heads
        if rows % heads:
            raise ValueError(f"tensor {src.name!r}: {rows} rows do not split into {heads} heads")
        head_dim = rows // heads
        q_start, q_local = even_part(src.name, layout.num_attention_heads, layout.tp_size, layout.tp_rank,
                                     what="num_attention_heads", by="tp_size")
        kv_start, kv_local = kv_head_range(layout.num_key_value_heads, layout.tp_size, layout.tp_rank, src.name)
        first, count, at = {"q": (q_start, q_local, 0), "k": (kv_start, kv_local, q_local),
                            "v": (kv_start, kv_local, q_local + kv_local)}[part]
        return [slab(src, target(self.dst, match, src), {0: (first * head_dim, count * head_dim, at * head_dim)})]


@dataclass(frozen=True)
class GateUp:
    """``gate/up_proj`` into ``gate_up_proj``: this rank's slice of each, gate first."""

    dst: str

    def __call__(self, layout: "FusedLayout", match: re.Match, src: SourceParam) -> list[Piece]:
        start, size = even_part(src.name, src.shape[0], layout.tp_size, layout.tp_rank, what="dim 0", by="tp_size")
        at = size if match["part"] == "up" else 0
        return [slab(src, target(self.dst, match, src), {0: (start, size, at)})]


@dataclass(frozen=True)
class QKVA:
    """MLA ``q_a_proj`` and ``kv_a_proj_with_mqa`` into one replicated tensor, q part first."""

    dst: str

    def __call__(self, layout: "FusedLayout", match: re.Match, src: SourceParam) -> list[Piece]:
        if match["part"] == "q_a_proj" and src.shape[0] != layout.q_lora_rank:
            raise ValueError(f"tensor {src.name!r} has {src.shape[0]} rows but q_lora_rank is {layout.q_lora_rank}")
        at = 0 if match["part"] == "q_a_proj" else layout.q_lora_rank
        return [slab(src, target(self.dst, match, src), {0: (0, src.shape[0], at)})]


@dataclass(frozen=True)
class VocabParallel:
    """This rank's rows of the padded vocabulary; rows past the real vocabulary stay unwritten."""

    def __call__(self, layout: "FusedLayout", match: re.Match, src: SourceParam) -> list[Piece]:
        if src.shape[0] != layout.vocab_size:
            raise ValueError(f"tensor {src.name!r} has {src.shape[0]} rows but the layout's vocab_size is "
                             f"{layout.vocab_size}")
        start, real, _ = layout.vocab_rows(src.name)
        return [slab(src, src.name, {0: (start, real, 0)})] if real else []


@dataclass(frozen=True)
class Experts:
    """Stacked experts [E, ...] into ``w13_weight`` or ``w2_weight``: this rank's experts and slice.

    ``gate_up`` sources are [E, 2I, H] with gate rows first, as in ``w13``; each half is
    sliced for TP inside experts. ``down`` sources are [E, H, I], sliced along I. The
    stacked tensors live in the layout's ``experts_module`` under the MoE block.
    """

    weight: str
    gate_up: bool

    def __call__(self, layout: "FusedLayout", match: re.Match, src: SourceParam) -> list[Piece]:
        if len(src.shape) != 3:
            raise ValueError(f"tensor {src.name!r} of shape {src.shape} is not stacked experts [E, out, in]")
        experts, moe_tp_rank, moe_tp_size = layout.moe_shard(src.name, src.shape[0])
        dim = 1 if self.gate_up else 2
        inter = src.shape[dim] // 2 if self.gate_up else src.shape[dim]
        start, size = even_part(src.name, inter, moe_tp_size, moe_tp_rank, what="expert intermediate size",
                                by="moe tp size")
        name = f"{match['p']}.{layout.experts_module}.{self.weight}"
        halves = (0, 1) if self.gate_up else (0,)
        return [slab(src, name, {0: (first, count, local), dim: (half * inter + start, size, half * size)})
                for local, first, count in expert_runs(experts) for half in halves]


# The name tables, first match wins. Vocab rows and the fused MLA name depend on keywords.
MOE_RULES = (
    (r"\.experts\.\d+\.(gate|up|down)_proj\.weight$",
     Refuse("per-expert 2-D weights cannot land in stacked w13/w2 experts; use a model with stacked experts "
            "(transformers >= 5: experts.gate_up_proj, experts.down_proj)")),
    (r"^(?P<p>.+)\.experts\.gate_up_proj$", Experts("w13_weight", gate_up=True)),
    (r"^(?P<p>.+)\.experts\.down_proj$", Experts("w2_weight", gate_up=False)),
    (r"\.mlp\.gate\.weight$", Keep()),  # the router: replicated, never fused
    (r"\.mlp\.gate\.e_score_correction_bias$", Keep()),  # a trainer buffer, an engine parameter
)
GQA_RULES = (
    (r"^(?P<p>.+)\.(?P<part>[qkv])_proj\.(?P<kind>weight|bias)$", QKV(r"\g<p>.qkv_proj.\g<kind>")),
    (r"\.o_proj\.weight$", Split(1)),
    (r"\.o_proj\.bias$", Keep()),
)
MLA_NO_Q_LORA_RULES = ((r"\.q_proj\.weight$", Split(0)), (r"\.kv_a_proj_with_mqa\.weight$", Keep()))
MLA_RULES = (
    (r"\.(q_b_proj|kv_b_proj)\.weight$", Split(0)),
    (r"\.o_proj\.weight$", Split(1)),
)
MLP_RULES = (  # dense MLPs and shared experts alike
    (r"^(?P<p>.+)\.(?P<part>gate|up)_proj\.(?P<kind>weight|bias)$", GateUp(r"\g<p>.gate_up_proj.\g<kind>")),
    (r"\.down_proj\.weight$", Split(1)),
    (r"\.down_proj\.bias$", Keep()),
    (r"norm\.weight$", Keep()),
)


class FusedLayout:
    """Shared by the engine layouts: the rule table, vocab padding and the parallel coordinates.

    Every keyword is plain data (receivers publish it); ``layout_kwargs(config, ...)``
    builds them from a transformers config. ``q_lora_rank`` is set for MLA models.
    """

    engine = "?"
    fused_qkv_a = "fused_qkv_a_proj"
    experts_module = "experts"  # where the stacked w13/w2 live, under the MoE block

    def __init__(self, *, tp_rank: int, tp_size: int, hidden_size: int, vocab_size: int,
                 num_attention_heads: int, num_key_value_heads: int, tie_word_embeddings: bool = False,
                 mla: bool = False, q_lora_rank: int | None = None, vocab_padding: int = VOCAB_PADDING,
                 embed_name: str = "model.embed_tokens.weight", lm_head_name: str = "lm_head.weight"):
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.hidden_size, self.vocab_size, self.vocab_padding = hidden_size, vocab_size, vocab_padding
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.tie_word_embeddings, self.q_lora_rank = tie_word_embeddings, q_lora_rank
        self.embed_name, self.lm_head_name = embed_name, lm_head_name
        self.table = RuleTable(self._rules(mla), what=self.engine)

    def _rules(self, mla: bool) -> list[tuple[str, Any]]:
        head = (Refuse("the engine ties lm_head to embed_tokens, but the trainer has its own lm_head; "
                       "tie them on both sides or neither") if self.tie_word_embeddings else VocabParallel())
        vocab = [(f"^{re.escape(self.embed_name)}$", VocabParallel()), (f"^{re.escape(self.lm_head_name)}$", head)]
        if not mla:
            attention = GQA_RULES
        elif self.q_lora_rank is not None:
            attention = ((r"^(?P<p>.+)\.(?P<part>q_a_proj|kv_a_proj_with_mqa)\.weight$",
                          QKVA(rf"\g<p>.{self.fused_qkv_a}.weight")),) + MLA_RULES
        else:
            attention = MLA_NO_Q_LORA_RULES + MLA_RULES
        return vocab + list(MOE_RULES + attention + MLP_RULES)

    def pieces(self, src: SourceParam) -> list[Piece]:
        return self.table.pieces(self, src)

    def vocab_rows(self, name: str) -> tuple[int, int, int]:
        """(first row, real rows, padded rows) of this rank's vocabulary shard."""
        padded = -(-self.vocab_size // self.vocab_padding) * self.vocab_padding
        start, per = even_part(name, padded, self.tp_size, self.tp_rank, what="padded vocabulary",
                               by="tp_size")
        return start, max(0, min(per, self.vocab_size - start)), per

    def unwritten(self) -> dict[str, list[Box]]:
        """The padding rows of the vocab-parallel tensors: the engine's, never written."""
        _, real, per = self.vocab_rows(self.embed_name)
        if real == per:
            return {}
        box = Box((real, 0), (per - real, self.hidden_size))
        names = [self.embed_name] + ([] if self.tie_word_embeddings else [self.lm_head_name])
        return {n: [box] for n in names}

    def moe_shard(self, name: str, num_experts: int) -> tuple[tuple[int, ...], int, int]:
        """(global experts in local order, TP rank inside experts, TP size inside experts)."""
        raise NotImplementedError


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``0.33.0`` or ``0.33.0rc1+cu130``."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"cannot read a version from {version!r}")
    return int(m[1]), int(m[2])


class VllmLayout(FusedLayout):
    """vLLM's naming. MoE ranks span DP x TP: with ``expert_parallel`` they split the
    experts (``linear`` or ``round_robin``, as ``--expert-placement-strategy``), otherwise
    every rank holds every expert and a 1/(DP x TP) slice of its intermediate dim.

    ``vllm_version`` selects the naming: 0.33 keeps stacked experts in the MoE block's
    ``experts.routed_experts`` module (checked against real vLLM 0.33.0); older versions
    (as the layout was first written, against 2026 main before 0.33) in ``experts``."""

    engine = "vllm"
    ROUTED_EXPERTS_SINCE = (0, 33)

    def __init__(self, *, dp_rank: int = 0, dp_size: int = 1, expert_parallel: bool = False,
                 expert_placement: str = "linear", vllm_version: str = "0.33.0", **kwargs: Any):
        if expert_placement not in EXPERT_PLACEMENTS:
            raise ValueError(f"expert_placement={expert_placement!r} is not one of {list(EXPERT_PLACEMENTS)}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.expert_parallel, self.expert_placement = expert_parallel, expert_placement
        routed = version_tuple(vllm_version) >= self.ROUTED_EXPERTS_SINCE
        self.experts_module = "experts.routed_experts" if routed else "experts"
        super().__init__(**kwargs)

    def moe_shard(self, name: str, num_experts: int) -> tuple[tuple[int, ...], int, int]:
        size, rank = self.dp_size * self.tp_size, self.dp_rank * self.tp_size + self.tp_rank
        if not self.expert_parallel or size == 1:
            return tuple(range(num_experts)), rank, size
        if self.expert_placement == "round_robin":
            return tuple(range(rank, num_experts, size)), 0, 1
        base, extra = divmod(num_experts, size)  # the first `extra` ranks hold one more expert
        first = rank * base + min(rank, extra)
        return tuple(range(first, first + base + (rank < extra))), 0, 1


class SGLangLayout(FusedLayout):
    """SGLang's naming. MoE ranks live inside the TP group: ``ep_size`` of them split the
    experts contiguously and ``tp_size / ep_size`` split each expert's intermediate dim."""

    engine = "sglang"
    fused_qkv_a = "fused_qkv_a_proj_with_mqa"

    def __init__(self, *, ep_size: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        if self.tp_size % ep_size:
            raise ValueError(f"tp_size {self.tp_size} is not a multiple of ep_size {ep_size}")
        self.ep_size = ep_size

    def moe_shard(self, name: str, num_experts: int) -> tuple[tuple[int, ...], int, int]:
        moe_tp_size = self.tp_size // self.ep_size
        ep_rank = self.tp_rank // moe_tp_size
        first, count = even_part(name, num_experts, self.ep_size, ep_rank, what="number of experts", by="ep_size")
        return tuple(range(first, first + count)), self.tp_rank % moe_tp_size, moe_tp_size


def layout_kwargs(config: Any, **parallel: Any) -> dict[str, Any]:
    """Plain-data keywords for ``vllm``/``sglang`` layouts from a transformers config.

    ``parallel`` carries the rank coordinates (``tp_rank``, ``tp_size`` and the engine's
    MoE keywords); ``tie_word_embeddings`` may be overridden there too.
    """
    heads = config.num_attention_heads
    mla = getattr(config, "kv_lora_rank", None) is not None
    out = dict(hidden_size=config.hidden_size, vocab_size=config.vocab_size, num_attention_heads=heads,
               num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
               tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)), mla=mla,
               q_lora_rank=getattr(config, "q_lora_rank", None) if mla else None)
    out.update(parallel)
    return out
