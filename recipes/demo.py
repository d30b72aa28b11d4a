"""Demo: a real FSDP2 trainer job pushes weights into a TP=2 inference job, three steps, verified.

    python -m recipes.demo [--quant fp8_block] [--mode direct] [--transport gloo]

Trainer: 2 processes, FSDP2 on a CPU mesh over gloo, a tiny Llama from a transformers
config, AdamW. Inference: 2 processes of its own world, holding TP=2 slices (FP8 with
block scales when --quant is fp8). After each optimizer step the trainer pushes; every
receiver's tensors are then compared bit for bit with the trainer's full_tensor() run
through the reference quantizer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from fsdp_sync import LayoutSpec, SyncConfig, WeightReceiver, WeightSender, allocate_destinations
from fsdp_sync import expected_destinations, mismatches
from fsdp_sync.config import MODES
from fsdp_sync.quant import QUANT_FORMATS

from .jobs import free_port, next_message, pack, spawn_context, start_job, unpack

DTYPE = torch.bfloat16
TRANSPORTS = ("gloo", "shm")  # the CPU transports; the demo runs on CPU processes
log = logging.getLogger("demo")


def _configure_logging() -> None:
    """Progress goes to stderr through logging (results stay on stdout); spawned processes call this too."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def trainer(rank: int, world_size: int, cfg: SyncConfig, steps: int, results, barrier) -> None:
    _configure_logging()
    log.info("demo: trainer %d/%d up (pid %d), importing transformers", rank, world_size, os.getpid())
    # Imported after that line: transformers takes seconds to import on a loaded machine.
    from torch.distributed.device_mesh import init_device_mesh

    from .tiny_llama import apply_fsdp, build_model, tiny_llama_config

    model = apply_fsdp(build_model(tiny_llama_config(), seed=0, dtype=DTYPE), init_device_mesh("cpu", (world_size,)))
    if rank == 0:
        log.info("demo: trainer model built and FSDP2-sharded; meeting the receivers at %s", cfg.control)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sender = WeightSender(model, cfg)
    if rank == 0:
        log.info("demo: trainer sender ready; step 1/%d (forward, backward, AdamW)", steps)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        ids = torch.randint(0, 512, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad()
        if rank == 0:
            log.info("demo: trainer step %d/%d done, pushing version %d", step, steps, step)
        result = sender.push(step).wait()
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        results.put(("push", rank, step, result, pack(full) if rank == 0 else None))
        barrier.wait(timeout=cfg.timeout_s)  # the parent has checked every receiver
    sender.close()


def receiver(rank: int, world_size: int, cfg: SyncConfig, steps: int, results, barrier) -> None:
    _configure_logging()
    log.info("demo: receiver %d/%d up (pid %d), importing transformers", rank, world_size, os.getpid())
    from .tiny_llama import param_shapes, tiny_llama_config

    layout = LayoutSpec("hf_tp", {"tp_rank": rank, "tp_size": world_size})
    dests = allocate_destinations(param_shapes(tiny_llama_config(), DTYPE), layout=layout, quant=cfg.quant)
    recv = WeightReceiver(dests, config=cfg, layout=layout.name, layout_kwargs=layout.kwargs)
    if rank == 0:
        log.info("demo: receiver registered %d tensors, waiting for version 1", len(dests))
    for step in range(1, steps + 1):
        version = recv.wait_for(step)
        if rank == 0:
            log.info("demo: receiver version %d landed", version)
        results.put(("recv", rank, version, pack(recv.tensors), None))
    recv.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="fp8_block", choices=list(QUANT_FORMATS))
    ap.add_argument("--mode", default="direct", choices=MODES)
    ap.add_argument("--transport", default="gloo", choices=TRANSPORTS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--trace-dir", default=None)
    args = ap.parse_args(argv)
    _configure_logging()
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job="demo", quant=args.quant, mode=args.mode,
                     transport=args.transport, timeout_s=args.timeout, trace_dir=args.trace_dir)
    print(f"demo: FSDP2 x{args.senders} -> TP={args.receivers}, quant={cfg.quant}, mode={cfg.mode}, "
          f"transport={cfg.transport}", flush=True)
    log.info("demo: starting %d trainer and %d receiver processes (each imports torch and joins its job's "
             "world first; under load that takes a while)", args.senders, args.receivers)
    ctx = spawn_context()
    results = ctx.Queue()
    barrier = ctx.Barrier(args.senders + 1)
    procs = start_job(ctx, trainer, args.senders, results, cfg, args.steps, results, barrier)
    log.info("demo: trainer processes started, pids %s", " ".join(str(p.pid) for p in procs))
    procs += start_job(ctx, receiver, args.receivers, results, cfg, args.steps, results, barrier)
    log.info("demo: receiver processes started, pids %s", " ".join(str(p.pid) for p in procs[args.senders:]))
    layout = lambda r: LayoutSpec("hf_tp", {"tp_rank": r, "tp_size": args.receivers})  # noqa: E731
    verified = 0
    try:
        for step in range(1, args.steps + 1):
            pushes, snaps, full = {}, {}, None
            while len(pushes) < args.senders or len(snaps) < args.receivers:
                item = next_message(results, procs, args.timeout)
                if item[2] == "ok":
                    continue  # a process finished cleanly
                kind, rank, value, payload, extra = item
                if kind == "push":
                    pushes[rank], full = payload, unpack(extra) if extra is not None else full
                else:
                    snaps[rank] = unpack(payload)
            _print_table(step, pushes)
            for r, got in sorted(snaps.items()):
                bad = mismatches(got, expected_destinations(full, layout=layout(r), quant=cfg.quant))
                if bad:
                    print(f"demo FAILED: version {step} on receiver {r}: {bad[:5]}", flush=True)
                    return 1
            verified += 1
            print(f"  version {step}: {len(snaps)} receivers bit-identical to the reference", flush=True)
            barrier.wait(timeout=args.timeout)
        for p in procs:
            p.join(timeout=args.timeout)
    except Exception as e:  # noqa: BLE001 - one line for the user, non-zero exit
        print(f"demo FAILED: {e}", flush=True)
        return 1
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    print(f"demo OK: {verified} versions verified on {args.receivers} receivers", flush=True)
    return 0


def _print_table(step: int, pushes: dict) -> None:
    stages = sorted({s for r in pushes.values() for s in r.stage_seconds})
    floor = next((r.floor_s for r in pushes.values() if r.floor_s is not None), None)
    print(f"push {step}" + (f" (plan floor {floor * 1e3:.2f} ms)" if floor is not None else ""), flush=True)
    print("  rank      bytes   time_ms  " + "  ".join(f"{s:>9}" for s in stages), flush=True)
    for rank, r in sorted(pushes.items()):
        cells = "  ".join(f"{r.stage_seconds.get(s, 0.0) * 1e3:9.2f}" for s in stages)
        print(f"  {rank:4d} {r.bytes_sent:10d} {r.seconds * 1e3:9.2f}  {cells}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
