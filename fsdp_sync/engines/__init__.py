"""Engine adapters: an inference engine's live weights as fsdp_sync destinations.

``vllm_worker`` (a vLLM worker extension) and ``sglang_worker`` (an SGLang custom
weight loader) run inside the engines' worker processes and import their engine only
there, so importing fsdp_sync never pulls vLLM or SGLang in. What both share lives
here: which parameters to register, refusing FP8 scale layouts a push cannot fill, and
re-deriving what the engine computed from its weights once a new version is live.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..layouts.vllm import DERIVED, ENGINE_ONLY
from ..meta import clean_name
from ..quant import FP8_DTYPE, scale_name
from ..receiver import WeightReceiver


def registered_name(name: str) -> bool:
    """Whether an engine parameter is registered: not engine-only, not derived from other weights
    (those are re-derived at commit, the way the engine's own reload does)."""
    return not any(re.search(pattern, name) for pattern in ENGINE_ONLY + DERIVED)


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The engine's parameters, as its kernels read them, less those no trainer parameter fills."""
    return {clean_name(n): p.data for n, p in model.named_parameters() if registered_name(n)}


def check_block_fp8(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse, by name, FP8 weights whose scales are not float32 128x128 grids of the logical shape.

    Pushes write ``amax / 448`` per 128x128 block through logical-index views, so any
    strides work (Hopper DeepGEMM keeps an MN-major copy of that grid), but a scale the
    engine re-encoded (UE8M0, packed int32) or a weight it repacked (Marlin) would be
    read wrongly: the engine must keep the checkpoint's format.
    """
    bad = []
    for name, t in tensors.items():
        if t.dtype != FP8_DTYPE:
            continue
        grid = tuple(t.shape[:-2]) + tuple(-(-d // 128) for d in t.shape[-2:])
        s = tensors.get(scale_name(name))
        if s is None or s.dtype != torch.float32 or tuple(s.shape) != grid:
            got = "missing" if s is None else f"{s.dtype} {tuple(s.shape)}"
            bad.append(f"{scale_name(name)!r}: want float32 {grid}, engine holds {got}")
    if bad:
        raise ValueError("the engine re-laid FP8 block scales after loading; run it without that "
                         "post-processing (see docs/layouts.md):\n  " + "\n  ".join(bad))


def copy_into_old(owner: object, attrs: tuple[str, ...], rederive: Callable[[], None]) -> None:
    """Run ``rederive`` (which reassigns ``attrs`` on ``owner``), then copy the results back
    into the old tensors: CUDA graphs captured against them keep reading valid addresses."""
    old = {a: getattr(owner, a) for a in attrs}
    rederive()
    for a, tensor in old.items():
        new = getattr(owner, a)
        if new is not tensor:
            if new.shape != tensor.shape or new.dtype != tensor.dtype:
                raise RuntimeError(f"{type(owner).__name__}.{a} changed from {tensor.dtype}{tuple(tensor.shape)} "
                                   f"to {new.dtype}{tuple(new.shape)} when re-derived")
            tensor.copy_(new)
            setattr(owner, a, tensor)


class Attached:
    """A WeightReceiver on an engine's live weights, and what to re-derive once a version is live."""

    def __init__(self, receiver: WeightReceiver, rederive: Callable[[], None]):
        self.receiver = receiver
        self.rederive = rederive
        self.derived_version: int | None = None

    def wait_for(self, version: int | None = None, timeout: float | None = None) -> int:
        return self.receiver.wait_for(version, timeout)

    def commit(self) -> int | None:
        """Make the newest landed version the one the engine computes with; call between steps.

        Staged receivers copy their shadow buffers in first; in place, the version is
        already in the weights and only what the engine derives from them is refreshed.
        """
        r = self.receiver
        version = r.commit() if r.commit_mode == "staged" else r.landed_version
        if version is not None and version != self.derived_version:
            self.rederive()
            self.derived_version = version
        return version
