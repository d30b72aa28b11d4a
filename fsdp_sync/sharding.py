"""Which box of a parameter each training rank holds, read from DTensor placements.

One rule covers FSDP, HSDP, TP and EP: walk the mesh axes in order; a ``Shard(dim)``
axis splits the current extent of ``dim`` the way ``torch.chunk`` does (so trailing
ranks may hold 0 rows), a ``Replicate`` axis copies it. Ranks that differ only along
replicate axes hold the same boxes; fixing the replicate coordinates gives a *shard
group*, whose ranks together hold every element exactly once. Shard groups are the
disjoint meshes that the planner spreads work over.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from .boxes import Box


@dataclass(frozen=True, slots=True)
class ShardGroup:
    """Ranks that together hold a whole parameter once, and the box each of them holds."""

    ranks: tuple[int, ...]
    boxes: tuple[Box, ...]

    def box_of(self, rank: int) -> Box:
        return self.boxes[self.ranks.index(rank)]


def _chunk(offset: int, size: int, num_chunks: int, index: int) -> tuple[int, int]:
    """``torch.chunk`` semantics: chunks of ceil(size/n), the last ones short or empty."""
    chunk = -(-size // num_chunks) if size else 0
    start = min(index * chunk, size)
    return offset + start, max(0, min(chunk, size - start))


def shard_box(shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
              placements: Sequence[Placement], *, name: str = "?") -> Box:
    """The box held by the rank at ``coordinate`` of a mesh with these placements."""
    offsets = [0] * len(shape)
    sizes = [int(s) for s in shape]
    for axis, placement in enumerate(placements):
        if isinstance(placement, Shard) and type(placement) is Shard:
            dim = placement.dim % len(shape)
            offsets[dim], sizes[dim] = _chunk(offsets[dim], sizes[dim], mesh_shape[axis], coordinate[axis])
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"parameter {name!r}: placement {placement} on mesh axis {axis} is not supported "
                "(only Shard and Replicate describe a materialized weight)"
            )
    return Box(tuple(offsets), tuple(sizes))


def shard_groups(shape: Sequence[int], mesh_ranks: Sequence, placements: Sequence[Placement],
                 *, name: str = "?") -> tuple[ShardGroup, ...]:
    """All shard groups of a parameter on a mesh given as a nested list of global ranks."""
    mesh_shape = _nested_shape(mesh_ranks)
    shard_axes = [a for a, p in enumerate(placements) if isinstance(p, Shard)]
    replicate_axes = [a for a in range(len(mesh_shape)) if a not in shard_axes]
    groups = []
    for rep_coord in itertools.product(*(range(mesh_shape[a]) for a in replicate_axes)):
        ranks, boxes = [], []
        for shard_coord in itertools.product(*(range(mesh_shape[a]) for a in shard_axes)):
            coord = [0] * len(mesh_shape)
            for a, c in zip(replicate_axes, rep_coord):
                coord[a] = c
            for a, c in zip(shard_axes, shard_coord):
                coord[a] = c
            ranks.append(_at(mesh_ranks, coord))
            boxes.append(shard_box(shape, mesh_shape, coord, placements, name=name))
        groups.append(ShardGroup(tuple(ranks), tuple(boxes)))
    return tuple(groups)


def _nested_shape(nested: Sequence) -> tuple[int, ...]:
    shape = []
    while isinstance(nested, (list, tuple)):
        shape.append(len(nested))
        nested = nested[0]
    return tuple(shape)


def _at(nested: Sequence, coord: Sequence[int]) -> int:
    for c in coord:
        nested = nested[c]
    return int(nested)
