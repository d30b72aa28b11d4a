"""Run sync cases in a real trainer job and a real inference job, and collect what they report."""

from __future__ import annotations

import itertools
import queue
import time
from collections import defaultdict

from fsdp_sync import expected_destinations, mismatches
from recipes.jobs import free_port, spawn_context, start_job, unpack
from tests import sync_workers
from tests.sync_workers import Case
from tests.timeouts import scaled

QUANTS = ("none", "fp8_block", "fp8_rowwise", "fp8_tensor")
MODES = ("direct", "reconstruct")


def run_cases(cases: list, *, num_senders: int, num_receivers: int, timeout_s: float = 240.0,
              receiver_gpu_offset: int | None = None, workers=sync_workers) -> dict:
    """{(side, rank, case, version): payload} for everything the processes reported.

    ``workers``: the module whose ``trainer`` and ``receiver`` the two jobs run.

    With ``receiver_gpu_offset``, both jobs run on GPUs: trainer rank r on GPU r, receiver
    rank r on GPU r + offset (modulo the GPU count).
    """
    gpu = receiver_gpu_offset is not None
    ctx = spawn_context()
    results = ctx.Queue()
    barrier = ctx.Barrier(num_senders + num_receivers)
    procs = start_job(ctx, workers.trainer, num_senders, results, cases, results, barrier,
                      gpu_offset=0 if gpu else None)
    procs += start_job(ctx, workers.receiver, num_receivers, results, cases, results, barrier,
                       gpu_offset=receiver_gpu_offset)
    out: dict = {}
    finished: dict[str, int] = defaultdict(int)
    timeout_s = scaled(timeout_s)
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


def all_cases(prefix: str, **kw) -> list[Case]:
    """One case per quant format and mode, each on its own control port."""
    return [Case(name=f"{prefix}-{q}-{m}", quant=q, mode=m, port=new_port(), **kw)
            for q, m in itertools.product(QUANTS, MODES)]


def check_cases(out: dict, cases: list[Case], num_receivers: int) -> None:
    """Every receiver equals the reference for every version; direct equals reconstruct."""
    assert not [k for k in out if k[2] == "process"], {k: v for k, v in out.items() if k[2] == "process"}
    for case in cases:
        for version in range(1, case.versions + 1):
            trained = out[("trainer", 0, case.name, version)]
            assert "error" not in trained, trained["error"]
            for r in range(num_receivers):
                got = out[("receiver", r, case.name, version)]
                assert "error" not in got, f"{case.name} v{version} receiver {r}: {got['error']}"
                assert got["version"] == version
                want = expected_destinations(trained["full"], layout=case.layout(r), quant=case.quant)
                assert mismatches(got["tensors"], want) == [], f"{case.name} v{version} receiver {r}"
    # Direct and reconstruct modes must give the same bytes and scales.
    for q in QUANTS:
        pair = [c for c in cases if c.quant == q]
        if len(pair) == 2:
            for r in range(num_receivers):
                a = out[("receiver", r, pair[0].name, pair[0].versions)]["tensors"]
                b = out[("receiver", r, pair[1].name, pair[1].versions)]["tensors"]
                assert mismatches(a, b) == [], f"{q}: direct and reconstruct differ on receiver {r}"
