"""Tiny model cases shared by the vLLM fixture script (vLLM's venv) and the CI test (ours).

Both sides must build the same HF-named tensors without downloading anything and without
depending on which transformers each venv has, so the configs are plain ``config.json``
dicts and ``hf_params`` restates the trainer's (transformers >= 5) names and shapes;
``tests/test_vllm_fixtures.py`` checks that restatement against transformers itself.
Values come from ``fill``: integers of a name-seeded arange, scaled by 1/64, which bf16
holds exactly, so both torch versions produce the same bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

VLLM_VERSION = "0.33.0"
BF16, F32 = torch.bfloat16, torch.float32
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}

_COMMON = dict(hidden_size=256, vocab_size=1000, num_hidden_layers=2, max_position_embeddings=512,
               rms_norm_eps=1e-6, hidden_act="silu", torch_dtype="bfloat16", dtype="bfloat16")
_QWEN3 = dict(_COMMON, architectures=["Qwen3ForCausalLM"], model_type="qwen3", intermediate_size=512,
              num_attention_heads=4, num_key_value_heads=2, head_dim=128, rope_theta=1000000.0,
              tie_word_embeddings=False, attention_bias=False)
_QWEN3_MOE = dict(_QWEN3, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", moe_intermediate_size=256,
                  num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[1])
_LLAMA = dict(_COMMON, architectures=["LlamaForCausalLM"], model_type="llama", intermediate_size=512,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
              attention_bias=True, mlp_bias=False)
_DEEPSEEK_V3 = dict(_COMMON, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", intermediate_size=512,
                    moe_intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                    n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=128, kv_lora_rank=128,
                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=1,
                    moe_layer_freq=1, n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=10000.0, tie_word_embeddings=False,
                    rope_scaling=None)
_DEEPSEEK_V2 = dict(_DEEPSEEK_V3, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", q_lora_rank=None,
                    n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                    routed_scaling_factor=1.0)
# Kimi-K2's shape: one expert group, more heads and experts than DeepSeek-V3 per width.
_KIMI_K2 = dict(_DEEPSEEK_V3, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=8, n_group=1,
                topk_group=1, routed_scaling_factor=2.827)

# case -> (config.json, TP sizes, whether EP applies). FP8 cases stop at TP 2: at TP 4 the
# tiny widths' slices are no 128-block multiples, which vLLM and the planner both refuse.
CASES: dict[str, tuple[dict[str, Any], tuple[int, ...], bool]] = {
    "qwen3": (_QWEN3, (1, 2, 4), False),  # TP 4 > 2 KV heads: each KV head on 2 ranks
    "qwen3-tied": (dict(_QWEN3, tie_word_embeddings=True), (1, 2, 4), False),
    "llama-qkv-bias": (_LLAMA, (1, 2, 4), False),
    "qwen3-moe": (_QWEN3_MOE, (1, 2, 4), True),  # 6 experts over 4 EP ranks: 2, 2, 1, 1
    "deepseek-v2": (_DEEPSEEK_V2, (1, 2, 4), True),
    "deepseek-v3": (_DEEPSEEK_V3, (1, 2, 4), True),
    "kimi-k2": (_KIMI_K2, (1, 2, 4), True),
    "qwen3-fp8": (dict(_QWEN3, quantization_config=FP8_CONFIG), (1, 2), False),
    "qwen3-moe-fp8": (dict(_QWEN3_MOE, quantization_config=FP8_CONFIG), (1, 2), True),
    "deepseek-v3-fp8": (dict(_DEEPSEEK_V3, quantization_config=FP8_CONFIG), (1, 2), True),
}


# Also recorded with --expert-placement-strategy round_robin under EP: DeepSeek-V3 (two
# expert groups, so vLLM keeps it) and Qwen3-MoE (no groups: vLLM falls back to linear).
ROUND_ROBIN = ("qwen3-moe", "deepseek-v3")


def runs(case: str) -> list[tuple[int, bool, str]]:
    """(tp_size, expert_parallel, requested expert placement) a case is recorded at; EP only
    where TP > 1 splits experts."""
    _, tps, moe = CASES[case]
    out = [(tp, ep, "linear") for tp in tps for ep in ((False, True) if moe and tp > 1 else (False,))]
    return out + [(tp, True, "round_robin") for tp in tps if tp > 1 and case in ROUND_ROBIN]


def run_key(tp: int, ep: bool, placement: str) -> str:
    return f"tp{tp}" + ("-ep" if ep else "") + ("-rr" if placement == "round_robin" else "")


def placement_used(case: str, placement: str) -> str:
    """The placement vLLM 0.33 keeps (``determine_expert_placement_strategy``): round robin
    only for models with several expert groups."""
    return "round_robin" if placement == "round_robin" and CASES[case][0].get("n_group", 1) > 1 else "linear"


def is_moe_layer(cfg: dict, i: int) -> bool:
    if cfg["model_type"] == "qwen3_moe":
        return i not in cfg["mlp_only_layers"] and (i + 1) % cfg["decoder_sparse_step"] == 0
    if cfg["model_type"].startswith("deepseek"):
        return i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0
    return False


def num_experts(cfg: dict) -> int:
    return cfg["num_experts"] if cfg["model_type"] == "qwen3_moe" else cfg["n_routed_experts"]


def hf_params(cfg: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The trainer's tensors (transformers >= 5 names, stacked experts), with the router's
    ``e_score_correction_bias`` buffer where the model has one."""
    h, mla = cfg["hidden_size"], cfg["model_type"].startswith("deepseek")
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((cfg["vocab_size"], h), BF16)}

    def add(name: str, *shape: int, dtype: torch.dtype = BF16) -> None:
        out[name] = (tuple(shape), dtype)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        heads = cfg["num_attention_heads"]
        if mla:
            qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
            if cfg["q_lora_rank"] is None:
                add(a + "q_proj.weight", heads * qk, h)
            else:
                add(a + "q_a_proj.weight", cfg["q_lora_rank"], h)
                add(a + "q_a_layernorm.weight", cfg["q_lora_rank"])
                add(a + "q_b_proj.weight", heads * qk, cfg["q_lora_rank"])
            add(a + "kv_a_proj_with_mqa.weight", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h)
            add(a + "kv_a_layernorm.weight", cfg["kv_lora_rank"])
            add(a + "kv_b_proj.weight", heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])
            add(a + "o_proj.weight", h, heads * cfg["v_head_dim"])
        else:
            d = cfg.get("head_dim") or h // heads
            kv = cfg["num_key_value_heads"]
            for part, rows in (("q", heads * d), ("k", kv * d), ("v", kv * d)):
                add(a + f"{part}_proj.weight", rows, h)
                if cfg.get("attention_bias"):
                    add(a + f"{part}_proj.bias", rows)
            add(a + "o_proj.weight", h, heads * d)
            if cfg.get("attention_bias") and cfg["model_type"] == "llama":  # Llama's bias covers o_proj too
                add(a + "o_proj.bias", h)
            if cfg["model_type"].startswith("qwen3"):
                add(a + "q_norm.weight", d)
                add(a + "k_norm.weight", d)
        m = p + "mlp."
        if is_moe_layer(cfg, i):
            e, inter = num_experts(cfg), cfg["moe_intermediate_size"]
            add(m + "experts.gate_up_proj", e, 2 * inter, h)
            add(m + "experts.down_proj", e, h, inter)
            add(m + "gate.weight", e, h)
            if cfg.get("topk_method") == "noaux_tc":
                add(m + "gate.e_score_correction_bias", e, dtype=F32)
            if cfg.get("n_shared_experts"):
                shared = inter * cfg["n_shared_experts"]
                add(m + "shared_experts.gate_proj.weight", shared, h)
                add(m + "shared_experts.up_proj.weight", shared, h)
                add(m + "shared_experts.down_proj.weight", h, shared)
        else:
            add(m + "gate_proj.weight", cfg["intermediate_size"], h)
            add(m + "up_proj.weight", cfg["intermediate_size"], h)
            add(m + "down_proj.weight", h, cfg["intermediate_size"])
        add(p + "input_layernorm.weight", h)
        add(p + "post_attention_layernorm.weight", h)
    add("model.norm.weight", h)
    if not cfg["tie_word_embeddings"]:
        add("lm_head.weight", cfg["vocab_size"], h)
    return out


