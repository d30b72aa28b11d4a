"""The fixed cost of a push on CPU: many small weights, N trainer ranks, M receivers.

    python -m recipes.bench_push_overhead [--transport shm] [--params 400] [--pushes 30]
        [--senders 1] [--receivers 1]

The bytes are negligible (64x64 fp32 weights), so the median push time is what the
control plane and the per-parameter Python cost. With many ranks and few parameters it
is the control plane's cost at that rank count: trainer rank 0 splits each push into
announcing it (``publish``), its own part (``run``) and waiting for every receiver's ack
(``acks``, which holds the wait for the slowest sender). Prints it with the sender's stage
times and writes JSON to bench_results/.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch
from torch import nn

from fsdp_sync import LayoutSpec, SyncConfig, WeightReceiver, WeightSender, allocate_destinations
from .jobs import free_port, next_message, spawn_context, start_job

SHAPE = (64, 64)


def _shapes(num: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {f"w{i}": (SHAPE, torch.float32) for i in range(num)}


def trainer(rank: int, world_size: int, cfg: SyncConfig, num_params: int, pushes: int, profile: bool = False) -> dict:
    """Times each push, split into publishing it (push() returning), the push thread and the acks;
    with ``profile``, cProfile of rank 0's publishing calls."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Module()
    for name in _shapes(num_params):
        model.register_parameter(name, nn.Parameter(torch.randn(SHAPE)))
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sender = WeightSender(model, cfg)
    sender.push(1).wait()  # plans and connects
    times, parts, steps, result = [], [], [], None
    profiler = cProfile.Profile() if profile and rank == 0 else None
    for version in range(2, pushes + 2):
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        handle = sender.push(version)
        if profiler:
            profiler.disable()
        announced = time.perf_counter()
        result = handle.wait()
        times.append(time.perf_counter() - started)
        parts.append(dict(publish=announced - started, run=result.seconds,
                          acks=times[-1] - (announced - started) - result.seconds))
        steps.append({**result.announce_seconds, "acks wait": result.acks_seconds or 0.0})
    sender.close()
    top = ""
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        top = out.getvalue()
    fixed = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in steps[0]}
    return {"times_s": times, "parts_s": parts, "stage_s": result.stage_seconds, "fixed_s": fixed,
            "announce_profile": top}


def receiver(rank: int, world_size: int, cfg: SyncConfig, num_params: int, pushes: int) -> None:
    dests = allocate_destinations(_shapes(num_params), layout=LayoutSpec("identity"))
    recv = WeightReceiver(dests, config=cfg)
    recv.wait_for(pushes + 1)
    recv.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="shm", choices=["shm", "gloo"])
    ap.add_argument("--params", type=int, default=400)
    ap.add_argument("--pushes", type=int, default=30)
    ap.add_argument("--senders", type=int, default=1, help="trainer ranks (fully_shard over all of them)")
    ap.add_argument("--receivers", type=int, default=1, help="inference ranks (identity layout: each takes all)")
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top calls of the announcing (publish)")
    args = ap.parse_args(argv)
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job="push-overhead", transport=args.transport)
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, trainer, args.senders, results, cfg, args.params, args.pushes, args.profile)
    procs += start_job(ctx, receiver, args.receivers, results, cfg, args.params, args.pushes)
    report = None
    try:
        for _ in procs:
            name, rank, _status, payload = next_message(results, procs, 600)
            if name == "trainer" and rank == 0:
                report = payload
    finally:
        for p in procs:
            p.join(timeout=10)
    median = statistics.median(report["times_s"])
    stages = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in report["stage_s"].items())
    parts = ", ".join(f"{k} {statistics.median(p[k] for p in report['parts_s']) * 1e3:.2f}"
                      for k in ("publish", "run", "acks"))
    print(f"push overhead on CPU ({os.cpu_count()} cores): {args.params} x {SHAPE} fp32 weights, "
          f"{args.senders} -> {args.receivers} over {args.transport}, torch {torch.__version__}: median "
          f"{median * 1e3:.2f} ms over {args.pushes} pushes (min {min(report['times_s']) * 1e3:.2f}); trainer rank 0 "
          f"ms (median): {parts}; sender stages ms: {stages}; around the push thread ms (medians): "
          + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in report["fixed_s"].items()))
    if args.profile:
        print(report["announce_profile"])
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    ranks = f"-{args.senders}x{args.receivers}" if (args.senders, args.receivers) != (1, 1) else ""
    path = os.path.join(args.out, f"push-overhead-cpu-{args.transport}-{args.params}{ranks}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({**vars(args), "torch": torch.__version__, "median_s": median, **report}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
