"""Start a trainer job and an inference job as separate torch.distributed worlds, on one machine.

Used by the demo, the GRPO recipe and the multi-process tests: each job gets its own
gloo world (its own TCP rendezvous); the two meet only on the fsdp_sync control plane.
"""

from __future__ import annotations

import io
import os
import queue
import random
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


_HANDED_OUT: set[int] = set()  # ports this process picked: a later pick never repeats one


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range, never one this process
    picked before.

    Outgoing connections (gloo pairs, store clients) take their local ports from that
    range, so a port picked there can be taken before its server binds it (EADDRINUSE).
    Picks are often made before any is bound (a test's cases' control ports, then its jobs'
    rendezvous ports): a repeat would leave two servers for one port, the second failing
    with EADDRINUSE for its whole connect timeout.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.SystemRandom().randrange(max(1024, low - 16384), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: take the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _entry(fn: Callable, rank: int, world_size: int, port: int, results: Any, gpu_offset: int | None,
           args: tuple, environ: dict[str, str]) -> None:
    # A forkserver's children inherit its environment, not the starting process's: take that.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    backend = "gloo"
    if gpu_offset is not None:
        torch.cuda.set_device((rank + gpu_offset) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120))
        out = fn(rank, world_size, *args)
        results.put((fn.__name__, rank, "ok", out))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((fn.__name__, rank, "error", f"{e!r}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_job(ctx: Any, fn: Callable, world_size: int, results: Any, *args: Any, gpu_offset: int | None = None) -> list:
    """Start ``world_size`` processes running ``fn(rank, world_size, *args)`` in one fresh world.

    With ``gpu_offset``, rank r runs on GPU (r + gpu_offset) % num_gpus and the world
    gets NCCL for CUDA tensors beside gloo for CPU ones.
    """
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, gpu_offset, args, dict(os.environ)),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


def pack(obj: Any) -> bytes:
    """Tensors as plain bytes for a multiprocessing queue: torch's shared-memory handoff
    breaks when the sending process exits before the parent reads."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def next_message(results: Any, procs: list, timeout: float) -> tuple:
    """The next message a job process sent; a process's error or death, or silence, raises.

    Processes started by ``start_job`` end with an ("ok" | "error") message of their own.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            item = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a job process exited with code {dead[0].exitcode}")
            continue
        if item[2] == "error":
            raise RuntimeError(f"{item[0]} rank {item[1]} failed: {item[3]}")
        return item
    raise TimeoutError(f"no message from the jobs within {timeout:.0f}s")


# What a CPU machine's job processes import before their first line: preloaded once in a
# forkserver, each process then starts in ~0.1 s instead of ~8 s of CPU (torch 3.5 s,
# transformers' Llama 4.8 s) on a 2-core machine.
_PRELOAD = ["torch", "torch.distributed", "numpy", "transformers", "transformers.models.llama.modeling_llama"]


def spawn_context() -> Any:
    """Fresh processes, never a fork of the caller. Without CUDA, forked from a server that
    imported torch and transformers once (``forkserver``); with CUDA, spawned, since a
    server whose imports touched the driver cannot hand it to forked children."""
    if not sys.platform.startswith("linux") or torch.cuda.is_available():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx
