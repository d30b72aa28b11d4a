"""The SGLang equivalent of the vLLM worker extension, through SGLang's custom weight loader.

SGLang has no worker extensions, but ``update_weights_from_tensor`` runs a custom loader
in every TP worker, between scheduler steps, with the live model. ``fsdp_sync_rpc`` is
that loader; its one "tensor" carries a command. Use::

    engine = sgl.Engine(model_path=..., custom_weight_loader=[LOADER], disable_shared_experts_fusion=True)
    engine.update_weights_from_tensor(rpc("register", config=asdict(sync_config)), load_format=LOADER)
    ...                                                  # the trainer pushes version v
    engine.update_weights_from_tensor(rpc("wait_for", version=v, timeout=60.0), load_format=LOADER)
    engine.update_weights_from_tensor(rpc("commit"), load_format=LOADER)

The loader returns nothing to the caller (SGLang reports success or the raised error);
versions are visible on the control plane, where each receiver acknowledges them.

Scale layout targeted: the runtime one, registered after SGLang's post-load
processing, under the same rules as the vLLM adapter: float32 128x128 block grids of
each FP8 weight's logical shape, any strides; re-encoded scales (DeepGEMM UE8M0) are
refused by name. DeepSeek's absorbed ``w_kc``/``w_vc`` are re-derived at commit by the
model's own ``post_load_weights``, which copies into the existing tensors. Shared
experts fused into the routed experts (SGLang's default for DeepSeek-V3 on 8 GPUs) and
DeepEP's replicated shared experts are not covered: launch with
``--disable-shared-experts-fusion`` and without DeepEP.

Written against SGLang main as of 2025-2026 (see docs/layouts.md); not run live here:
SGLang 0.5.23 from PyPI cannot build its models on a CPU-only machine (README, "SGLang on
CPU"). Read against 0.5.23's source, registration would fail there: it has no
``sglang.srt.layers.dp_attention.get_attention_tp_size`` any more (attention TP now comes
from its runtime context); the UE8M0 guard looks in both places ``deep_gemm_wrapper`` has
lived. Not verified on any release.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..config import SyncConfig
from ..layouts.vllm import layout_kwargs
from ..receiver import WeightReceiver
from . import Attached, check_block_fp8, live_tensors

LOADER = "fsdp_sync.engines.sglang_worker.fsdp_sync_rpc"
_COMMAND = "fsdp_sync"


def rpc(op: str, **kwargs: Any) -> list[tuple[str, torch.Tensor]]:
    """The ``named_tensors`` argument that makes every worker run ``op`` ("register", "wait_for", "commit")."""
    payload = json.dumps({"op": op, **kwargs}).encode()
    return [(_COMMAND, torch.frombuffer(bytearray(payload), dtype=torch.uint8))]


def fsdp_sync_rpc(model: torch.nn.Module, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    """SGLang's custom weight loader: decode the command and run it on this worker."""
    (name, tensor), = named_tensors
    if name != _COMMAND:
        raise ValueError(f"fsdp_sync_rpc takes one tensor named {_COMMAND!r}, got {name!r}")
    command = json.loads(bytes(tensor.cpu().tolist()).decode())
    op = command.pop("op")
    if op == "register":
        model._fsdp_sync = _register(model, **command)
    elif op == "wait_for":
        model._fsdp_sync.wait_for(command.get("version"), command.get("timeout"))
    elif op == "commit":
        model._fsdp_sync.commit()
    else:
        raise ValueError(f"unknown fsdp_sync op {op!r}; valid: ['commit', 'register', 'wait_for']")


def _register(model: torch.nn.Module, *, config: dict[str, Any], commit: str = "staged", rank: int | None = None,
              world_size: int | None = None) -> Attached:
    from sglang.srt.distributed import (get_moe_expert_parallel_world_size, get_tensor_model_parallel_rank,
                                        get_tensor_model_parallel_world_size)
    from sglang.srt.layers.dp_attention import get_attention_tp_size

    tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    if get_attention_tp_size() != tp_size:
        raise ValueError("fsdp_sync's sglang layout assumes attention TP = TP; run without --enable-dp-attention")
    fused = [n for n, m in model.named_modules() if getattr(m, "num_fused_shared_experts", 0)]
    if fused:
        raise ValueError(f"{fused[0]!r} holds shared experts fused into the routed ones, which fsdp_sync cannot "
                         "place; launch SGLang with --disable-shared-experts-fusion")
    _refuse_ue8m0()
    kwargs = layout_kwargs(model.config, tp_rank=tp_rank, tp_size=tp_size,
                           ep_size=get_moe_expert_parallel_world_size())
    tensors = live_tensors(model)
    check_block_fp8(tensors)
    receiver = WeightReceiver(tensors, config=SyncConfig(**config), layout="sglang", layout_kwargs=kwargs,
                              rank=tp_rank if rank is None else rank,
                              world_size=tp_size if world_size is None else world_size, commit=commit)
    return Attached(receiver, getattr(model, "post_load_weights", lambda: None))


def _refuse_ue8m0() -> None:
    try:  # SGLang 0.5.23 keeps it in layers/, older main in layers/quantization/
        from sglang.srt.layers import deep_gemm_wrapper
    except ImportError:
        try:
            from sglang.srt.layers.quantization import deep_gemm_wrapper
        except ImportError:
            return
    if getattr(deep_gemm_wrapper, "DEEPGEMM_SCALE_UE8M0", False):
        raise ValueError("SGLang requantizes FP8 weights to power-of-two (UE8M0) scales for DeepGEMM; pushed "
                         "amax/448 scales would be misread. Disable DeepGEMM's UE8M0 scales")
