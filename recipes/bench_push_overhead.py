"""The fixed cost of a push on CPU: many small weights, one trainer rank, one receiver.

    python -m recipes.bench_push_overhead [--transport shm] [--params 400] [--pushes 30]

The bytes are negligible (64x64 fp32 weights), so the median push time is what the
control plane and the per-parameter Python cost. Prints it with the sender's stage
times and writes JSON to bench_results/.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import io
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
    """Times each push and splits its wall time: announcing (``push()`` returning), the push
    thread, and the acks after it; with ``profile``, cProfile of the announcing calls."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Module()
    for name in _shapes(num_params):
        model.register_parameter(name, nn.Parameter(torch.randn(SHAPE)))
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sender = WeightSender(model, cfg)
    sender.push(1).wait()  # plans and connects
    times, parts, result = [], [], None
    profiler = cProfile.Profile() if profile else None
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
        parts.append(dict(announce=announced - started, push_thread=result.seconds,
                          acks=times[-1] - (announced - started) - result.seconds))
    sender.close()
    top = ""
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        top = out.getvalue()
    return {"times_s": times, "stage_s": result.stage_seconds, "announce_profile": top,
            "parts_s": {k: statistics.median(p[k] for p in parts) for k in parts[0]}}


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
    ap.add_argument("--out", default="bench_results")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top calls of the announcing")
    args = ap.parse_args(argv)
    cfg = SyncConfig(control=f"127.0.0.1:{free_port()}", job="push-overhead", transport=args.transport)
    ctx = spawn_context()
    results = ctx.Queue()
    procs = start_job(ctx, trainer, 1, results, cfg, args.params, args.pushes, args.profile)
    procs += start_job(ctx, receiver, 1, results, cfg, args.params, args.pushes)
    report = None
    try:
        for _ in procs:
            name, _rank, _status, payload = next_message(results, procs, 300)
            if name == "trainer":
                report = payload
    finally:
        for p in procs:
            p.join(timeout=10)
    median = statistics.median(report["times_s"])
    stages = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in report["stage_s"].items())
    print(f"push overhead on CPU: {args.params} x {SHAPE} fp32 weights, 1 -> 1 over {args.transport}, "
          f"torch {torch.__version__}: median {median * 1e3:.2f} ms over {args.pushes} pushes "
          f"(min {min(report['times_s']) * 1e3:.2f}); sender stages ms: {stages}; wall ms: "
          + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in report["parts_s"].items()))
    if args.profile:
        print(report["announce_profile"])
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    path = os.path.join(args.out, f"push-overhead-cpu-{args.transport}-{args.params}-{stamp}.json")
    with open(path, "w") as f:
        json.dump({**vars(args), "torch": torch.__version__, "median_s": median, **report}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
