"""Synthetic sender and receiver metadata for single-process planner tests (no tensors, any rank count)."""

from __future__ import annotations

from typing import Callable

import torch

from fsdp_sync.config import LinkModel
from fsdp_sync.layouts import make_layout
from fsdp_sync.meta import DestTensor, LayoutSpec, ReceiverMeta, SourceParam
from fsdp_sync.planner import build_plan
from fsdp_sync.quant import get_quant_format, scale_name, should_quantize
from fsdp_sync.sharding import shard_groups


def llama_like_shapes(num_layers: int, hidden: int, inter: int, kv: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    return shapes


def sources_on(shapes: dict, mesh: list, placements: list, dtype=torch.bfloat16) -> list[SourceParam]:
    return [SourceParam(n, s, dtype, shard_groups(s, mesh, placements, name=n)) for n, s in shapes.items()]


def receivers_for(sources: list[SourceParam], *, num_replicas: int, tp: int, quant: str,
                  host: Callable[[int], str] = lambda r: f"infer{r // 8}") -> list[ReceiverMeta]:
    """Receivers holding exactly what the hf_tp (or identity) layout asks, FP8 with scales where quantized."""
    fmt = get_quant_format(quant)
    out = []
    for r in range(num_replicas * tp):
        spec = LayoutSpec("hf_tp", {"tp_rank": r % tp, "tp_size": tp}) if tp > 1 else LayoutSpec("identity")
        layout = make_layout(spec)
        tensors = {}
        for s in sources:
            shape = layout.pieces(s)[0].dst_box.sizes
            if fmt.is_quantized and should_quantize(s.name, s.shape):
                tensors[s.name] = DestTensor(s.name, shape, torch.float8_e4m3fn)
                tensors[scale_name(s.name)] = DestTensor(scale_name(s.name), fmt.scale_shape(shape), torch.float32)
            else:
                tensors[s.name] = DestTensor(s.name, shape, s.dtype)
        out.append(ReceiverMeta(r, host(r), tensors, spec, quant))
    return out


def plan(sources, receivers, *, mode="direct", hosts=None, watermark_bytes: int = 1 << 30):
    hosts = hosts or [f"train{r // 8}" for r in range(max(max(g.ranks) for s in sources for g in s.groups) + 1)]
    return build_plan(sources, receivers, sender_hosts=hosts, mode=mode, links=LinkModel(),
                      watermark_bytes=watermark_bytes)
