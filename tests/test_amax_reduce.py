"""Direct mode's amax all-reduce over real gloo processes: NaN and inf must reach every rank."""

from __future__ import annotations

import math

import torch

from recipes.jobs import next_message, spawn_context, start_job

# Per rank, one amax per block. Rank 0's NaN has the sign bit set, as torch.maximum on
# CPU can produce; rank 2's block 1 is the only NaN there and block 3's only inf.
_NEG_NAN = torch.tensor([-1], dtype=torch.int32).view(torch.float32).item()
AMAX = [
    [_NEG_NAN, 1.0, 0.0, 2.0],
    [3.0, 0.5, 0.0, 7.0],
    [1.0, math.nan, 0.0, math.inf],
]


def reduce_amax(rank: int, world_size: int) -> list[float]:
    from fsdp_sync.packing import all_reduce_amax

    amax = torch.tensor(AMAX[rank], dtype=torch.float32)
    all_reduce_amax(amax, None)
    return amax.tolist()


def test_nan_and_inf_win_the_max_on_every_rank():
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, reduce_amax, len(AMAX), results)
    got = {}
    for _ in AMAX:
        _, rank, _, value = next_message(results, procs, 60)
        got[rank] = value
    for p in procs:
        p.join(10)
    for rank, value in got.items():
        assert math.isnan(value[0]) and math.isnan(value[1]), (rank, value)
        assert value[2:] == [0.0, math.inf], (rank, value)
