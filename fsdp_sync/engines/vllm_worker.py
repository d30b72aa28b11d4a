"""A vLLM worker extension: fsdp_sync pushes land in the engine's own weight buffers.

Use::

    llm = LLM(model, worker_extension_cls="fsdp_sync.engines.vllm_worker.FsdpSyncWorkerExtension")
    llm.collective_rpc("fsdp_sync_register", args=(asdict(sync_config),))
    ...                                                  # the trainer pushes version v
    llm.collective_rpc("fsdp_sync_wait_for", args=(v, 60.0))
    llm.collective_rpc("fsdp_sync_commit")               # between generate() calls

Scale layout targeted: the *runtime* one. Registration runs after vLLM's
``process_weights_after_loading``, on the parameters its kernels read (the tensors that
pass replaced are the ones registered). Block-FP8 weights must keep float32
``weight_scale_inv`` / ``w13_weight_scale_inv`` grids of [ceil(out/128), ceil(in/128)]
(per expert for w13/w2), in any strides: Hopper DeepGEMM's MN-major, TMA-aligned copy
of that grid is written through logical-index views. If vLLM re-encoded or requantized
scales (DeepGEMM UE8M0 on Blackwell, ``is_deep_gemm_e8m0_used``), repacked weights
(Marlin) or shuffled experts (FlashInfer MoE), registration refuses by tensor name
instead of writing values the kernels would misread: run vLLM without that
post-processing. MoE layers are checked by the backend each one chose
(``vllm_moe.refuse_relaying_moe_backends``): vLLM 0.33 selects it per layer through
``kernel_config.moe_backend``, not through environment variables. What vLLM derives
from weights is not registered but re-derived at commit: MLA's ``W_UK_T`` / ``W_UV``
(from ``kv_b_proj``), which vLLM 0.33 registers as parameters, by the attention layer's
own ``process_weights_after_loading``, as vLLM's reload does, copied into their old
storage so captured CUDA graphs stay valid.

Checked against vLLM 0.33.0 on CPU (tests/test_vllm_fixtures.py, docs/layouts.md). On
vLLM 0.33, the native weight-transfer backend (``vllm_transfer``: ``weight_transfer_config``
and vLLM's own update calls) runs the same registration (``attach``); this extension is
the path for versions without that API.
"""

from __future__ import annotations

from typing import Any

from ..config import SyncConfig
from ..layouts.vllm import layout_kwargs
from ..receiver import WeightReceiver
from . import Attached, check_block_fp8, copy_into_old, live_tensors
from .vllm_moe import moe_backends, refuse_relaying_moe_backends


class FsdpSyncWorkerExtension:
    """Mixed into vLLM's GPU worker; every method runs on every worker through ``collective_rpc``."""

    def fsdp_sync_register(self, config: dict[str, Any], commit: str = "staged", rank: int | None = None,
                           world_size: int | None = None) -> dict[str, Any]:
        """Register this worker's live weights as the destinations of rank ``rank`` (default:
        DP rank x TP size + TP rank) of the inference job; returns what was registered."""
        self._fsdp_sync = attach(self.vllm_config, self.model_runner.model, SyncConfig(**config), commit=commit,
                                 rank=rank, world_size=world_size)
        receiver = self._fsdp_sync.receiver
        return {"rank": receiver.rank, "tensors": len(receiver.tensors), "layout": dict(receiver.layout.kwargs)}

    def fsdp_sync_wait_for(self, version: int | None = None, timeout: float | None = None) -> int:
        """Block until ``version`` (default: any newer one) has landed in this worker."""
        return self._fsdp_sync.wait_for(version, timeout)

    def fsdp_sync_commit(self) -> int | None:
        """Make the newest landed version live; returns it. Call between engine steps."""
        return self._fsdp_sync.commit()


