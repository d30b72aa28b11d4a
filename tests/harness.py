"""Run sync cases in a real trainer job and a real inference job, and collect what they report."""

from __future__ import annotations

import queue
import time
from collections import defaultdict

from recipes.jobs import free_port, spawn_context, start_job, unpack
from tests import sync_workers
from tests.sync_workers import Case


def run_cases(cases: list[Case], *, num_senders: int, num_receivers: int, timeout_s: float = 240.0) -> dict:
    """{(side, rank, case, version): payload} for everything the processes reported."""
    ctx = spawn_context()
    results = ctx.Queue()
    barrier = ctx.Barrier(num_senders + num_receivers)
    procs = start_job(ctx, sync_workers.trainer, num_senders, results, cases, results, barrier)
    procs += start_job(ctx, sync_workers.receiver, num_receivers, results, cases, results, barrier)
    out: dict = {}
    finished: dict[str, int] = defaultdict(int)
    deadline = time.monotonic() + timeout_s
    try:
        while finished["trainer"] < num_senders or finished["receiver"] < num_receivers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs did not finish within {timeout_s}s; got {sorted(out)}")
            try:
                item = results.get(timeout=0.5)
            except queue.Empty:
                if all(p.exitcode is not None for p in procs):
                    break
                continue
            if item[2] in ("ok", "error"):
                finished[item[0]] += 1
                if item[2] == "error":
                    out[(item[0], item[1], "process", "error")] = item[3]
                continue
            side, rank, case, version, payload = item
            out[(side, rank, case, version)] = unpack(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


def new_port() -> int:
    return free_port()
