"""A real consumer: a transformers model served from synced weights gives the trainer's logits."""

from __future__ import annotations

import pytest
import torch

from fsdp_sync import LayoutSpec, SyncConfig, expected_destinations, mismatches
from recipes.jobs import free_port, next_message, spawn_context, start_job, unpack
from tests import consumer_workers
from tests.timeouts import scaled


def _run(cfg: SyncConfig, trainer, engine) -> tuple:
    """What trainer rank 0 and the engine returned, from a 2-process trainer job and a 1-process engine job."""
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, trainer, 2, results, cfg) + start_job(ctx, engine, 1, results, cfg)
    got = {}
    try:
        while len(got) < 3:
            name, rank, _status, payload = next_message(results, procs, scaled(120))
            got[(name, rank)] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return unpack(got[(trainer.__name__, 0)]), unpack(got[(engine.__name__, 0)])


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_logits_match_the_fsdp_trainer_exactly(transport):
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job=f"consumer-{transport}", transport=transport,
                     timeout_s=scaled(60), connect_timeout_s=scaled(60))
    trained, served = _run(cfg, consumer_workers.trainer, consumer_workers.engine)
    assert served.shape == trained.shape
    assert torch.equal(served, trained)


def test_transformers_fp8_model_receives_block_fp8():
    """Bit-exact FP8 weights and scales in transformers' FP8Linear; the dequantized model stays close.

    The logit check only catches garbage: a tiny random model has near-flat logits, so
    FP8 rounding flips many argmaxes (measured here: top-1 0.879, relative error 0.062).
    The 99% / 3% bound is for a real model with the GPU FP8 matmul, not run here.
    """
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job="consumer-fp8", transport="shm", quant="fp8_block",
                     timeout_s=scaled(60), connect_timeout_s=scaled(60))
    trained, served = _run(cfg, consumer_workers.trainer_with_weights, consumer_workers.fp8_engine)
    want = expected_destinations(trained["full"], layout=LayoutSpec("identity"), quant="fp8_block")
    assert mismatches(served["params"], want) == []
    ref, fp8 = trained["logits"].float(), served["logits"].float()
    top1 = (ref.argmax(-1) == fp8.argmax(-1)).float().mean().item()
    rel = ((fp8 - ref).norm() / ref.norm()).item()
    print(f"fp8_block engine vs bf16 trainer: top-1 agreement {top1:.4f}, relative logit error {rel:.4f}")
    assert top1 >= 0.5 and rel <= 0.2
