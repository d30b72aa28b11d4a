"""A small Llama-style model that transformers builds from a config: no download, CPU-fast.

Sizes are multiples of 128 where TP=2 slices them, so FP8 128x128 blocks stay aligned.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                    tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> nn.Module:
    """Built and initialized on ``device``: a multi-billion model's init on CPU takes minutes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (HF inits norms to ones)
            p.add_(torch.randn_like(p) * 0.02)
    return model


def param_shapes(config, dtype: torch.dtype = torch.float32) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the model's parameters, without allocating them."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {n: (tuple(p.shape), dtype) for n, p in model.named_parameters()}


def apply_fsdp(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 per decoder layer, then the root, as torchtitan does."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
