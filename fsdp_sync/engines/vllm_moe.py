"""Which vLLM MoE backends keep the expert weights in the layout a push writes.

A push writes ``w13_weight`` as the checkpoint stacks it: [E_local, 2 I_tp, H], gate rows
first, and ``w2_weight`` as [E_local, H, I_tp] (block-FP8 scales: their 128-block grids).
vLLM 0.33 picks a MoE kernel per layer (``kernel_config.moe_backend``, ``auto`` by
default: by platform, quantization and shape) and its post-processing may re-lay those
weights for that kernel. Some changes are silent: FlashInfer CUTLASS swaps the gate and
up halves of w13 (same shape), TRT-LLM and ROCm AITER shuffle, Marlin/Humming and the
CPU kernels repack, XPU transposes, MoonEP regroups. The backend is read from each
layer's quant method (``unquantized_backend``, ``fp8_backend``: enums named
``*MoeBackend``); a layer whose backend is not known to keep the layout is refused by
name, never written. Backends are named as in vLLM 0.33's ``fused_moe/oracle``.
"""

from __future__ import annotations

import enum
from typing import Iterable

# (enum class name, member name) pairs whose post-processing leaves w13/w2 and their block
# scales in the checkpoint layout (``oracle/unquantized.py``, ``oracle/fp8.py``
# ``convert_to_*_kernel_format``). DeepGEMM may re-encode scales; check_block_fp8 and the
# UE8M0 check in vllm_worker refuse the cases that changes.
LAYOUT_KEEPING = {
    "UnquantizedMoeBackend": {"TRITON", "BATCHED_TRITON"},
    "Fp8MoeBackend": {"TRITON", "BATCHED_TRITON", "VLLM_CUTLASS", "BATCHED_VLLM_CUTLASS", "DEEPGEMM",
                      "BATCHED_DEEPGEMM"},
}


def moe_backends(model) -> dict[str, tuple[str, str]]:
    """layer name -> (backend enum class, member) for every module whose quant method names one."""
    out = {}
    for prefix, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        for value in vars(method).values() if method is not None else ():
            if isinstance(value, enum.Enum) and type(value).__name__.endswith("MoeBackend"):
                out[prefix] = (type(value).__name__, value.name)
    return out


def refuse_relaying_moe_backends(backends: dict[str, tuple[str, str]] | Iterable) -> None:
    """Raise ValueError naming every layer whose MoE backend re-lays w13/w2 after loading."""
    bad = [f"{layer}: {kind}.{name}" for layer, (kind, name) in dict(backends).items()
           if name not in LAYOUT_KEEPING.get(kind, ())]
    if bad:
        keep = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in LAYOUT_KEEPING.items())
        raise ValueError("these MoE layers chose a backend that re-lays expert weights after loading, so a push "
                         "would write a layout their kernels misread:\n  " + "\n  ".join(bad) +
                         f"\nstart vLLM with a layout-keeping backend (--kernel-config.moe_backend, e.g. "
                         f"triton); known to keep it: {keep}")