FILL_RECIPE = ("int64 k = (arange(numel) * (2 * (s % 97) + 1) + s) % 251 - 125, s = first 8 hex digits of "
               "sha256(name); value = k / 64 in float32, cast to the tensor's dtype (exact in bf16)")


def fill(name: str, shape: tuple[int, ...], dtype: torch.dtype, *, salt: str = "") -> torch.Tensor:
    """The recipe (``FILL_RECIPE``): deterministic, exact in bf16, distinct per tensor; a
    ``salt`` (prefixed to the name) gives another version of the weights, for pushes."""
    s = int(hashlib.sha256((salt + name).encode()).hexdigest()[:8], 16)
    n = 1
    for d in shape:
        n *= d
    k = (torch.arange(n, dtype=torch.int64) * (2 * (s % 97) + 1) + s) % 251 - 125
    return (k.to(F32) / 64).to(dtype).reshape(shape)


def hf_tensors(cfg: dict, *, salt: str = "") -> dict[str, torch.Tensor]:
    return {n: fill(n, s, d, salt=salt) for n, (s, d) in hf_params(cfg).items()}


def layout_spec(case: str, *, tp_rank: int, tp_size: int, ep: bool, placement: str = "linear"):
    """fsdp_sync's ``vllm`` layout for one rank of a case, as the adapter would publish it."""
    from types import SimpleNamespace

    from fsdp_sync.layouts.vllm import layout_kwargs
    from fsdp_sync.meta import LayoutSpec

    cfg = SimpleNamespace(**CASES[case][0])
    return LayoutSpec("vllm", layout_kwargs(cfg, tp_rank=tp_rank, tp_size=tp_size, expert_parallel=ep,
                                            expert_placement=placement_used(case, placement),
                                            vllm_version=VLLM_VERSION))