def attach(vllm_config, model, config: SyncConfig, *, commit: str = "staged", rank: int | None = None,
           world_size: int | None = None) -> Attached:
    """A WeightReceiver on a vLLM worker's live weights, after refusing what a push cannot fill.

    Shared by the worker extension and the native weight-transfer backend
    (``vllm_transfer_engine``): rank ``rank`` (default: DP rank x TP size + TP rank) of
    an inference job of ``world_size`` (default: DP size x TP size) ranks.
    """
    pc = vllm_config.parallel_config
    if pc.pipeline_parallel_size > 1:
        raise ValueError("fsdp_sync's vllm layout covers TP, DP and EP; pipeline_parallel_size must be 1")
    if getattr(pc, "enable_eplb", False):
        raise ValueError("fsdp_sync cannot place redundant (EPLB) experts; run vLLM without --enable-eplb")
    _refuse_e8m0()
    refuse_relaying_moe_backends(moe_backends(model))
    kwargs = engine_layout_kwargs(vllm_config, model)
    tp_rank, tp_size, dp_rank, dp_size = kwargs["tp_rank"], kwargs["tp_size"], kwargs["dp_rank"], kwargs["dp_size"]
    tensors = live_tensors(model)
    check_block_fp8(tensors)
    receiver = WeightReceiver(tensors, config=config, layout="vllm", layout_kwargs=kwargs,
                              rank=dp_rank * tp_size + tp_rank if rank is None else rank,
                              world_size=dp_size * tp_size if world_size is None else world_size, commit=commit)
    act_dtype = vllm_config.model_config.dtype
    return Attached(receiver, lambda: _rederive_mla(model, act_dtype))


def engine_layout_kwargs(vllm_config, model) -> dict[str, Any]:
    """The ``vllm`` layout's keywords for this worker, read from the running engine."""
    import vllm
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    pc = vllm_config.parallel_config
    return layout_kwargs(vllm_config.model_config.hf_text_config, tp_rank=get_tensor_model_parallel_rank(),
                         tp_size=get_tensor_model_parallel_world_size(), dp_rank=pc.data_parallel_rank,
                         dp_size=pc.data_parallel_size, expert_parallel=bool(pc.enable_expert_parallel),
                         expert_placement=_placement(model, pc), vocab_padding=_vocab_padding(model),
                         vllm_version=vllm.__version__)


def _refuse_e8m0() -> None:
    try:
        from vllm.utils.deep_gemm import is_deep_gemm_e8m0_used
    except ImportError:  # older vLLM: no E8M0 requantization to refuse
        return
    if is_deep_gemm_e8m0_used():
        raise ValueError("vLLM requantizes FP8 weights to power-of-two (UE8M0) scales for DeepGEMM; pushed "
                         "amax/448 scales would be misread. Disable it (VLLM_USE_DEEP_GEMM_E8M0=0)")


def _placement(model, parallel_config) -> str:
    """The expert placement the MoE layers actually use (vLLM falls back to linear when it must)."""
    for module in model.modules():
        strategy = getattr(module, "expert_placement_strategy", None)
        if isinstance(strategy, str) and hasattr(module, "local_num_experts"):
            return strategy
    return getattr(parallel_config, "expert_placement_strategy", "linear")


def _vocab_padding(model) -> int:
    for module in model.modules():
        if type(module).__name__ == "VocabParallelEmbedding":
            return int(module.padding_size)
    return 64


def _rederive_mla(model, act_dtype) -> None:
    """Recompute MLA's absorbed ``W_UK_T``/``W_UV`` from the new ``kv_b_proj``, in their old storage.

    The owner is the MLA attention layer, or in older vLLM its ``impl``; both compute
    the pair in ``process_weights_after_loading(act_dtype)``.
    """
    seen = set()
    for module in model.modules():
        for owner in (module, getattr(module, "impl", None)):
            if owner is None or id(owner) in seen or not hasattr(owner, "W_UK_T") or not hasattr(owner, "W_UV"):
                continue
            seen.add(id(owner))
            copy_into_old(owner, ("W_UK_T", "W_UV"), lambda o=owner: o.process_weights_after_loading(act_dtype))
