"""The RDMA transport end to end, on a host with an RDMA device (hardware, or soft-RoCE: docs/rdma.md).

Real FSDP2 trainer processes push into real receiver processes over RC queue pairs,
and every receiver must hold bit-exactly what the reference says, as over gloo.
Where no device exists these tests skip and say why; the dma-buf export of CUDA
segments needs only a GPU and runs with ``pytest -m gpu``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fsdp_sync.transport.rdma_discovery import rdma_available
from tests.harness import all_cases, check_cases, new_port, run_cases
from tests.sync_workers import Case

AVAILABLE, REASON = rdma_available()
needs_rdma = pytest.mark.skipif(not AVAILABLE, reason=f"needs an RDMA device: {REASON}")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.mark.rdma
@needs_rdma
def test_fsdp2_to_tp2_over_rdma():
    cases = all_cases("rdma-f2t2", model="llama", mesh=(2,), num_receivers=2, tp=2, transport="rdma")
    check_cases(run_cases(cases, num_senders=2, num_receivers=2), cases, 2)


@pytest.mark.rdma
@needs_rdma
def test_odd_shapes_many_buckets_over_rdma():
    """A small watermark makes many buckets: both staging slots are reused within each push."""
    cases = all_cases("rdma-odd", model="odd", mesh=(4,), num_receivers=1, tp=1, transport="rdma", watermark_mb=0.05)
    check_cases(run_cases(cases, num_senders=4, num_receivers=1), cases, 1)


@pytest.mark.rdma
@needs_rdma
def test_dead_sender_errors_every_receiver_over_rdma():
    case = Case(name="rdma-dead", model="llama", mesh=(2,), num_receivers=2, tp=2, quant="fp8_block", mode="direct",
                port=new_port(), transport="rdma", watermark_mb=0.2, kill_sender_at_version=2, timeout_s=10.0)
    out = run_cases([case], num_senders=2, num_receivers=2, timeout_s=120)
    for r in (0, 1):
        assert out[("receiver", r, case.name, 1)]["version"] == 1
        second = out[("receiver", r, case.name, 2)]
        assert "error" in second, second
        # in_place: the live tensors hold part of push 2, which is no version at all.
        assert second["version"] is None, "a receiver reported a version while its tensors were torn"
    assert "error" in out[("trainer", 0, case.name, 2)]


@pytest.mark.gpu
@pytest.mark.rdma
@needs_rdma
@needs_two_gpus
def test_gpu_memory_over_rdma():
    """Trainer on GPU0, receiver on GPU1: staging and destinations registered as dma-buf."""
    cases = all_cases("rdma-gpu", model="llama", mesh=(1,), num_receivers=1, tp=1, transport="rdma", device="cuda")
    check_cases(run_cases(cases, num_senders=1, num_receivers=1, receiver_gpu_offset=1), cases, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_segments_export_as_dmabuf():
    """Destination tensors map to caching-allocator segments, and each segment exports as one dma-buf."""
    from fsdp_sync.transport.rdma_memory import dmabuf_fd, segments_for

    small = [torch.empty(1000, device="cuda") for _ in range(3)]  # one small-pool segment holds all three
    large = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    segments = segments_for([*small, large])
    for t in [*small, large]:
        assert any(s.base <= t.data_ptr() and t.data_ptr() + t.nbytes <= s.base + s.length for s in segments)
    assert len(segments) <= 2
    for segment in segments:
        fd = dmabuf_fd(segment)
        try:
            assert os.fstat(fd).st_size in (0, segment.length)  # a dma-buf reports its size or 0
        finally:
            os.close(fd)
