"""Shapes-only metadata for trillion-parameter MoE pushes: senders and receivers, no weights.

Model shapes come from the published configs, built as transformers config objects and
instantiated on the meta device (real HF names and shapes, zero bytes). The training side
follows the seed's description: ``pp`` pipeline stages, and inside a stage

* expert weights (stacked ``experts.*`` [E, ...]) on an [ep, fsdp] mesh with placements
  (Shard(0), Shard(0)): EP splits the experts inside a node (``ep`` = GPUs per node), FSDP
  splits each EP rank's experts again across the stage's nodes, so a rank holds whole experts;
* every other weight HSDP-style on a [nodes, gpus_per_node] mesh with (Replicate(), Shard(0)):
  sharded inside a node, replicated across nodes, so every node is one shard group.

Global rank = stage * gpus_per_stage + node * gpus_per_node + local GPU.

``layout="seed"`` is the seed's own trainer as it describes itself: FSDP inside a node of
8 for every weight, and expert parallelism across nodes outside DTensor (each node's
DTensor holds only its own experts, so ``full_tensor`` gathers inside the node). Experts
sit on an [ep = nodes, fsdp = 8] mesh with (Shard(0), Shard(1)): each node its slice of
the experts, each GPU of the node a slice of their rows (FSDP2's ``shard_placement_fn``
with ``Shard(1)``, a common FSDP2 + EP recipe, keeps the 12 experts of a node balanced
over 8 GPUs, where dim-0 chunks would leave two GPUs empty). ``pp`` is 1.

Buffers that training updates and engines load (Kimi-K2's and DeepSeek-V3's
``e_score_correction_bias``, float32 [E] per MoE layer) are sources too: FSDP2 leaves
buffers unsharded, so every rank holds each whole. The inference side is
vLLM's layout (``fsdp_sync.layouts.vllm``) on ``replicas`` copies of a TP x DP group, with or
without expert parallelism; destination tensors are what that layout fills, FP8 (with
``weight_scale_inv``) for every matrix but embeddings, the LM head and routers.

Not modelled: MTP layers, optimizer state and expert placement by load.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.distributed.tensor import Replicate, Shard

from fsdp_sync.boxes import Box
from fsdp_sync.layouts import make_layout
from fsdp_sync.layouts.vllm import layout_kwargs
from fsdp_sync.meta import DestTensor, LayoutSpec, ReceiverMeta, SourceParam
from fsdp_sync.quant import DEFAULT_QUANT_SKIP, get_quant_format, scale_name, should_quantize
from fsdp_sync.sharding import shard_groups

# Engines keep routers in bf16 beside the defaults (embeddings, LM head, norms).
ENGINE_QUANT_SKIP = DEFAULT_QUANT_SKIP + (r"\.mlp\.gate\.weight$",)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _kimi_k2():
    from transformers import DeepseekV3Config  # Kimi-K2 ships the DeepSeek-V3 architecture

    return DeepseekV3Config(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                            num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64,
                            n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1,
                            q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                            v_head_dim=128, vocab_size=163840, n_group=1, topk_group=1, tie_word_embeddings=False)


def _deepseek_v3():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                            n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
                            q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                            v_head_dim=128, vocab_size=129280, n_group=8, topk_group=4, tie_word_embeddings=False)


def _qwen3_235b():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                          num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, vocab_size=151936, decoder_sparse_step=1,
                          mlp_only_layers=[], tie_word_embeddings=False)


# Published configs (moonshotai/Kimi-K2-Instruct, deepseek-ai/DeepSeek-V3, Qwen/Qwen3-235B-A22B), MTP layers left out.
MODELS: dict[str, Callable[[], Any]] = {"kimi_k2": _kimi_k2, "deepseek_v3": _deepseek_v3, "qwen3_235b": _qwen3_235b}


def model_config(name: str, num_layers: int | None = None):
    """The published config; ``num_layers`` cuts the depth (for fast tests), keeping every other size."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    config = MODELS[name]()
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    return config


@functools.cache
def param_shapes(name: str, num_layers: int | None = None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(HF name, shape) of every trainer parameter, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name, num_layers))
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


