"""A trainer and a transformers model served from synced weights, for the logits-parity test."""

from __future__ import annotations

import torch

from fsdp_sync import SyncConfig, WeightReceiver, WeightSender
from recipes.jobs import pack
from recipes.tiny_llama import apply_fsdp, build_model, tiny_llama_config

DTYPE = torch.bfloat16
PROMPTS = torch.tensor([[1, 5, 9, 200, 31, 7, 64, 2], [3, 3, 17, 400, 12, 99, 8, 1]])


def trainer(rank: int, world_size: int, cfg: SyncConfig) -> bytes | None:
    from torch.distributed.device_mesh import init_device_mesh

    model = apply_fsdp(build_model(tiny_llama_config(), seed=0, dtype=DTYPE), init_device_mesh("cpu", (world_size,)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sender = WeightSender(model, cfg)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    sender.push(1).wait()
    with torch.no_grad():
        logits = model(input_ids=PROMPTS).logits
    sender.close()
    return pack(logits) if rank == 0 else None


def engine(rank: int, world_size: int, cfg: SyncConfig) -> bytes:
    """An engine whose model is a fresh transformers model (other seed) until the push lands."""
    model = build_model(tiny_llama_config(), seed=123, dtype=DTYPE).eval()
    recv = WeightReceiver(model, config=cfg, commit="staged")
    recv.wait_for(1)
    recv.commit()
    with torch.no_grad():
        logits = model(input_ids=PROMPTS).logits
    recv.close()
    return pack(logits)
