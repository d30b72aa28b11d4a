"""copy_all: small pairs through one foreach call, large ones through copy_ each; same result."""

from __future__ import annotations

import torch

from fsdp_sync import copies
from fsdp_sync.copies import copy_all


def test_large_and_small_pairs_land_as_copy_would(monkeypatch):
    monkeypatch.setattr(copies, "LARGE_ELEMS", 64)  # so that a few tensors count as large on CPU
    gen = torch.Generator().manual_seed(0)
    srcs = [torch.randn(s, generator=gen) for s in [(4, 4), (16, 8), (8, 32), (3,), (0, 5)]]
    srcs[2] = srcs[2].t()  # a strided large source
    dsts = [torch.empty(s.shape, dtype=torch.bfloat16 if i % 2 else torch.float32) for i, s in enumerate(srcs)]
    copy_all(list(zip(dsts, srcs)))
    for d, s in zip(dsts, srcs):
        assert torch.equal(d, s.to(d.dtype))


def test_nothing_to_copy():
    copy_all([])
    copy_all([(torch.empty(0), torch.empty(0))])
