"""Metadata both sides publish: what each sender holds and what each receiver needs.

Everything here is plain data with no tensors, so the planner can run on one CPU for
any number of ranks, and the control plane can carry it (``wire`` lists what it carries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

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


# Layouts that slice for tensor parallelism: tp_rank/tp_size default to the receiver's rank and world.
TP_LAYOUTS = ("hf_tp", "vllm", "sglang")


def as_layout_spec(layout: "LayoutSpec | str", kwargs: dict[str, Any] | None = None) -> LayoutSpec:
    """A LayoutSpec from either a spec or a layout name with its kwargs (not both kinds of kwargs)."""
    if isinstance(layout, LayoutSpec):
        if kwargs:
            raise ValueError(f"layout is a LayoutSpec ({layout.name!r}) and layout_kwargs were given too: "
                             "put the kwargs in the LayoutSpec")
        return layout
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a layout name or a LayoutSpec, got {type(layout).__name__}")
    return LayoutSpec(layout, dict(kwargs or {}))


def with_tp_defaults(spec: LayoutSpec, rank: int, world_size: int) -> LayoutSpec:
    """A TP layout given neither tp_rank nor tp_size slices the receiver's world: rank of world_size."""
    if spec.name not in TP_LAYOUTS or "tp_rank" in spec.kwargs or "tp_size" in spec.kwargs:
        return spec
    return LayoutSpec(spec.name, {**spec.kwargs, "tp_rank": rank, "tp_size": world_size})


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
    settings: dict[str, Any] = field(default_factory=dict)  # SyncConfig settings both sides must share
    registration: str = ""  # new at every registration: a dropped receiver that registers again is back


def device_id(device: torch.device) -> str:
    """A process-independent name of a device: the GPU's UUID ("" for CPU memory)."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


def clean_name(name: str) -> str:
    """The HF name of a parameter, without the prefixes of compile/checkpoint wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def source_params(model: nn.Module, *, world_size: int, buffers: tuple[str, ...] = (),
                  rank_of: Callable[..., tuple[int, ...]] | None = None) -> list[SourceParam]:
    """Source metadata for every parameter of an FSDP2 model, for all ranks at once, then
    for the named buffers that match a ``buffers`` pattern (``SyncConfig.buffers``).

    A DTensor's mesh lists the global ranks of every coordinate, so any one rank can
    derive every rank's box without communication; ``rank_of(global_ranks, what=name)``
    turns them into the sender group's ranks (default: the same). A plain tensor (and
    FSDP2 leaves buffers plain) is taken to be replicated on every rank of the group.
    """
    from torch.distributed.tensor import DTensor

    from .param_scan import synced_buffers

    params = []
    for raw_name, p in list(model.named_parameters()) + synced_buffers(model, buffers):
        name = clean_name(raw_name)
        shape = tuple(p.shape)
        if isinstance(p, DTensor):
            mesh = p.device_mesh.mesh
            if rank_of is not None:
                mesh = torch.tensor(rank_of(mesh.reshape(-1).tolist(), what=f"parameter {name!r}")).reshape(mesh.shape)
            mesh_ranks = mesh.tolist()
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
