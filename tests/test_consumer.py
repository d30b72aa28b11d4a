"""A real consumer: a transformers model served from synced weights gives the trainer's logits."""

from __future__ import annotations

import pytest
import torch

from fsdp_sync import SyncConfig
from recipes.jobs import free_port, next_message, spawn_context, start_job, unpack
from tests import consumer_workers


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_logits_match_the_fsdp_trainer_exactly(transport):
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job=f"consumer-{transport}", transport=transport,
                     timeout_s=60)
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, consumer_workers.trainer, 2, results, cfg)
    procs += start_job(ctx, consumer_workers.engine, 1, results, cfg)
    got = {}
    try:
        while len(got) < 3:
            name, rank, _status, payload = next_message(results, procs, 120)
            got[(name, rank)] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    trained = unpack(got[("trainer", 0)])
    served = unpack(got[("engine", 0)])
    assert served.shape == trained.shape
    assert torch.equal(served, trained)