@functools.cache
def buffer_shapes(name: str, num_layers: int | None = None) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """(HF name, shape, dtype) of every persistent buffer (in the state dict, not a parameter)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name, num_layers))
    params = {n for n, _ in model.named_parameters()}
    buffers = dict(model.named_buffers())
    return tuple((n, tuple(buffers[n].shape), buffers[n].dtype) for n in model.state_dict() if n not in params)


def is_expert(name: str) -> bool:
    """Stacked routed experts (transformers >= 5); shared experts are dense weights."""
    return ".mlp.experts." in name


@dataclass(frozen=True, kw_only=True)
class Training:
    """The trainer's parallelism: ``pp`` stages of ``ep`` x expert-FSDP GPUs each (``layout="hsdp"``),
    or the seed's (``layout="seed"``): FSDP in a node, EP across the nodes outside DTensor, no PP."""

    num_gpus: int = 256
    gpus_per_node: int = 8
    pp: int = 2
    ep: int = 8
    layout: str = "hsdp"

    def __post_init__(self) -> None:
        if self.layout not in TRAINING_LAYOUTS:
            raise ValueError(f"unknown training layout {self.layout!r}; valid: {list(TRAINING_LAYOUTS)}")
        if self.layout == "seed" and (self.pp != 1 or self.ep != self.num_gpus // self.gpus_per_node):
            raise ValueError("the seed layout has no PP and one EP rank per node: use Training.seed(num_gpus)")
        if self.num_gpus % (self.pp * self.gpus_per_node):
            raise ValueError(f"{self.num_gpus} GPUs do not split into {self.pp} stages of whole "
                             f"{self.gpus_per_node}-GPU nodes")
        if self.gpus_per_stage % self.ep:
            raise ValueError(f"ep={self.ep} does not divide the {self.gpus_per_stage} GPUs of a stage")

    @classmethod
    def seed(cls, num_gpus: int, gpus_per_node: int = 8) -> "Training":
        return cls(num_gpus=num_gpus, gpus_per_node=gpus_per_node, pp=1, ep=num_gpus // gpus_per_node, layout="seed")

    @property
    def nodes_per_stage(self) -> int:
        return self.gpus_per_stage // self.gpus_per_node

    @property
    def gpus_per_stage(self) -> int:
        return self.num_gpus // self.pp

    @property
    def expert_fsdp(self) -> int:
        return self.gpus_per_stage // self.ep

    def describe(self) -> str:
        if self.layout == "seed":
            return (f"{self.num_gpus} GPUs, the seed's layout: every weight FSDP {self.gpus_per_node} in a node; "
                    f"experts EP {self.ep} across nodes outside DTensor (Shard(1) in the node); no PP")
        return (f"{self.num_gpus} GPUs: PP {self.pp} x (experts EP {self.ep} x FSDP {self.expert_fsdp}; others "
                f"FSDP {self.gpus_per_node} in a node x {self.gpus_per_stage // self.gpus_per_node} node replicas)")


def _stage_of(name: str, num_layers: int, pp: int) -> int:
    """Contiguous layer ranges per stage; embeddings on the first stage, final norm and LM head on the last."""
    m = _LAYER.search(name)
    if m is None:
        return 0 if "embed_tokens" in name else pp - 1
    return int(m.group(1)) * pp // num_layers


def training_sources(model: str, training: Training, *, num_layers: int | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> tuple[list[SourceParam], list[str]]:
    """Source metadata of every parameter on ``training``'s meshes, and each rank's host."""
    shapes = param_shapes(model, num_layers)
    num_layers = model_config(model, num_layers).num_hidden_layers
    t = training
    nodes = t.gpus_per_stage // t.gpus_per_node
    groups_cache: dict[tuple, tuple] = {}
    sources = []
    for name, shape in shapes:
        base = _stage_of(name, num_layers, t.pp) * t.gpus_per_stage
        if is_expert(name) and t.layout == "seed":
            # mesh[n][g]: EP rank n is a node (outside DTensor), FSDP rank g a GPU of it.
            mesh = [[base + n * t.gpus_per_node + g for g in range(t.gpus_per_node)] for n in range(nodes)]
            placements = (Shard(0), Shard(1))
        elif is_expert(name):
            # mesh[e][f]: EP rank e is a GPU of the node, expert-FSDP rank f a node of the stage.
            mesh = [[base + f * t.gpus_per_node + e for f in range(t.expert_fsdp)] for e in range(t.ep)]
            placements = (Shard(0), Shard(0))
        else:
            mesh = [[base + n * t.gpus_per_node + g for g in range(t.gpus_per_node)] for n in range(nodes)]
            placements = (Replicate(), Shard(0))
        key = (shape, base, is_expert(name))
        if key not in groups_cache:
            groups_cache[key] = shard_groups(shape, mesh, placements, name=name)
        sources.append(SourceParam(name, shape, dtype, groups_cache[key]))
    for name, shape, buffer_dtype in buffer_shapes(model, num_layers):
        # Unsharded on every rank of its stage: each rank is a shard group of one.
        base = _stage_of(name, num_layers, t.pp) * t.gpus_per_stage
        ranks = [[base + r] for r in range(t.gpus_per_stage)]
        sources.append(SourceParam(name, shape, buffer_dtype, shard_groups(shape, ranks, (Replicate(), Replicate()),
                                                                           name=name)))
    hosts = [f"train{r // t.gpus_per_node}" for r in range(t.num_gpus)]
    return sources, hosts


@dataclass(frozen=True, kw_only=True)
class Inference:
    """The engine's parallelism: ``replicas`` copies of a TP x DP group (vLLM ranks), EP over all of it if set."""

    num_gpus: int = 128
    gpus_per_node: int = 8
    tp: int = 8
    dp: int = 4
    expert_parallel: bool = True

    def __post_init__(self) -> None:
        if self.num_gpus % (self.tp * self.dp):
            raise ValueError(f"{self.num_gpus} GPUs do not split into replicas of TP {self.tp} x DP {self.dp}")

    @property
    def replicas(self) -> int:
        return self.num_gpus // (self.tp * self.dp)

    def describe(self) -> str:
        ep = f", EP {self.tp * self.dp}" if self.expert_parallel else ", experts TP-sliced"
        return f"{self.num_gpus} GPUs: {self.replicas} x (TP {self.tp} x DP {self.dp}{ep}), vLLM layout"


# The layouts the seed's case is compared on; replicas follow from the receiver count.
INFERENCE_LAYOUTS: dict[str, dict[str, Any]] = {
    "ep32": dict(tp=8, dp=4, expert_parallel=True),  # EP 32 per replica (attention TP 8, DP 4)
    "tp8": dict(tp=8, dp=1, expert_parallel=False),
    "tp16": dict(tp=16, dp=1, expert_parallel=False),
    "tp4": dict(tp=4, dp=1, expert_parallel=False),  # Qwen3-235B FP8 (235 GB) fits 4 x 80 GB
}

# The trainer layouts Training takes (layout=...).
TRAINING_LAYOUTS = {"hsdp": "EP inside a node, expert-FSDP across nodes, HSDP elsewhere, PP stages",
                    "seed": "the seed's: FSDP in a node for every weight, EP across nodes outside DTensor"}


def inference_layout(name: str, num_gpus: int) -> Inference:
    if name not in INFERENCE_LAYOUTS:
        raise ValueError(f"unknown inference layout {name!r}; valid: {sorted(INFERENCE_LAYOUTS)}")
    return Inference(num_gpus=num_gpus, **INFERENCE_LAYOUTS[name])


def receivers_for(model: str, sources: list[SourceParam], inference: Inference, *, quant: str) -> list[ReceiverMeta]:
    """One ReceiverMeta per inference GPU: the destination tensors its layout fills, FP8 where engines keep FP8."""
    config = model_config(model)
    i = inference
    group = i.tp * i.dp
    by_position: dict[int, tuple[LayoutSpec, dict[str, DestTensor]]] = {}
    out = []
    for r in range(i.num_gpus):
        position = r % group  # replicas share names and shapes: compute them once
        if position not in by_position:
            parallel = dict(tp_rank=position % i.tp, tp_size=i.tp, dp_rank=position // i.tp, dp_size=i.dp,
                            expert_parallel=i.expert_parallel)
            spec = LayoutSpec("vllm", layout_kwargs(config, **parallel))
            by_position[position] = (spec, destination_tensors(sources, spec, quant=quant))
        spec, tensors = by_position[position]
        out.append(ReceiverMeta(r, f"infer{r // i.gpus_per_node}", tensors, spec, quant, device=f"gpu{r}"))
    return out


def destination_tensors(sources: list[SourceParam], spec: LayoutSpec, *, quant: str,
                        skip: tuple[str, ...] = ENGINE_QUANT_SKIP) -> dict[str, DestTensor]:
    """The tensors a layout fills (sized by its pieces and unwritten padding), FP8 ones with their scales.

    ``skip``: names kept in high precision, as ``SyncConfig.quant_skip``.
    """
    layout = make_layout(spec)
    fmt = get_quant_format(quant)
    ends: dict[str, list[int]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for src in sources:
        fp8 = fmt.is_quantized and should_quantize(src.name, src.shape, skip)
        for piece in layout.pieces(src):
            ends[piece.dst] = [max(a, b) for a, b in zip(ends.get(piece.dst, piece.dst_box.ends), piece.dst_box.ends)]
            dtypes[piece.dst] = fmt.dtype if fp8 else src.dtype
    for name, boxes in getattr(layout, "unwritten", dict)().items():
        for box in boxes:
            ends[name] = [max(a, b) for a, b in zip(ends[name], box.ends)]
    out = {}
    for name, shape in ends.items():
        out[name] = DestTensor(name, tuple(shape), dtypes[name])
        if dtypes[name] == torch.float8_e4m3fn:
            out[scale_name(name)] = DestTensor(scale_name(name), fmt.scale_shape(shape), torch.float32)
    return out


def numel(shape: tuple[int, ...]) -> int:
    return Box.full(shape).numel()


def num_params(sources: list[SourceParam]) -> int:
    return sum(numel(s.shape) for s in sources)
