"""Where a process of the inference job stands: its rank and world size.

Engines are launched like trainers (torchrun, or a world of their own), so a receiver
reads its place the same way torch does, instead of defaulting to rank 0 of 1: two
processes both claiming rank 0 would each get half of what the other needs.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def job_rank_and_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Given values first, then torch.distributed's world, then torchrun's ``RANK``/``WORLD_SIZE``, else 0 of 1."""
    if rank is None or world_size is None:
        if dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank = int(os.environ["RANK"]) if rank is None else rank
            world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
        else:
            rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"receiver rank {rank} is outside [0, world_size={world_size})")
    return rank, world_size
