"""Delta push bytes on CPU: what a push moves after each real optimizer step, against a full push.

    python -m recipes.delta_bytes [--steps 10] [--lrs 1e-6,1e-5] [--quants fp8_block,none] [--transports gloo,shm]

A Llama of ~16M parameters (13.6M in projections) in bf16 with fp32 AdamW masters
(``recipes.master``), FSDP2 over 2 trainer processes, one receiver process. Before each
push: a forward and backward on random tokens and an optimizer step. Prints, per
configuration, bytes sent over full bytes summed after step 5 and the changed fraction
of weight elements, then the ratio of every push.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.distributed as dist

from fsdp_sync import LayoutSpec, SyncConfig, WeightReceiver, WeightSender, allocate_destinations
from .jobs import free_port, next_message, spawn_context, start_job
from .master import fp32_master
from .tiny_llama import apply_fsdp, build_model, param_shapes, tiny_llama_config

Run = tuple[int, str, str, float]  # control port, quant, transport, lr


def _model_config():
    return tiny_llama_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=2048)


def _config(run: Run) -> SyncConfig:
    port, quant, transport, lr = run
    return SyncConfig(control=f"127.0.0.1:{port}", job=f"delta-{quant}-{transport}-{lr}", quant=quant,
                      transport=transport, delta="auto", timeout_s=300)


def trainer(rank: int, world_size: int, runs: list[Run], steps: int, results: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    for run in runs:
        model = apply_fsdp(build_model(_model_config(), seed=0, dtype=torch.bfloat16),
                           init_device_mesh("cpu", (world_size,)))
        optim = fp32_master(model, torch.optim.AdamW, lr=run[3])
        sender = WeightSender(model, _config(run))
        rows = []
        for version in range(1, steps + 1):
            ids = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(version))
            model(input_ids=ids, labels=ids).loss.backward()
            optim.step()
            result = sender.push(version).wait()
            moved = torch.tensor([result.bytes_sent, result.full_bytes, result.changed_fraction or 0.0],
                                 dtype=torch.float64)
            dist.all_reduce(moved)  # every rank sends its own part
            rows.append((moved[0].item(), moved[1].item(), moved[2].item() / world_size))
        if rank == 0:
            results.put(("trainer", rank, "rows", (run, rows)))
        sender.close()


def receiver(rank: int, world_size: int, runs: list[Run], steps: int, results: Any) -> None:
    for run in runs:
        dests = allocate_destinations(param_shapes(_model_config(), torch.bfloat16), layout=LayoutSpec("identity"),
                                      quant=run[1])
        recv = WeightReceiver(dests, config=_config(run))
        recv.wait_for(steps, timeout=600)
        recv.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lrs", default="1e-6,1e-5")
    ap.add_argument("--quants", default="fp8_block,none")
    ap.add_argument("--transports", default="gloo,shm")
    args = ap.parse_args(argv)
    runs = [(free_port(), q, t, float(lr)) for q in args.quants.split(",") for t in args.transports.split(",")
            for lr in args.lrs.split(",")]
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, trainer, 2, results, runs, args.steps, results)
    procs += start_job(ctx, receiver, 1, results, runs, args.steps, results)
    reported = 0
    while reported < len(runs):
        item = next_message(results, procs, timeout=1800)
        if item[2] != "rows":  # a process that finished
            continue
        reported += 1
        (_, quant, transport, lr), rows = item[3]
        steady = rows[5:]
        ratio = sum(r[0] for r in steady) / sum(r[1] for r in steady)
        changed = sum(r[2] for r in steady) / len(steady)
        print(f"{quant:<10} {transport:<5} lr {lr:g}: full push {rows[0][1] / 1e6:.1f} MB, after step 5 sent "
              f"{ratio:.2%} of it, {changed:.3%} of weights changed; per push "
              f"{', '.join(f'{r[0] / r[1]:.2%}' for r in rows)}", flush=True)
    for p in procs:
        p.join(timeout=30)


if __name__ == "__main__":
    main()
