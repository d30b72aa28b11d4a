"""Engine layouts (vllm, sglang, hf_tp) against the engines' own parameter sets, on CPU.

vLLM and SGLang cannot be installed here (they pull CUDA builds). ``vllm_params`` and
``sglang_params`` restate, from reading their model code (versions in docs/layouts.md),
which parameters one rank holds after loading, with shapes and dtypes. The real planner
then proves, for published model configs at TP 1/2/4/8 and EP, that the layout fills
exactly that set, every element once. Tiny real models check the numbers: un-fusing and
gathering the filled engine tensors the way the engines read them gives back the HF
tensors bit for bit, unquantized and FP8.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch.distributed.tensor import Shard
from transformers import (AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

from fsdp_sync import wire
from fsdp_sync.boxes import Box
from fsdp_sync.config import DEFAULT_SYNC_BUFFERS, LinkModel
from fsdp_sync.destinations import expected_destinations
from fsdp_sync.errors import PlanError
from fsdp_sync.layouts import make_layout
from fsdp_sync.layouts.vllm import ENGINE_ONLY, layout_kwargs
from fsdp_sync.meta import DestTensor, LayoutSpec, ReceiverMeta, SourceParam
from fsdp_sync.planner import build_plan
from fsdp_sync.quant import DEFAULT_QUANT_SKIP, reference_quantize, scale_name, should_quantize
from fsdp_sync.sharding import shard_groups

BF16, FP8, F32 = torch.bfloat16, torch.float8_e4m3fn, torch.float32
QUANT_SKIP = DEFAULT_QUANT_SKIP + (r"\.mlp\.gate\.weight$",)  # engines keep routers in bf16
NUM_SENDERS = 8

# Published dimensions; only the number of layers is cut (DeepSeek-V3 keeps 3 dense + 1 MoE).
CONFIGS = {
    "llama3-8b": lambda: LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                     num_key_value_heads=8, vocab_size=128256, num_hidden_layers=2,
                                     rope_theta=500000.0, tie_word_embeddings=False),
    "qwen2.5-7b": lambda: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                      num_key_value_heads=4, vocab_size=152064, num_hidden_layers=2,
                                      tie_word_embeddings=False),
    "qwen3-8b": lambda: Qwen3Config(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                                    num_key_value_heads=8, head_dim=128, vocab_size=151936, num_hidden_layers=2,
                                    tie_word_embeddings=False),
    "qwen3-30b-a3b": lambda: Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                            num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                            num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                                            num_hidden_layers=2, decoder_sparse_step=1, mlp_only_layers=[],
                                            tie_word_embeddings=False),
    "deepseek-v3": lambda: DeepseekV3Config(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                            num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
                                            n_shared_experts=1, num_experts_per_tok=8, q_lora_rank=1536,
                                            kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                            v_head_dim=128, vocab_size=129280, first_k_dense_replace=3,
                                            num_hidden_layers=4, n_group=8, topk_group=4, topk_method="noaux_tc",
                                            tie_word_embeddings=False),
}


# --- what each engine holds per rank, restated from its model code --------------------------

class _Params(dict):
    """name -> (shape, dtype); ``linear`` adds a block-FP8 scale as the engines' Fp8 methods do."""

    def __init__(self, fp8: bool):
        super().__init__()
        self.fp8 = fp8

    def plain(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = BF16) -> None:
        self[name] = (tuple(shape), dtype)

    def linear(self, name: str, *shape: int) -> None:
        self[name] = (shape, FP8 if self.fp8 else BF16)
        if self.fp8:
            self[scale_name(name)] = (shape[:-2] + tuple(-(-s // 128) for s in shape[-2:]), F32)


def _is_moe_layer(cfg, i: int) -> bool:
    if cfg.model_type == "qwen3_moe":
        return i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0
    if cfg.model_type == "deepseek_v3":
        return i >= cfg.first_k_dense_replace and i % getattr(cfg, "moe_layer_freq", 1) == 0
    return False


def _num_experts(cfg) -> int:
    return cfg.num_experts if cfg.model_type == "qwen3_moe" else cfg.n_routed_experts


def _engine_params(cfg, *, tp_size: int, fp8: bool, fused_qkv_a: str, experts_module: str,
                   experts: tuple[int, ...], moe_tp: int) -> _Params:
    """The parameters one rank holds after loading: vLLM and SGLang agree but for the given bits."""
    p = _Params(fp8)
    hidden, tp = cfg.hidden_size, tp_size
    per_rank_vocab = -(-cfg.vocab_size // 64) * 64 // tp  # pad to 64, then an even split
    p.plain("model.embed_tokens.weight", (per_rank_vocab, hidden))
    if not cfg.tie_word_embeddings:
        p.plain("lm_head.weight", (per_rank_vocab, hidden))
    p.plain("model.norm.weight", (hidden,))
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        p.plain(pre + "input_layernorm.weight", (hidden,))
        p.plain(pre + "post_attention_layernorm.weight", (hidden,))
        a = pre + "self_attn."
        if cfg.model_type == "deepseek_v3":
            heads = cfg.num_attention_heads // tp
            p.linear(a + fused_qkv_a + ".weight", cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim, hidden)
            p.plain(a + "q_a_layernorm.weight", (cfg.q_lora_rank,))
            p.linear(a + "q_b_proj.weight", heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.q_lora_rank)
            p.plain(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,))
            p.linear(a + "kv_b_proj.weight", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
            p.linear(a + "o_proj.weight", hidden, heads * cfg.v_head_dim)
        else:
            head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
            heads, kv = cfg.num_attention_heads // tp, max(1, cfg.num_key_value_heads // tp)
            p.linear(a + "qkv_proj.weight", (heads + 2 * kv) * head_dim, hidden)
            if cfg.model_type == "qwen2" or getattr(cfg, "attention_bias", False):
                p.plain(a + "qkv_proj.bias", ((heads + 2 * kv) * head_dim,))
            p.linear(a + "o_proj.weight", hidden, heads * head_dim)
            if cfg.model_type.startswith("qwen3"):
                p.plain(a + "q_norm.weight", (head_dim,))
                p.plain(a + "k_norm.weight", (head_dim,))
        m = pre + "mlp."
        if _is_moe_layer(cfg, i):
            inter = cfg.moe_intermediate_size // moe_tp
            p.plain(m + "gate.weight", (_num_experts(cfg), hidden))
            p.linear(f"{m}{experts_module}.w13_weight", len(experts), 2 * inter, hidden)
            p.linear(f"{m}{experts_module}.w2_weight", len(experts), hidden, inter)
            if cfg.model_type == "deepseek_v3":
                p.plain(m + "gate.e_score_correction_bias", (cfg.n_routed_experts,), F32)
                shared = cfg.moe_intermediate_size * cfg.n_shared_experts // tp
                p.linear(m + "shared_experts.gate_up_proj.weight", 2 * shared, hidden)
                p.linear(m + "shared_experts.down_proj.weight", hidden, shared)
        else:
            p.linear(m + "gate_up_proj.weight", 2 * cfg.intermediate_size // tp, hidden)
            p.linear(m + "down_proj.weight", hidden, cfg.intermediate_size // tp)
    return p


def vllm_experts(num_experts: int, *, tp_rank: int, tp_size: int, dp_rank: int = 0, dp_size: int = 1,
                 expert_parallel: bool = False, expert_placement: str = "linear") -> tuple[tuple[int, ...], int, int]:
    """(experts, TP rank and size inside experts) of vLLM's FusedMoE: DP x TP ranks flatten; with EP they
    split the experts as determine_expert_map does, else each holds a slice of every expert."""
    size, rank = dp_size * tp_size, dp_rank * tp_size + tp_rank
    if not (expert_parallel and size > 1):
        return tuple(range(num_experts)), rank, size
    if expert_placement == "round_robin":
        return tuple(range(rank, num_experts, size)), 0, 1
    base, rem = divmod(num_experts, size)
    start = rank * base + min(rank, rem)
    return tuple(range(start, start + base + (1 if rank < rem else 0))), 0, 1


def sglang_experts(num_experts: int, *, tp_rank: int, tp_size: int,
                   ep_size: int = 1) -> tuple[tuple[int, ...], int, int]:
    """SGLang: a moe_ep group takes every (tp/ep)-th rank of TP, so ep rank = tp_rank // (tp/ep); E/ep each."""
    moe_tp = tp_size // ep_size
    local = num_experts // ep_size
    first = (tp_rank // moe_tp) * local
    return tuple(range(first, first + local)), tp_rank % moe_tp, moe_tp


def _moe(cfg) -> bool:
    return cfg.model_type in ("qwen3_moe", "deepseek_v3")


VLLM_EXPERTS = "experts.routed_experts"  # vLLM 0.33's module for the stacked experts


def vllm_params(cfg, *, fp8: bool, **parallel) -> _Params:
    experts, _, moe_tp = vllm_experts(_num_experts(cfg), **parallel) if _moe(cfg) else ((), 0, 1)
    return _engine_params(cfg, tp_size=parallel["tp_size"], fp8=fp8, fused_qkv_a="fused_qkv_a_proj",
                          experts_module=VLLM_EXPERTS, experts=experts, moe_tp=moe_tp)


def sglang_params(cfg, *, fp8: bool, **parallel) -> _Params:
    experts, _, moe_tp = sglang_experts(_num_experts(cfg), **parallel) if _moe(cfg) else ((), 0, 1)
    return _engine_params(cfg, tp_size=parallel["tp_size"], fp8=fp8, fused_qkv_a="fused_qkv_a_proj_with_mqa",
                          experts_module="experts", experts=experts, moe_tp=moe_tp)


ENGINES = {"vllm": (vllm_params, vllm_experts), "sglang": (sglang_params, sglang_experts)}


def registered(params: dict) -> dict:
    """What an adapter registers: the engine's parameters less those no trainer parameter fills."""
    return {n: v for n, v in params.items() if not any(re.search(p, n) for p in ENGINE_ONLY)}


# --- planning real configs ------------------------------------------------------------------

@functools.cache
def hf_shapes(model: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The trainer's parameter names and shapes (transformers on the meta device: no weights)."""
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(CONFIGS[model]())
    return tuple((n, tuple(p.shape)) for n, p in trainer_tensors(m))


def trainer_tensors(m) -> list:
    """What a sender syncs: every parameter, and the buffers the default patterns select."""
    return list(m.named_parameters()) + [(n, b) for n, b in m.named_buffers()
                                         if any(re.search(p, n) for p in DEFAULT_SYNC_BUFFERS)]


def fsdp_sources(shapes) -> list[SourceParam]:
    """Sources as FSDP2 over NUM_SENDERS ranks holds them: dim 0 chunks."""
    mesh = list(range(NUM_SENDERS))
    return [SourceParam(n, s, F32 if n.endswith("e_score_correction_bias") else BF16,
                        shard_groups(s, mesh, [Shard(0)], name=n)) for n, s in shapes]


def plan_for(sources: list[SourceParam], receivers: list[ReceiverMeta]):
    return build_plan(sources, receivers, sender_hosts=["train0"] * NUM_SENDERS, mode="direct", links=LinkModel(),
                      watermark_bytes=1 << 30)


def layout_shapes(spec: LayoutSpec, sources: list[SourceParam]) -> dict[str, tuple[int, ...]]:
    """Destination names and shapes as the layout alone sees them: pieces and unwritten boxes."""
    layout = make_layout(spec)
    ends: dict[str, list[int]] = {}
    boxes = [(p.dst, p.dst_box) for s in sources for p in layout.pieces(s)]
    boxes += [(n, b) for n, bs in getattr(layout, "unwritten", dict)().items() for b in bs]
    for name, box in boxes:
        ends[name] = [max(a, b) for a, b in zip(ends.get(name, box.ends), box.ends)]
    return {n: tuple(e) for n, e in ends.items()}


def engine_receivers(engine: str, model: str, *, quant: str, ranks: list[dict]) -> list[ReceiverMeta]:
    cfg = CONFIGS[model]()
    params_of = ENGINES[engine][0]
    out = []
    for r, parallel in enumerate(ranks):
        params = registered(params_of(cfg, fp8=quant != "none", **parallel))
        tensors = {n: DestTensor(n, s, d) for n, (s, d) in params.items()}
        spec = LayoutSpec(engine, layout_kwargs(cfg, **parallel))
        out.append(ReceiverMeta(r, "infer0", tensors, spec, quant))
    return out


def tp_ranks(tp: int, **extra) -> list[dict]:
    return [dict(tp_rank=r, tp_size=tp, **extra) for r in range(tp)]


def vllm_dp_ranks(tp: int, dp: int, **extra) -> list[dict]:
    return [dict(tp_rank=r % tp, tp_size=tp, dp_rank=r // tp, dp_size=dp, **extra) for r in range(tp * dp)]


# (model, TP or TP inside experts) -> the refusal the planner must give; anything else must plan.
REFUSED = {
    # vLLM and SGLang refuse 28 heads on 8 ranks themselves; so does the layout, naming q_proj.
    ("qwen2.5-7b", 8): r"'model\.layers\.0\.self_attn\.q_proj\.weight': num_attention_heads of size 28 does not "
                       r"divide by tp_size 8",
}
FP8_REFUSED = {
    # 768 / 4 = 192 and 768 / 8 = 96 are not multiples of the 128 block: experts sliced by TP cannot be FP8.
    ("qwen3-30b-a3b", 4): r"'model\.layers\.0\.mlp\.experts\.(routed_experts\.)?w13_weight': FP8 block of 128 "
                          r"misaligned",
    ("qwen3-30b-a3b", 8): r"'model\.layers\.0\.mlp\.experts\.(routed_experts\.)?w13_weight': FP8 block of 128 "
                          r"misaligned",
}
HF_TP_FP8_REFUSED = {
    # Unfused slices at TP 8: Qwen2.5-7B has 3584 / 8 = 448 query rows, Qwen3-30B-A3B 512 / 8 = 64 key rows.
    ("qwen2.5-7b", 8): r"'model\.layers\.0\.self_attn\.q_proj\.weight': FP8 block of 128 misaligned",
    ("qwen3-30b-a3b", 8): r"'model\.layers\.0\.self_attn\.k_proj\.weight': FP8 block of 128 misaligned",
}


def _expect_plan(receivers, sources, refusal: str | None):
    if refusal is not None:
        with pytest.raises(PlanError, match=refusal):
            plan_for(sources, receivers)
        return
    plan_for(sources, receivers)  # validation inside: every destination element exactly once
    for recv in receivers:
        assert wire.decode(wire.encode(recv)) == recv  # receivers publish it on the control plane, layout and all
        assert set(layout_shapes(recv.layout, sources)) == {n for n in recv.tensors if not n.endswith("_scale_inv")}


@pytest.mark.parametrize("quant", ["none", "fp8_block"])
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("model", list(CONFIGS))
def test_engine_layout_covers_engine_params_at_tp(model, engine, quant):
    sources = fsdp_sources(hf_shapes(model))
    for tp in (1, 2, 4, 8):
        refusal = REFUSED.get((model, tp)) or (FP8_REFUSED.get((model, tp)) if quant != "none" else None)
        _expect_plan(engine_receivers(engine, model, quant=quant, ranks=tp_ranks(tp)), sources, refusal)


@pytest.mark.parametrize("quant", ["none", "fp8_block"])
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v3"])
def test_vllm_expert_parallel(model, quant):
    sources = fsdp_sources(hf_shapes(model))
    cases = [tp_ranks(tp, expert_parallel=True) for tp in (2, 4, 8)]
    cases.append(vllm_dp_ranks(4, 2, expert_parallel=True))  # EP spans DP x TP
    if model == "deepseek-v3":  # vLLM keeps round_robin only for grouped experts, else falls back to linear
        cases.append(tp_ranks(8, expert_parallel=True, expert_placement="round_robin"))
    for ranks in cases:
        _expect_plan(engine_receivers("vllm", model, quant=quant, ranks=ranks), sources, None)
    # Without EP, MoE TP spans DP x TP too: 768 / 4 is no FP8 block multiple.
    refusal = FP8_REFUSED.get(("qwen3-30b-a3b", 4)) if model == "qwen3-30b-a3b" and quant != "none" else None
    _expect_plan(engine_receivers("vllm", model, quant=quant, ranks=vllm_dp_ranks(2, 2)), sources, refusal)


@pytest.mark.parametrize("quant", ["none", "fp8_block"])
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v3"])
def test_sglang_expert_parallel(model, quant):
    sources = fsdp_sources(hf_shapes(model))
    for tp, ep in ((2, 2), (4, 4), (8, 8), (8, 2)):  # (8, 2): 2 expert groups, TP 4 inside each expert
        refusal = FP8_REFUSED.get((model, tp // ep)) if quant != "none" else None
        _expect_plan(engine_receivers("sglang", model, quant=quant, ranks=tp_ranks(tp, ep_size=ep)), sources,
                     refusal)


@pytest.mark.parametrize("quant", ["none", "fp8_block"])
@pytest.mark.parametrize("model", list(CONFIGS))
def test_hf_tp_covers_at_tp(model, quant):
    """hf_tp keeps HF names; its destinations are the layout's own slices (experts replicated)."""
    sources = fsdp_sources(hf_shapes(model))
    for tp in (1, 2, 4, 8):
        receivers = []
        for r in range(tp):
            spec = LayoutSpec("hf_tp", {"tp_rank": r, "tp_size": tp})
            tensors = {}
            for name, shape in layout_shapes(spec, sources).items():
                if quant != "none" and should_quantize(name, shape, QUANT_SKIP):
                    tensors[name] = DestTensor(name, shape, FP8)
                    grid = shape[:-2] + tuple(-(-s // 128) for s in shape[-2:])
                    tensors[scale_name(name)] = DestTensor(scale_name(name), grid, F32)
                else:
                    tensors[name] = DestTensor(name, shape, F32 if name.endswith("e_score_correction_bias") else BF16)
            receivers.append(ReceiverMeta(r, "infer0", tensors, spec, quant))
        refusal = HF_TP_FP8_REFUSED.get((model, tp)) if quant != "none" else None
        _expect_plan(receivers, sources, refusal)


def test_vocab_padding_is_never_written():
    """Llama-3's 128256 rows pad to 128256 (a multiple of 64): use a vocab that does pad."""
    cfg = CONFIGS["llama3-8b"]()
    cfg.vocab_size = 128200
    sources = fsdp_sources((n, (128200,) + s[1:] if s[0] == 128256 else s) for n, s in hf_shapes("llama3-8b"))
    receivers = []
    for r in range(8):
        params = vllm_params(cfg, fp8=False, tp_rank=r, tp_size=8)
        spec = LayoutSpec("vllm", layout_kwargs(cfg, tp_rank=r, tp_size=8))
        receivers.append(ReceiverMeta(r, "infer0", {n: DestTensor(n, s, d) for n, (s, d) in params.items()},
                                      spec, "none"))
    plan = plan_for(sources, receivers)
    last = make_layout(receivers[7].layout).unwritten()
    assert last["model.embed_tokens.weight"] == [Box((16032 - 56, 0), (56, 4096))]  # 128256 - 128200 = 56 rows
    assert not make_layout(receivers[0].layout).unwritten()
    for task in plan.arrivals[7]:
        assert all(task.dst_box.intersect(b) is None for b in last.get(task.dst, []))


# --- bad input, refused by name -------------------------------------------------------------

def _layout(engine="vllm", **kw):
    base = dict(tp_rank=0, tp_size=2, hidden_size=256, vocab_size=1000, num_attention_heads=4, num_key_value_heads=2)
    return make_layout(LayoutSpec(engine, base | kw))


def test_refusals_name_the_tensor():
    src = SourceParam("model.layers.0.mlp.experts.3.gate_proj.weight", (64, 256), BF16, ())
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.experts\.3\.gate_proj\.weight': per-expert"):
        _layout().pieces(src)
    with pytest.raises(ValueError, match=r"'lm_head\.weight': the engine ties lm_head"):
        _layout(tie_word_embeddings=True).pieces(SourceParam("lm_head.weight", (1000, 256), BF16, ()))
    with pytest.raises(ValueError, match=r"'model\.foo\.weight' matches no rule of layout 'sglang'"):
        _layout("sglang").pieces(SourceParam("model.foo.weight", (4, 4), BF16, ()))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight': tp_size 4 is not a "
                                         r"multiple of num_key_value_heads 3"):
        _layout(tp_size=4, num_attention_heads=12, num_key_value_heads=3).pieces(
            SourceParam("model.layers.0.self_attn.k_proj.weight", (384, 256), BF16, ()))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj': number of experts of "
                                         r"size 6 does not divide by ep_size 4"):
        _layout("sglang", tp_size=4, ep_size=4).pieces(
            SourceParam("model.layers.0.mlp.experts.gate_up_proj", (6, 512, 256), BF16, ()))
    with pytest.raises(ValueError, match="expert_placement='random'"):
        _layout(expert_placement="random")


# --- numbers: tiny real models, filled, then read back the way the engines read them --------

TINY = {
    "llama": lambda: LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=128, vocab_size=1000, num_hidden_layers=1),
    "qwen2": lambda: Qwen2Config(hidden_size=256, intermediate_size=512, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=1000, num_hidden_layers=1,
                                 tie_word_embeddings=False),
    "qwen3-tied": lambda: Qwen3Config(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=128, vocab_size=1000, num_hidden_layers=1,
                                      tie_word_embeddings=True),
    "qwen3-moe": lambda: Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                        num_experts=6, num_experts_per_tok=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=128, vocab_size=1000, num_hidden_layers=2,
                                        mlp_only_layers=[1], tie_word_embeddings=False),
    "deepseek-v3": lambda: DeepseekV3Config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                            n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=128,
                                            kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                            v_head_dim=128, vocab_size=1000, first_k_dense_replace=1,
                                            num_hidden_layers=2, n_group=2, topk_group=1, topk_method="noaux_tc",
                                            tie_word_embeddings=False),
}


@functools.cache
def tiny_weights(model: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(TINY[model]()).to(BF16)
    return {n: torch.randn(p.shape).to(F32 if n.endswith("e_score_correction_bias") else BF16)
            for n, p in trainer_tensors(m)}


def read_back(cfg, engine: str, ranks: list[dict], held: list[dict[str, torch.Tensor]], full: dict, *,
              scales: bool) -> dict[str, torch.Tensor]:
    """Full HF tensors from every rank's engine tensors, split as the engine's forward splits them.

    ``held`` maps engine weight names to values, or with ``scales`` to their block scales,
    whose offsets along the last two dims count 128-blocks. Copies that several ranks
    hold (replicated tensors, replicated KV heads) must agree.
    """
    tp = ranks[0]["tp_size"]

    def cut(t: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
        if scales and dim >= t.ndim - 2:
            assert start % 128 == 0, start
            start, size = start // 128, -(-size // 128)
        return t.narrow(dim, start, size)

    def one(copies: list[torch.Tensor]) -> torch.Tensor:
        assert all(torch.equal(c.view(torch.uint8), copies[0].view(torch.uint8)) for c in copies)
        return copies[0]

    def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat([p.view(torch.uint8) for p in parts], dim).view(parts[0].dtype)

    out = {}
    for name, tensor in full.items():
        shape = tuple(tensor.shape)
        m = re.match(r"(.+)\.(q|k|v)_proj\.(weight|bias)$", name)
        if m and cfg.model_type != "deepseek_v3":
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            q_rows = cfg.num_attention_heads // tp * head_dim
            kv_rows = max(1, cfg.num_key_value_heads // tp) * head_dim
            replicas = max(1, tp // cfg.num_key_value_heads)  # ranks r..r+replicas-1 share KV heads
            fused = [held[r][f"{m[1]}.qkv_proj.{m[3]}"] for r in range(tp)]
            if m[2] == "q":
                out[name] = cat([cut(f, 0, 0, q_rows) for f in fused], 0)
            else:
                at = q_rows + (kv_rows if m[2] == "v" else 0)
                groups = [[cut(f, 0, at, kv_rows) for f in fused[g:g + replicas]] for g in range(0, tp, replicas)]
                out[name] = cat([one(g) for g in groups], 0)
            continue
        m = re.match(r"(.+)\.(gate|up)_proj\.weight$", name)
        if m and ".experts." not in name:
            rows = shape[0] // tp
            fused = [held[r][f"{m[1]}.gate_up_proj.weight"] for r in range(tp)]
            out[name] = cat([cut(f, 0, rows if m[2] == "up" else 0, rows) for f in fused], 0)
            continue
        m = re.match(r"(.+)\.experts\.(gate_up_proj|down_proj)$", name)
        if m:
            out[name] = _read_experts(cfg, engine, ranks, held, m[1], gate_up=m[2] == "gate_up_proj", cut=cut,
                                      one=one, cat=cat)
            continue
        m = re.match(r"(.+)\.(q_a_proj|kv_a_proj_with_mqa)\.weight$", name)
        if m:
            fused = f"{m[1]}.{'fused_qkv_a_proj' if engine == 'vllm' else 'fused_qkv_a_proj_with_mqa'}.weight"
            at = 0 if m[2] == "q_a_proj" else cfg.q_lora_rank
            out[name] = one([cut(held[r][fused], 0, at, shape[0]) for r in range(tp)])
            continue
        if re.search(r"\.(o_proj|down_proj)\.weight$", name):
            out[name] = cat([held[r][name] for r in range(tp)], 1)
        elif re.search(r"\.(q_b_proj|kv_b_proj)\.weight$", name):
            out[name] = cat([held[r][name] for r in range(tp)], 0)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            per = -(-cfg.vocab_size // 64) * 64 // tp
            out[name] = cat([held[r][name][:max(0, min(per, cfg.vocab_size - r * per))] for r in range(tp)], 0)
        else:
            out[name] = one([held[r][name] for r in range(tp)])
    return out


def _read_experts(cfg, engine, ranks, held, prefix: str, *, gate_up: bool, cut, one, cat) -> torch.Tensor:
    num_experts, inter = _num_experts(cfg), cfg.moe_intermediate_size
    module = VLLM_EXPERTS if engine == "vllm" else "experts"
    dst = f"{prefix}.{module}.{'w13_weight' if gate_up else 'w2_weight'}"
    found: dict[tuple[int, int, int], list[torch.Tensor]] = {}  # (expert, half, slice) -> copies
    for r, parallel in enumerate(ranks):
        experts, t, moe_tp = ENGINES[engine][1](num_experts, **parallel)
        size = inter // moe_tp
        for local, e in enumerate(experts):
            w = held[r][dst][local]
            halves = [cut(w, 0, 0, size), cut(w, 0, size, size)] if gate_up else [cut(w, 1, 0, size)]
            for half, part in enumerate(halves):
                found.setdefault((e, half, t), []).append(part)
    moe_tp = ENGINES[engine][1](num_experts, **ranks[0])[2]
    per_expert = []
    for e in range(num_experts):
        parts = [one(found[(e, half, t)]) for half in range(2 if gate_up else 1) for t in range(moe_tp)]
        per_expert.append(cat(parts, 0 if gate_up else 1))
    return torch.stack([p.view(torch.uint8) for p in per_expert]).view(per_expert[0].dtype)


NUMERIC_CASES = [
    ("llama", "vllm", tp_ranks(4)), ("llama", "sglang", tp_ranks(2)),
    ("qwen2", "vllm", tp_ranks(2)), ("qwen2", "sglang", tp_ranks(1)),
    ("qwen3-tied", "vllm", tp_ranks(4)),
    ("qwen3-moe", "vllm", tp_ranks(2)),  # TP inside experts
    ("qwen3-moe", "vllm", tp_ranks(4, expert_parallel=True)),  # 6 experts over 4 ranks: 2, 2, 1, 1
    ("qwen3-moe", "vllm", tp_ranks(4, expert_parallel=True, expert_placement="round_robin")),
    ("qwen3-moe", "sglang", tp_ranks(4, ep_size=2)),  # 3 experts per group, TP 2 inside them
    ("deepseek-v3", "vllm", tp_ranks(2, expert_parallel=True)),
    ("deepseek-v3", "sglang", tp_ranks(2)),
]


@pytest.mark.parametrize("quant", ["none", "fp8_block"])
@pytest.mark.parametrize("model,engine,ranks", NUMERIC_CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v[0].items() if k != "tp_rank"))
def test_filled_engine_tensors_read_back_to_hf(model, engine, ranks, quant):
    cfg, full = TINY[model](), tiny_weights(model)
    held = []
    for parallel in ranks:
        spec = LayoutSpec(engine, layout_kwargs(cfg, **parallel))
        dests = expected_destinations(full, layout=spec, quant=quant, quant_skip=QUANT_SKIP)
        engine_side = registered(ENGINES[engine][0](cfg, fp8=quant != "none", **parallel))
        assert set(dests) == set(engine_side)
        for name, t in dests.items():
            assert (tuple(t.shape), t.dtype) == engine_side[name], name
        for name, boxes in make_layout(spec).unwritten().items():
            for box in boxes:  # padding rows: the engine's, never written
                assert not box.view(dests[name]).any(), name
        held.append(dests)
    if quant == "none":
        got = read_back(cfg, engine, ranks, held, full, scales=False)
        assert got.keys() == full.keys()
        for name, want in full.items():
            assert torch.equal(got[name], want), name
        return
    refs = {n: reference_quantize(t, quant) if should_quantize(n, t.shape, QUANT_SKIP) else (t, None)
            for n, t in full.items()}
    values = read_back(cfg, engine, ranks, [{n: t for n, t in h.items() if not n.endswith("_scale_inv")}
                                            for h in held], full, scales=False)
    for name, (want, _) in refs.items():
        assert torch.equal(values[name].view(torch.uint8), want.view(torch.uint8)), name
    scale_held = [{n[:-len("_scale_inv")]: t for n, t in h.items() if n.endswith("_scale_inv")} for h in held]
    quantized = {n: t for n, t in full.items() if refs[n][1] is not None}
    got = read_back(cfg, engine, ranks, scale_held, quantized, scales=True)
    for name in quantized:
        assert torch.equal(got[name], refs[name][1]), name


# --- adapters, without their engines --------------------------------------------------------

def test_adapters_import_without_their_engines():
    import sys

    from fsdp_sync.engines import sglang_worker, vllm_worker  # noqa: F401
    assert "vllm" not in sys.modules and "sglang" not in sys.modules


def test_adapters_refuse_relaid_fp8_scales_by_name():
    from fsdp_sync.engines import check_block_fp8

    w = torch.zeros(256, 384, dtype=FP8)
    column_major = torch.zeros(3, 2).t()  # Hopper DeepGEMM's MN-major copy: the same (2, 3) grid
    check_block_fp8({"a.weight": w, "a.weight_scale_inv": column_major})
    with pytest.raises(ValueError, match=r"'a\.weight_scale_inv': want float32 \(2, 3\), engine holds torch\.int32"):
        check_block_fp8({"a.weight": w, "a.weight_scale_inv": torch.zeros(256, 1, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"'e\.w13_weight_scale_inv': want float32 \(4, 2, 3\), engine holds missing"):
        check_block_fp8({"e.w13_weight": torch.zeros(4, 256, 384, dtype=FP8)})


def test_rederived_tensors_keep_their_storage():
    """CUDA graphs hold the addresses of MLA's absorbed weights: re-deriving must write in place."""
    from types import SimpleNamespace

    from fsdp_sync.engines import Attached, copy_into_old

    owner = SimpleNamespace(W_UK_T=torch.zeros(2, 3), W_UV=torch.zeros(2, 4))
    before = (owner.W_UK_T.data_ptr(), owner.W_UV.data_ptr())

    def rederive():
        owner.W_UK_T, owner.W_UV = torch.ones(2, 3), torch.full((2, 4), 2.0)

    copy_into_old(owner, ("W_UK_T", "W_UV"), rederive)
    assert (owner.W_UK_T.data_ptr(), owner.W_UV.data_ptr()) == before
    assert owner.W_UK_T.eq(1).all() and owner.W_UV.eq(2).all()

    calls = []
    receiver = SimpleNamespace(commit_mode="staged", commit=lambda: 7)
    attached = Attached(receiver, lambda: calls.append(1))
    assert attached.commit() == 7 and attached.commit() == 7 and len(calls) == 1  # once per version


def test_sglang_rpc_carries_commands():
    from types import SimpleNamespace

    from fsdp_sync.engines.sglang_worker import fsdp_sync_rpc, rpc

    seen = []
    model = SimpleNamespace(_fsdp_sync=SimpleNamespace(wait_for=lambda v, t: seen.append((v, t)),
                                                       commit=lambda: seen.append("commit")))
    fsdp_sync_rpc(model, rpc("wait_for", version=3, timeout=1.5))
    fsdp_sync_rpc(model, rpc("commit"))
    assert seen == [(3, 1.5), "commit"]
    with pytest.raises(ValueError, match="unknown fsdp_sync op 'reload'"):
        fsdp_sync_rpc(model, rpc("reload"))
