"""A trainer process that pushes on command, for the control-plane security tests.

The test process hosts the store and runs the receiver itself, so it can forge keys
between pushes and look at the receiver's state directly.
"""

from __future__ import annotations

import torch

from fsdp_sync import SyncConfig, WeightSender
from tests.commit_workers import _model


def trainer(rank: int, world_size: int, configs: list[SyncConfig], commands, results) -> None:
    """For each config: a fresh FSDP2 model and sender; each command is a version to push
    (every weight filled with it), until "next". Reports ("pushed", job, version, outcome)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for cfg in configs:
        model = fully_shard(_model(), mesh=init_device_mesh("cpu", (world_size,)))
        sender = WeightSender(model, cfg)
        while (version := commands.get(timeout=120)) != "next":
            with torch.no_grad():
                for p in model.parameters():
                    p.to_local().fill_(version)
            try:
                sender.push(version).wait()
                outcome = "ok"
            except Exception as e:  # noqa: BLE001 - the test inspects it
                outcome = f"{type(e).__name__}: {e}"
            results.put(("pushed", cfg.job, version, outcome))
        sender.close()
