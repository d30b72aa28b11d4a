"""On GPU: transformers' FP8 model (FP8Linear) served from a push gives the trainer's logits."""

from __future__ import annotations

import pytest
import torch

from fsdp_sync import LayoutSpec, SyncConfig, expected_destinations, mismatches
from recipes.jobs import free_port, next_message, spawn_context, start_job, unpack
from tests import consumer_workers

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fp8_engine_logits_match_the_bf16_trainer():
    """Bytes bit-exact; top-1 >= 99% on the answer positions and relative logit error <= 3% overall."""
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job="gpu-fp8-consumer", transport="cuda_ipc",
                     quant="fp8_block", timeout_s=300)
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, consumer_workers.gpu_trained_trainer, 1, results, cfg, 3000, 0.02, gpu_offset=0)
    procs += start_job(ctx, consumer_workers.gpu_fp8_engine, 1, results, cfg, gpu_offset=1)
    got = {}
    try:
        while len(got) < 2:
            name, rank, _status, payload = next_message(results, procs, 600)
            got[name] = unpack(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    trained, served = got["gpu_trained_trainer"], got["gpu_fp8_engine"]
    want = expected_destinations(trained["full"], layout=LayoutSpec("identity"), quant="fp8_block")
    assert mismatches(served["params"], want) == []
    _, first_answer = consumer_workers._addition_batch(1, seed=1)
    ref, fp8 = trained["logits"], served["logits"]
    answers = slice(first_answer, ref.shape[1] - 1)
    top1_answers = (ref[:, answers].argmax(-1) == fp8[:, answers].argmax(-1)).float().mean().item()
    top1_all = (ref.argmax(-1) == fp8.argmax(-1)).float().mean().item()
    rel = ((fp8 - ref).norm() / ref.norm()).item()
    print(f"trained {trained['steps']} steps to loss {trained['train_loss']:.4f}; FP8Linear engine "
          f"({served['matmul']}) vs bf16 trainer: top-1 {top1_answers:.4f} on answer positions, {top1_all:.4f} on all, relative error {rel:.4f}")
    assert trained["train_loss"] < 0.02, "the model did not train to confident answers; raise max_steps"
    assert top1_answers >= 0.99 and rel <= 0.03
