"""Sender boxes from placements agree with DTensor's own rule for every rank."""

import itertools

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from fsdp_sync.boxes import check_exact_cover
from fsdp_sync.sharding import shard_box, shard_groups

CASES = [
    ((10, 3), (4,), [Shard(0)]),  # uneven: 3, 3, 3, 1
    ((2, 5), (4,), [Shard(0)]),  # fewer rows than ranks
    ((9, 7), (2, 3), [Replicate(), Shard(0)]),  # HSDP
    ((9, 7), (2, 3), [Shard(0), Shard(1)]),  # 2-D sharding
    ((9, 7), (2, 2), [Shard(0), Shard(0)]),  # nested on one dim
    ((8, 6, 4), (2, 2), [Shard(2), Replicate()]),
]


@pytest.mark.parametrize("shape,mesh_shape,placements", CASES)
def test_boxes_match_dtensor(shape, mesh_shape, placements):
    for coord in itertools.product(*(range(n) for n in mesh_shape)):
        box = shard_box(shape, mesh_shape, coord, placements)
        sizes, offsets = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        assert box.sizes == tuple(sizes), coord
        if box.numel():
            assert box.offsets == tuple(offsets), coord


def test_hsdp_groups_are_disjoint_full_covers():
    mesh = [[0, 1, 2], [3, 4, 5]]
    groups = shard_groups((10, 4), mesh, [Replicate(), Shard(0)])
    assert [g.ranks for g in groups] == [(0, 1, 2), (3, 4, 5)]
    for g in groups:
        assert check_exact_cover(g.boxes, (10, 4)) is None


def test_partial_placement_is_refused_by_name():
    with pytest.raises(ValueError, match="'w'.*not supported"):
        shard_box((4, 4), (2,), (0,), [Partial()], name="w")