def pushed(case: str, *, tp_rank: int, tp_size: int, ep: bool, dtypes: dict[str, torch.dtype],
           placement: str = "linear", salt: str = "") -> dict[str, torch.Tensor]:
    """What a push of the recipe's tensors leaves in one rank's registered tensors. Which are
    FP8 is the engine's per-layer choice (the ``dtypes`` it registered), as the planner decides."""
    from fsdp_sync.destinations import expected_destinations

    fp8 = "quantization_config" in CASES[case][0]
    return expected_destinations(hf_tensors(CASES[case][0], salt=salt),
                                 layout=layout_spec(case, tp_rank=tp_rank, tp_size=tp_size, ep=ep,
                                                    placement=placement),
                                 quant="fp8_block" if fp8 else "none", dest_dtypes=dtypes)


def mla_absorbed(kv_b: torch.Tensor, scale: torch.Tensor | None, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.33's ``W_UK_T`` [N, P, L] and ``W_UV`` [N, L, V] from one rank's ``kv_b_proj``
    (``split_kv_b_proj``: dequantize to the model dtype, transpose, split per head)."""
    if scale is None:
        weight = kv_b.to(BF16)
    else:
        grid = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: kv_b.shape[0], : kv_b.shape[1]]
        weight = (kv_b.to(F32) * grid.to(F32)).to(BF16)
    rank, nope, v = cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    w_uk, w_uv = weight.T.view(rank, -1, nope + v).split([nope, v], dim=-1)
    return w_uk.permute(1, 2, 0), w_uv.transpose(0, 1)


def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in logical (row-major) order, whatever its strides."""
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def describe(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype).removeprefix("torch."), digest(t)]
