"""transport='auto': one decision per plan, from where the ranks are."""

import logging

import torch

from fsdp_sync.meta import DestTensor, LayoutSpec, ReceiverMeta
from fsdp_sync.transport.auto import resolve
from tests.harness import check_cases, new_port, run_cases
from tests.sync_workers import Case


def _receiver(host: str, device: str) -> ReceiverMeta:
    return ReceiverMeta(0, host, {"w": DestTensor("w", (2,), torch.float32)}, LayoutSpec(), "none", device=device)


def test_one_host_writes_one_sided():
    assert resolve(["a", "a"], [_receiver("a", "GPU-1")]) == "cuda_ipc"
    assert resolve(["a"], [_receiver("a", "")]) == "shm"


def test_across_hosts_falls_back_to_nccl_and_says_why(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve(["a"], [_receiver("b", "GPU-1")]) == "nccl"  # no RDMA device here
    assert "falling back to NCCL" in caplog.text
    assert resolve(["a"], [_receiver("b", "")]) == "gloo"


def test_auto_end_to_end_on_one_host():
    case = Case(name="auto", model="llama", mesh=(2,), num_receivers=1, tp=1, quant="fp8_block", mode="direct",
                port=new_port(), transport="auto")
    check_cases(run_cases([case], num_senders=2, num_receivers=1), [case], 1)
