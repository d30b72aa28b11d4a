"""The model's parameters as a push sees them: their layout key and local shards, cheaply.

Every push must walk the module tree (a parameter may have been added or replaced since
the last one), but FSDP2 keeps the same sharded DTensor objects from step to step. While
each parameter is the same object with the same DTensor spec as last time, the layout
key and the cleaned names are reused: a push of an 8B model then spends well under a
millisecond here, where rebuilding the key every time cost ~3 ms on the H100 machine's CPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .meta import clean_name


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``list(model.named_parameters())``, same names and order, without its generator chain:
    ~4x faster on a transformers model of ~500 modules (1.9 -> 0.5 ms here)."""
    out: list[tuple[str, nn.Parameter]] = []
    seen_modules: set[int] = set()
    seen_params: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        seen_modules.add(id(module))
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                out.append((prefix + name, p))
        for name, child in module._modules.items():
            if child is not None and id(child) not in seen_modules:
                walk(child, prefix + name + ".")

    walk(model, "")
    return out


class ParamScan:
    """Walks ``model.named_parameters()`` once per push; rebuilds the key only when a
    parameter object or its DTensor spec changed."""

    def __init__(self, model: nn.Module, mesh_ranks: Callable[[object], tuple[int, ...]]):
        self.model = model
        self.mesh_ranks = mesh_ranks  # DeviceMesh -> its ranks, cached by the caller
        # (name, param, DTensor spec, or (shape, dtype) of a plain tensor): held, so ids stay unique
        self._seen: list[tuple[str, nn.Parameter, object]] = []
        self._key: tuple = ()
        self._names: list[str] = []
        self._dtensor: list[bool] = []

    def scan(self) -> tuple[tuple, dict[str, torch.Tensor]]:
        """(layout key, {clean name: local shard}). The key compares equal while the model's
        parameter layout (names, shapes, dtypes, placements, meshes) is unchanged."""
        from torch.distributed.tensor import DTensor

        params = named_parameters(self.model)
        if not self._unchanged(params):
            self._seen = [(n, p, _layout_of(p)) for n, p in params]
            self._names = [clean_name(n) for n, _ in params]
            self._dtensor = [isinstance(p, DTensor) for _, p in params]
            self._key = tuple((n, tuple(p.shape), p.dtype, (tuple(p.placements), self.mesh_ranks(p.device_mesh))
                               if dt else None) for (n, p), dt in zip(params, self._dtensor))
        local = {}
        for name, (_, p), dt in zip(self._names, params, self._dtensor):
            # _local_tensor is what to_local() returns, without its autograd Function (~10 us
            # a parameter); values are only read, so a tensor that needs no grad is used as is.
            t = p._local_tensor if dt else p
            local[name] = t.detach() if t.requires_grad else t
        return self._key, local

    def _unchanged(self, params: list[tuple[str, nn.Parameter]]) -> bool:
        if len(params) != len(self._seen):
            return False
        for (name, p), (seen_name, seen_p, layout) in zip(params, self._seen):
            if p is not seen_p or name != seen_name:
                return False
            spec = getattr(p, "_spec", None)
            if spec is not None and spec is not layout:  # a DTensor's spec is replaced, never edited
                return False
            if spec is None and layout != (p.shape, p.dtype):  # p.data = ... or .half() keep the object
                return False
        return True


def _layout_of(p: torch.Tensor) -> object:
    """What tells a parameter's layout changed: its DTensor spec object, or a plain tensor's
    shape and dtype (assigning ``p.data`` or casting the module keeps the Parameter)."""
    spec = getattr(p, "_spec", None)
    return spec if spec is not None else (p.shape, p.dtype)
