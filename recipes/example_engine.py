"""The README's inference job: one receiver per process, TP over the job's own world.

    torchrun --nproc-per-node 2 -m recipes.example_engine [--control HOST:PORT] [--steps 3]

Each process allocates its TP slice of the tiny Llama (FP8 with block scales), registers
it, and serves every version the trainer pushes until the trainer closes. ``--out DIR``
saves the tensors of each version it made live, which is how the tests check them.
"""

from __future__ import annotations

import argparse
import os

import torch

from fsdp_sync import SyncConfig, TrainerGone, WeightReceiver, allocate_destinations
from .tiny_llama import param_shapes, tiny_llama_config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--control", default="127.0.0.1:29600", help="host:port of the trainer's store")
    ap.add_argument("--steps", type=int, default=3, help="the last version to wait for")
    ap.add_argument("--out", default=None, help="save the tensors of each version made live here")
    args = ap.parse_args(argv)
    shapes = param_shapes(tiny_llama_config(), torch.bfloat16)  # what the engine loads

    # --8<-- [engine]
    config = SyncConfig(control=args.control, job="example", quant="fp8_block")
    # Rank, world size and the TP slice come from torchrun (RANK, WORLD_SIZE).
    weights = allocate_destinations(shapes, layout="hf_tp", quant=config.quant)
    receiver = WeightReceiver(weights, config=config, layout="hf_tp", commit="staged")
    live = None
    while live is None or live < args.steps:
        try:
            receiver.wait_for((live or 0) + 1)  # returns once a newer version landed in the shadow
        except TrainerGone:
            break  # the trainer closed: keep serving what is live
        live = receiver.commit()  # between forward passes: make the newest landed version live
        # ... serve requests from `weights` (receiver.tensors) ...
        # --8<-- [engine]
        print(f"receiver {receiver.rank}: serving version {live}", flush=True)
        if args.out:
            torch.save(receiver.tensors, os.path.join(args.out, f"engine-r{receiver.rank}-v{live}.pt"))
    receiver.close()


if __name__ == "__main__":
    main()
