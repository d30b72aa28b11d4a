"""Which processes form the trainer job: the default world, or a group or mesh inside it.

A trainer world often holds more than the policy's FSDP ranks (a reference model, a
reward model, rollout workers). A sender then spans only the ranks of the mesh its model
is sharded on: ranks, shard groups and the controller are counted inside that group, so
global rank 0 need not be a sender at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.distributed as dist

from .errors import PlanError


@dataclass(frozen=True)
class TrainerGroup:
    """The sender ranks: ``rank`` of ``size`` inside ``group`` (None: the default world)."""

    group: object | None
    global_ranks: tuple[int, ...]  # of group ranks 0 .. size - 1
    rank: int

    @property
    def size(self) -> int:
        return len(self.global_ranks)

    def local_ranks(self, global_ranks: Sequence[int], *, what: str) -> tuple[int, ...]:
        """Group ranks of the given global ranks; a rank outside the group is a PlanError naming ``what``."""
        return local_ranks(global_ranks, self.global_ranks, what=what)

    def new_group(self, ranks: Sequence[int]):
        """A process group of these group ranks, made by its members only.

        With a given group, ranks outside it never call in, so the creation must be local
        to the members; over the default world it is the plain collective ``new_group``.
        """
        members = [self.global_ranks[r] for r in ranks]
        if self.group is None:
            return dist.new_group(members)
        return dist.new_group(members, use_local_synchronization=True)

    def broadcast_from_first(self, objects: list, device=None) -> None:
        """``objects`` of group rank 0, on every rank of the group."""
        if self.group is None:
            dist.broadcast_object_list(objects, src=0, device=device)
        else:
            dist.broadcast_object_list(objects, group=self.group, group_src=0, device=device)


def local_ranks(global_ranks: Sequence[int], members: Sequence[int], *, what: str) -> tuple[int, ...]:
    """Positions of ``global_ranks`` in ``members``; a rank that is not a member is refused."""
    index = {g: i for i, g in enumerate(members)}
    outside = [g for g in global_ranks if g not in index]
    if outside:
        raise PlanError(f"{what} lives on global ranks {sorted(set(outside))}, outside the sender's group "
                        f"(global ranks {list(members)}): pass WeightSender(group=) the mesh the model is "
                        f"sharded on")
    return tuple(index[g] for g in global_ranks)


def trainer_group(group=None) -> TrainerGroup:
    """Resolve ``WeightSender(group=)``: None (the default world), a ProcessGroup or a DeviceMesh.

    A DeviceMesh of several dims (HSDP) spans all its ranks: its flattened group.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        return TrainerGroup(None, tuple(range(dist.get_world_size())), dist.get_rank())
    if isinstance(group, DeviceMesh):
        group = group.get_group() if group.ndim == 1 else group._flatten().get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"WeightSender(group=) takes a ProcessGroup or a DeviceMesh, not {type(group).__name__}")
    members = tuple(dist.get_global_rank(group, r) for r in range(group.size()))
    if dist.get_rank() not in members:
        raise ValueError(f"global rank {dist.get_rank()} is not in the sender's group {list(members)}")
    return TrainerGroup(group, members, members.index(dist.get_rank()))
