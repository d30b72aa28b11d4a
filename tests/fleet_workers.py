"""A trainer job for the first-hour and fleet tests: pushes the versions it is told, waiting for
the test between pushes when asked, then closes. Every weight of version v holds the value v."""

from __future__ import annotations

import time

import torch
from torch import nn

from fsdp_sync import SyncConfig, WeightReceiver, WeightSender


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64)).to(torch.bfloat16)


def trainer(rank: int, world_size: int, cfg: SyncConfig, versions: list[int], gate: str | None,
            stall: tuple[int, int] | None = None) -> str:
    """Pushes ``versions``; before each one after the first, waits for the test to set key ``gate``/v.

    With ``stall=(rank, version)``, that rank stops after its first bucket of that version (the
    push in flight) and sets key ``stalled/<rank>``, until the test sets ``release/<rank>``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def hold(done: int, total: int) -> None:
        if stall == (rank, sender.version) and done == 1:
            sender.control.set(f"stalled/{rank}", True)
            while not sender.control.has(f"release/{rank}"):
                time.sleep(0.01)

    net = fully_shard(model(), mesh=init_device_mesh("cpu", (world_size,)))
    sender = WeightSender(net, cfg, progress=hold)
    outcome = []
    for i, v in enumerate(versions):
        if gate is not None and i > 0:
            while not sender.control.has(f"{gate}/{v}"):
                time.sleep(0.01)
        with torch.no_grad():
            for p in net.parameters():
                p.to_local().fill_(v)
        started = time.monotonic()
        try:
            sender.push(v).wait()
            outcome.append(f"{v}: ok")
        except Exception as e:  # noqa: BLE001 - the test reads it; the next version is pushed all the same
            outcome.append(f"{v}: {type(e).__name__}: {e} [{time.monotonic() - started:.2f}s]")
    sender.close()
    return "\n".join(outcome)


def subgroup_trainer(rank: int, world_size: int, cfg: SyncConfig, versions: list[int]) -> bytes | str:
    """Global rank 0 plays another role (a reference model, say); ranks 1.. shard the policy on a
    mesh of their own and push through ``WeightSender(group=mesh)``. Sender rank 0 returns the
    full weights of every version it pushed."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from recipes.jobs import pack

    policy = dist.new_group(list(range(1, world_size)))  # every rank of the world enters
    fulls = {}
    if rank > 0:
        mesh = DeviceMesh.from_group(policy, "cpu")
        torch.manual_seed(0)
        net = fully_shard(model(), mesh=mesh)
        sender = WeightSender(net, cfg, group=mesh)
        for v in versions:
            with torch.no_grad():
                for p in net.parameters():
                    p.to_local().add_(torch.randn_like(p.to_local()) * 0.01)
            sender.push(v).wait()
            fulls[v] = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
        sender.close()
    dist.barrier()  # rank 0 hosts the world's store, which the policy's own groups were made on
    return pack(fulls) if rank == 1 else f"rank {rank} ok"


def lone_receiver(cfg: SyncConfig, rank: int, world_size: int, until: int, results) -> None:
    """A receiver process of rank ``rank``: reports each version it made live, up to ``until``.

    For a test that fails: the library's INFO lines go to stderr, which pytest shows, and a
    process still here after ``cfg.timeout_s * 8`` prints where each of its threads stands.
    """
    import faulthandler
    import logging

    logging.basicConfig(level=logging.INFO, format=f"receiver process rank {rank}: %(message)s")
    faulthandler.dump_traceback_later(cfg.timeout_s * 8, exit=False)
    try:
        receiver = WeightReceiver(model(), config=cfg, rank=rank, world_size=world_size, commit="staged")
    except Exception as e:  # noqa: BLE001 - the test reads it
        results.put((rank, "error", f"{type(e).__name__}: {e}"))
        raise
    live = 0
    while live < until:
        try:
            receiver.wait_for(live + 1, timeout=cfg.timeout_s * 10)
        except Exception as e:  # noqa: BLE001 - a failed push: the test may expect it
            results.put((rank, "error", f"{type(e).__name__}: {e}"))
            continue
        live = receiver.commit()
        values = sorted({float(x) for t in receiver.tensors.values() for x in t.float().reshape(-1)})
        results.put((rank, live, values))
    receiver.close()


def reports(procs: list, results, timeout_s: float, ranks: list[int] | None = None) -> dict[int, str]:
    """Job rank -> what its process reported ("process error: ..." if it raised), from ``ranks``
    (default: all); then every process is joined, or killed."""
    ranks = list(range(len(procs))) if ranks is None else ranks
    got: dict[int, str] = {}
    try:
        while set(got) < set(ranks):
            _name, rank, status, payload = results.get(timeout=timeout_s)
            got[rank] = payload if status == "ok" else f"process error: {payload}"
    finally:
        for p in procs:
            p.join(timeout=timeout_s / 10)
            if p.is_alive():
                p.kill()
    return got


def values(receiver: WeightReceiver) -> set[float]:
    """Every value the receiver's live tensors hold (each version fills all weights with one)."""
    return {float(x) for t in receiver.tensors.values() for x in t.float().reshape(-1)}
