"""Benchmark models: Qwen3-shaped configs built by transformers, random bf16 weights, FSDP2 on GPU.

Weights are materialized only as FSDP2 shards (meta init, then ``to_empty``), so a
32B-like model starts in seconds and never needs a full copy on one GPU.
"""

from __future__ import annotations

import torch
from torch import nn

QWEN3 = {
    "qwen3_8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3_32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # Small enough for an AdamW step on fp32 masters beside a colocated engine on one GPU (bench --update).
    "qwen3_1_7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # For a smoke run on CPU or a small GPU: every TP=2 slice still on 128-element blocks.
    "qwen3_tiny": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=128, vocab_size=4096),
}


def qwen3_config(name: str):
    from transformers import Qwen3Config

    if name not in QWEN3:
        raise ValueError(f"unknown benchmark model {name!r}; valid: {sorted(QWEN3)}")
    return Qwen3Config(tie_word_embeddings=False, **QWEN3[name])


def meta_model(config) -> nn.Module:
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        return Qwen3ForCausalLM(config).to(torch.bfloat16)


def param_shapes(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(p.shape), p.dtype) for n, p in meta_model(config).named_parameters()}


def sharded_random_model(config, mesh, *, seed: int) -> nn.Module:
    """FSDP2 per decoder layer and root, materialized on the mesh's device with random weights (never zeros)."""
    from torch.distributed.fsdp import fully_shard

    model = meta_model(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=mesh.device_type)
    gen = torch.Generator(device=mesh.device_type).manual_seed(seed + mesh.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0.0, 0.02, generator=gen)
    return model
