"""The engine classes of fsdp_sync's vLLM weight-transfer backend (vLLM >= 0.33).

Imports vLLM: loaded only by vLLM's factories (``vllm_transfer.register`` registers this
module by path) or by a user who has vLLM. The wire dataclasses, and how a round maps
onto vLLM's update calls, are in ``vllm_transfer``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine, WeightTransferEngine

from ..sender import PushResult, WeightSender
from . import Attached
from .vllm_transfer import (BACKEND, EngineInitInfo, TrainerInitInfo, UpdateInfo, check_landed, module_of,
                            update_payload)
from .vllm_worker import attach


class FsdpSyncWeightTransferEngine(WeightTransferEngine[EngineInitInfo, UpdateInfo]):
    """Worker side: a staged WeightReceiver on the worker's live weights.

    ``init_transfer_engine`` registers the weights (after vLLM's post-load processing,
    under the same refusals as the worker extension); pushes then land in the shadow
    copy whenever the trainer sends them. ``update_weights`` waits until the requested
    version landed; ``finish_weight_update`` makes it live and re-derives MLA's tensors.
    """

    init_info_cls = EngineInitInfo
    update_info_cls = UpdateInfo
    # A draft model would be a second receiver set with its own layout; not registered.
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.attached: Attached | None = None
        self._landed: int | None = None  # the version update_weights confirmed this round

    def init_transfer_engine(self, init_info: EngineInitInfo) -> None:
        if self.attached is not None:  # a new trainer handshake replaces the old registration
            self.shutdown()
        self.attached = attach(self.vllm_config, self.model, init_info.sync_config(), commit=init_info.commit,
                               rank=init_info.rank, world_size=init_info.world_size)

    def _require(self) -> Attached:
        if self.attached is None:
            raise RuntimeError(f"the {BACKEND} weight transfer is not initialized: call "
                               "init_weight_transfer_engine first")
        return self.attached

    def start_weight_update(self) -> None:
        self._require()
        self._landed = None

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronizes the device after receiving; nothing is in flight
        # here (a landed version's bytes are written), so only the commit syncs.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: UpdateInfo) -> None:
        self._landed = self._require().wait_for(update_info.version, update_info.timeout_s)

    def finish_weight_update(self) -> None:
        live = self._require().commit()
        check_landed(self._landed, live)
        if torch.accelerator.is_available():  # the shadow-to-live copies ran on this stream
            torch.accelerator.synchronize()

    def shutdown(self) -> None:
        if self.attached is not None:
            self.attached.receiver.close()
            self.attached = None


class FsdpSyncTrainerWeightTransferEngine(TrainerWeightTransferEngine[TrainerInitInfo]):
    """Trainer side: a WeightSender on every trainer rank; rank 0 also drives vLLM's calls."""

    init_info_cls = TrainerInitInfo

    def __init__(self, *, client, source, sender: WeightSender, init_info: TrainerInitInfo) -> None:
        super().__init__(client=client, source=source, is_sender=init_info.is_sender, rank=init_info.rank)
        self.sender = sender
        self.update_timeout_s = init_info.update_timeout_s
        self.last_result: PushResult | None = None

    @classmethod
    def trainer_init(cls, init_info: TrainerInitInfo, *, client, source=None) -> FsdpSyncTrainerWeightTransferEngine:
        model = module_of(source)
        if not dist.is_initialized() or dist.get_rank() != init_info.rank:
            got = dist.get_rank() if dist.is_initialized() else "no process group"
            raise ValueError(f"TrainerInitInfo.rank={init_info.rank} must be this process's rank in the trainer's "
                             f"default process group ({got}): rank 0 hosts the control plane")
        # Every rank joins the control plane first; rank 0 hosts it, so the workers'
        # receivers find it when the init call below registers them.
        sender = WeightSender(model, init_info.config)
        engine = cls(client=client, source=source, sender=sender, init_info=init_info)
        error: BaseException | None = None
        if engine.is_sender:
            try:
                client.init_weight_transfer_engine(init_info.engine_init_payload())
            except Exception as e:  # noqa: BLE001 - shared with every rank below, then raised
                error = e
        # Only rank 0 hears the workers; every rank must fail alike, or the others would
        # start a push that rank 0 never joins.
        outcome = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            sender.close()
            if error is not None:
                raise error
            raise RuntimeError(f"init_weight_transfer_engine failed on trainer rank 0: {outcome[0]}")
        return engine

    def send_weights(self, version: int | None = None) -> PushResult:
        """Push ``version`` (default: the last + 1) on every rank, then, on rank 0, make it
        live in vLLM through its update calls. Returns this rank's PushResult."""
        result = self.sender.push(version).wait()  # every receiver has the bytes in its shadow
        self.last_result = result
        if self.is_sender:
            self.client.start_weight_update()
            self.client.update_weights(update_payload(result.version, self.update_timeout_s))
            self.client.finish_weight_update(weight_version=str(result.version))
        return result

    def shutdown(self) -> None:
        self.sender.close()
