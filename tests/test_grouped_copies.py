"""Many small copies in one launch, against copy_."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fsdp_sync.kernels.copy_grouped import MAX_ELEMS, GroupedCopies  # noqa: E402
from tests.test_kernels import DEVICE  # noqa: E402


def _sources():
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(40, 300, generator=gen)
    return [grid[3:35, 10:290],  # a strided box of a scale grid
            torch.randn(5000, generator=gen).to(torch.bfloat16),  # a norm
            torch.randn(2, 9, 130, generator=gen).to(torch.bfloat16),  # 3-D
            torch.randn(33, 17, generator=gen).t(),  # transposed
            torch.randint(0, 255, (7, 300), generator=gen, dtype=torch.uint8),  # FP8 bits
            torch.randn(0, 5, generator=gen)]


def test_small_copies_of_several_dtypes_and_strides_in_one_prepared_launch():
    batch = GroupedCopies(DEVICE)
    pairs = []
    for src in _sources():
        src = src.to(DEVICE)
        # Destinations inside larger buffers, transposed where the source is not: bytes
        # around them must stay as they were.
        buffer = torch.zeros(src.numel() + 64, dtype=src.dtype, device=DEVICE)
        dst = buffer[32:32 + src.numel()].view(src.shape[::-1]).transpose(0, -1) if src.ndim == 2 \
            else buffer[32:32 + src.numel()].view(src.shape)
        assert batch.add(dst, src)
        pairs.append((dst, src, buffer))
    assert len(batch) == len(pairs) - 1  # the empty one queues nothing
    prepared = batch.freeze()
    assert len(batch) == 0
    for round_ in range(2):  # replayed: the second launch copies the sources' new values
        prepared.launch()
        for dst, src, buffer in pairs:
            assert torch.equal(dst.contiguous().view(torch.uint8), src.contiguous().view(torch.uint8)), (round_, src.shape)
            assert not buffer[:32].view(torch.uint8).any() and not buffer[32 + src.numel():].view(torch.uint8).any()
            src.add_(1) if src.dtype != torch.uint8 else src.add_(3)


def test_large_or_mismatched_copies_are_left_to_copy_():
    batch = GroupedCopies(DEVICE)
    big = torch.zeros(MAX_ELEMS + 1, device=DEVICE)
    assert not batch.add(torch.empty_like(big), big)
    x = torch.zeros(4, 4, device=DEVICE)
    assert not batch.add(torch.empty(4, 4, dtype=torch.float16, device=DEVICE), x)
    assert not batch.add(torch.empty(16, device=DEVICE), x)
    assert len(batch) == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_copies_into_a_peer():
    peer = torch.device("cuda", 1)
    torch.ones(1, device="cuda:0").to(peer)  # enables peer access
    srcs = [torch.randn(32, 96, device="cuda:0") for _ in range(300)] + [torch.randn(4096, device="cuda:0").bfloat16()]
    dsts = [torch.empty(s.shape, dtype=s.dtype, device=peer) for s in srcs]
    batch = GroupedCopies(torch.device("cuda", 0))
    for d, s in zip(dsts, srcs):
        assert batch.add(d, s)
    batch.freeze().launch()
    torch.cuda.synchronize()
    assert all(torch.equal(d.cpu(), s.cpu()) for d, s in zip(dsts, srcs))
