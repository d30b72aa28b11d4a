"""GPU sync over CUDA IPC and NCCL: the same bit-exactness as on CPU, trainer and engine in separate processes."""

from __future__ import annotations

import pytest
import torch

from tests.harness import all_cases, check_cases, run_cases

pytestmark = pytest.mark.gpu
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@needs_two
@pytest.mark.parametrize("transport", ["cuda_ipc", "nccl"])
def test_disaggregated_1_to_1(transport):
    """Trainer on GPU0, receiver on GPU1: IPC writes straight into the other process's buffers."""
    cases = all_cases(f"g11-{transport}", model="llama", mesh=(1,), num_receivers=1, tp=1, transport=transport,
                      device="cuda")
    check_cases(run_cases(cases, num_senders=1, num_receivers=1, receiver_gpu_offset=1), cases, 1)


@needs_two
def test_colocated_fsdp2_to_tp2_ipc():
    """FSDP over both GPUs, TP=2 receivers on the same GPUs, in the engine's own processes.

    (NCCL cannot serve this: it refuses two ranks of one communicator on one GPU.)
    """
    cases = all_cases("g22-ipc", model="llama", mesh=(2,), num_receivers=2, tp=2, transport="cuda_ipc",
                      device="cuda", extra={"memory_back": True})
    out = run_cases(cases, num_senders=2, num_receivers=2, receiver_gpu_offset=0)
    check_cases(out, cases, 2)
    # Both senders open every receiver's buffers; once they closed, each receiver gets its
    # memory back (one export per sender: a shared one kept the blocks in torch's IPC limbo).
    for case in cases:
        for r in range(2):
            before, after = out[("receiver", r, case.name, "reserved")]
            assert after <= before, f"{case.name}: receiver {r} holds {after - before} bytes more after close"


@needs_two
def test_odd_shapes_small_buckets_ipc():
    cases = all_cases("godd", model="odd", mesh=(2,), num_receivers=1, tp=1, transport="cuda_ipc", device="cuda",
                      watermark_mb=0.05)
    check_cases(run_cases(cases, num_senders=2, num_receivers=1, receiver_gpu_offset=1), cases, 1)


@needs_two
@pytest.mark.parametrize("kernels", ["grouped", "per_box"])
def test_grouped_and_per_box_launches_land_the_same_bytes(kernels):
    """Both FP8 launch strategies: over IPC (stores into the peer, FSDP 2 -> 1) and NCCL (staged, 1 -> 1)."""
    for transport, senders in (("cuda_ipc", 2), ("nccl", 1)):
        cases = [c for c in all_cases(f"gk-{kernels}-{transport}", model="odd", mesh=(senders,), num_receivers=1,
                                      tp=1, transport=transport, device="cuda", watermark_mb=0.05, kernels=kernels)
                 if c.quant != "none"]
        check_cases(run_cases(cases, num_senders=senders, num_receivers=1, receiver_gpu_offset=1), cases, 1)


@pytest.mark.parametrize("quant, shadow", [("none", "device"), ("fp8_block", "device"), ("fp8_rowwise", "device"),
                                           ("none", "pinned"), ("fp8_block", "pinned")])
def test_delta_over_cuda_ipc_equals_full_over_50_steps_on_one_gpu(quant, shadow):
    """The delta contract on the GPU: trainer and engine processes on one GPU, the delta
    sender's grouped launches storing changed codes (or values) straight into the receiver's
    buffers over CUDA IPC; a full sender beside it, AdamW steps between pushes, and the two
    destination sets equal bit for bit at each of 50 versions. With ``delta_shadow="pinned"``
    the launches read and write shadows in pinned host memory."""
    from tests import delta_workers
    from tests.delta_workers import DeltaCase
    from tests.harness import new_port

    case = DeltaCase(name=f"gpu-delta-{quant}-{shadow}", quant=quant, mode="direct", transport="cuda_ipc",
                     port=new_port(), full_port=new_port(), delta="on", device="cuda", lr=1e-5, delta_shadow=shadow)
    out = run_cases([case], num_senders=1, num_receivers=1, receiver_gpu_offset=0, workers=delta_workers,
                    timeout_s=300)
    assert not [k for k in out if k[2] == "process"], {k: v for k, v in out.items() if k[2] == "process"}
    for version, held, error, differ in out[("receiver", 0, case.name, "report")]:
        assert error is None and held == version, (version, error)
        assert differ == [], f"receiver differs from the full push at version {version}: {differ}"
    report = out[("trainer", 0, case.name, "report")]
    assert [r[1] for r in report] == [None] + list(range(1, case.versions))  # one anchor, then deltas
    sent, whole = sum(r[2] for r in report[5:]), sum(r[3] for r in report[5:])
    assert sent < whole and report[-1][5] > 0, (sent, whole)
    assert out[("trainer", 0, case.name, "shadows")] == (["cpu pinned"] if shadow == "pinned" else ["cuda:0"])
