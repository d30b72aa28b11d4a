"""The README's trainer job: FSDP2 on every rank, a push after every optimizer step.

    torchrun --nproc-per-node 2 -m recipes.example_trainer [--control HOST:PORT] [--steps 3]

Start it beside ``recipes.example_engine`` (any order); ``--out DIR`` also saves each
version's full tensors there, which is how the tests check the engine's bytes.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from fsdp_sync import SyncConfig, WeightSender
from .tiny_llama import apply_fsdp, build_model, tiny_llama_config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--control", default="127.0.0.1:29600", help="host:port where trainer rank 0 hosts the store")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="save each version's full tensors here (rank 0)")
    args = ap.parse_args(argv)

    dist.init_process_group("gloo")  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR
    model = apply_fsdp(build_model(tiny_llama_config(), dtype=torch.bfloat16),
                       init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # --8<-- [trainer]
    config = SyncConfig(control=args.control, job="example", quant="fp8_block")
    sender = WeightSender(model, config)
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        result = sender.push(step).wait()  # every receiver has this version's bytes
        # --8<-- [trainer]
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}  # collective
        if dist.get_rank() == 0:
            print(f"pushed version {step}: {result.bytes_sent / 1e6:.2f} MB in {result.seconds * 1e3:.1f} ms",
                  flush=True)
            if args.out:
                torch.save(full, os.path.join(args.out, f"trainer-v{step}.pt"))
    sender.close()  # the receivers hear that the trainer closed, and keep serving
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
