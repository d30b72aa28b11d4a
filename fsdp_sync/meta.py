"""Metadata both sides publish: what each sender holds and what each receiver needs.

Everything here is plain, picklable data with no tensors, so the planner can run on
one CPU for any number of ranks, and the control plane can carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .boxes import Box
from .sharding import ShardGroup, shard_groups

# Prefixes that wrappers add to parameter names; the HF name is what both sides share.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class SourceParam:
    """One training parameter: its global shape and dtype, and who holds which box."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    groups: tuple[ShardGroup, ...]

    @property
    def nbytes(self) -> int:
        return Box.full(self.shape).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class DestTensor:
    """A receiver's destination tensor as the planner sees it (no storage)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class LayoutSpec:
    """Which layout maps source boxes to this receiver's tensors, with its arguments."""

    name: str = "identity"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceiverMeta:
    """What a receiver rank registers on the control plane."""

    rank: int
    host: str
    tensors: dict[str, DestTensor]
    layout: LayoutSpec
    quant: str
    transport_info: dict[str, Any] = field(default_factory=dict)
    gated: bool = False  # senders must wait for this receiver's ready key before writing
    device: str = ""  # GPU UUID (or "" on CPU): tells the planner which pairs share a device


def device_id(device: torch.device) -> str:
    """A process-independent name of a device: the GPU's UUID ("" for CPU memory)."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


def clean_name(name: str) -> str:
    """The HF name of a parameter, without the prefixes of compile/checkpoint wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def source_params(model: nn.Module, *, world_size: int, buffers: tuple[str, ...] = ()) -> list[SourceParam]:
    """Source metadata for every parameter of an FSDP2 model, for all ranks at once, then
    for the named buffers that match a ``buffers`` pattern (``SyncConfig.buffers``).

    A DTensor's mesh lists the global ranks of every coordinate, so any one rank can
    derive every rank's box without communication. A plain tensor (and FSDP2 leaves
    buffers plain) is taken to be replicated on every rank of the world.
    """
    from torch.distributed.tensor import DTensor

    from .param_scan import synced_buffers

    params = []
    for raw_name, p in list(model.named_parameters()) + synced_buffers(model, buffers):
        name = clean_name(raw_name)
        shape = tuple(p.shape)
        if isinstance(p, DTensor):
            mesh_ranks = p.device_mesh.mesh.tolist()
            if not isinstance(mesh_ranks, list):
                mesh_ranks = [mesh_ranks]
            groups = shard_groups(shape, mesh_ranks, p.placements, name=name)
        else:
            full = Box.full(shape)
            groups = tuple(ShardGroup((r,), (full,)) for r in range(world_size))
        params.append(SourceParam(name, shape, p.dtype, groups))
    return params


def dest_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, DestTensor]:
    return {clean_name(n): DestTensor(clean_name(n), tuple(t.shape), t.dtype) for n, t in tensors}
