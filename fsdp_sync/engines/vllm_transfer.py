"""fsdp_sync as a backend of vLLM's own weight-transfer framework (vLLM >= 0.33).

vLLM 0.33 ships ``vllm.distributed.weight_transfer``: a worker-side engine that
``weight_transfer_config`` selects by name, a trainer-side engine that
``WeightTransferTrainerFactory.trainer_init`` builds, and four update calls (``LLM`` /
``AsyncLLM`` / the RLHF HTTP routes: ``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``). This registers
fsdp_sync under ``BACKEND`` in both registries, so a user selects it the way they select
vLLM's ``nccl`` or ``ipc``::

    # inference job
    llm = LLM(model, weight_transfer_config=WeightTransferConfig(backend="fsdp_sync"))

    # trainer job, every rank (FSDP2 applied, torch.distributed initialized)
    from fsdp_sync.engines.vllm_transfer import TrainerInitInfo
    engine = WeightTransferTrainerFactory.trainer_init(
        TrainerInitInfo(config=SyncConfig(control=..., quant="fp8_block"), rank=dist.get_rank()),
        client=client, source=ModuleSource(model))     # client: any VLLMWeightSyncClient
    for step in ...:
        ...; optimizer.step()
        engine.send_weights()                          # every rank: push, then the update calls

Registration: an installed fsdp_sync declares ``register`` as a ``vllm.general_plugins``
entry point, which vLLM loads in every process (front end, engine core, each worker)
before it builds a worker's engine; without the install, call ``register()`` first.

How a round maps onto vLLM's calls. The trainer's ``send_weights`` pushes the version on
every rank (WeightSender's plan, transport and quantization) and waits until every
receiver has its bytes in the staged shadow copy, while the engine keeps serving; only
then does rank 0 make the three update calls: ``start_weight_update`` (nothing to
prepare), ``update_weights({"version": v})`` (each worker confirms v landed) and
``finish_weight_update(weight_version=str(v))``, where each worker makes v live between
engine steps and re-derives what vLLM computes from weights (MLA's ``W_UK_T``/``W_UV``).
So the engine loop is held for a shadow-to-live copy, not for the transfer. Only
``commit="staged"`` is offered: the transfer runs outside the update calls, so writing
the live weights in place would race the engine's forward passes.

This module holds the wire dataclasses and their checks and imports no vLLM (CI tests
it without vLLM); the engine classes are in ``vllm_transfer_engine``, which imports vLLM
and is loaded only when vLLM's factories build an engine. For vLLM versions without
``vllm.distributed.weight_transfer``, use the worker extension (``vllm_worker``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from ..config import SyncConfig

BACKEND = "fsdp_sync"
ENGINE_MODULE = "fsdp_sync.engines.vllm_transfer_engine"
ENGINE_CLASS = "FsdpSyncWeightTransferEngine"
TRAINER_CLASS = "FsdpSyncTrainerWeightTransferEngine"
COMMIT_MODES = ("staged",)
_CONFIG_FIELDS = {f.name for f in fields(SyncConfig)}


def register() -> bool:
    """Register fsdp_sync with vLLM's worker-side and trainer-side factories, by module path
    (the engine module is imported only when an engine is built). Safe to call again.

    Returns False, registering nothing, where vLLM (or its weight-transfer API of 0.33,
    with a trainer-side factory) is absent: vLLM calls its general plugins unguarded in
    every process, so raising here would stop an older vLLM that only uses the worker
    extension from starting.
    """
    try:
        from vllm.distributed.weight_transfer.factory import (WeightTransferEngineFactory,
                                                              WeightTransferTrainerFactory)
    except ImportError:
        return False

    for factory, class_name in ((WeightTransferEngineFactory, ENGINE_CLASS),
                                (WeightTransferTrainerFactory, TRAINER_CLASS)):
        try:
            factory.register_engine(BACKEND, ENGINE_MODULE, class_name)
        except ValueError:  # registered already: this function ran before in this process
            pass
    return True


def _check_commit(commit: str) -> None:
    if commit not in COMMIT_MODES:
        raise ValueError(f"the {BACKEND} vLLM backend commits staged only, got commit={commit!r}: pushes run "
                         "outside vLLM's update calls, so in-place writes would race the forward passes "
                         "(the worker extension, fsdp_sync.engines.vllm_worker, takes pause/resume instead)")


@dataclass(kw_only=True)
class EngineInitInfo:
    """What ``init_weight_transfer_engine`` carries to every worker: the receivers' SyncConfig
    (as JSON-safe fields, no secret), the commit mode, and optionally the receiver rank and
    world size (default: DP rank x TP size + TP rank, of DP size x TP size)."""

    config: dict[str, Any]
    commit: str = "staged"
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        _check_commit(self.commit)
        unknown = sorted(set(self.config) - _CONFIG_FIELDS)
        if unknown:
            raise ValueError(f"init_info config has fields SyncConfig does not: {unknown}")
        if "secret" in self.config:
            raise ValueError("init_info must not carry SyncConfig.secret (it travels over vLLM's RPC and HTTP "
                             "routes); give the workers $FSDP_SYNC_SECRET instead")
        self.sync_config()  # SyncConfig's own checks, on the worker, before anything registers

    def sync_config(self) -> SyncConfig:
        return SyncConfig(**self.config)


@dataclass(kw_only=True)
class UpdateInfo:
    """What ``update_weights`` carries: the version every worker must have landed, and how
    long a worker waits for it (None: the receivers' ``SyncConfig.timeout_s``)."""

    version: int
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"update_info version must be an int >= 1, got {self.version!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"update_info timeout_s must be > 0 or None, got {self.timeout_s!r}")


@dataclass(kw_only=True)
class TrainerInitInfo:
    """``WeightTransferTrainerFactory.trainer_init``'s argument for fsdp_sync, on every trainer rank.

    ``rank`` is this process's rank in the trainer's default process group (rank 0 hosts
    the control plane and makes vLLM's update calls). ``config`` is shared by both jobs;
    its ``secret``, if any, stays in the trainer: the workers read $FSDP_SYNC_SECRET.
    ``update_timeout_s`` bounds each worker's wait in ``update_weights``.
    """

    backend: ClassVar[str] = BACKEND  # the key vLLM's trainer factory dispatches on

    config: SyncConfig
    rank: int
    commit: str = "staged"
    update_timeout_s: float | None = None
    receiver_world_size: int | None = None  # default: the workers' DP size x TP size

    def __post_init__(self) -> None:
        _check_commit(self.commit)
        if not isinstance(self.config, SyncConfig):
            raise ValueError(f"TrainerInitInfo.config must be a SyncConfig, got {type(self.config).__name__}")

    @property
    def is_sender(self) -> bool:
        return self.rank == 0

    def engine_init_payload(self) -> dict[str, Any]:
        """``init_weight_transfer_engine``'s ``init_info``: JSON-safe, as vLLM's HTTP route needs."""
        config = {k: v for k, v in asdict(self.config).items() if k != "secret"}
        payload = asdict(EngineInitInfo(config=config, commit=self.commit, world_size=self.receiver_world_size))
        return json.loads(json.dumps(payload))  # tuples to lists; anything not JSON-safe raises here


def update_payload(version: int, timeout_s: float | None = None) -> dict[str, Any]:
    """``update_weights``'s ``update_info`` for one version."""
    return asdict(UpdateInfo(version=version, timeout_s=timeout_s))


def module_of(source: Any) -> Any:
    """The trainer module behind vLLM's ``WeightSource``: fsdp_sync reads the FSDP2 shards
    (DTensors) directly and plans from their placements, so it needs the module itself,
    not a stream of full tensors. Takes an ``nn.Module``, an object with ``.module``, or
    vLLM's ``ModuleSource`` (whose module is not public)."""
    from torch import nn

    if isinstance(source, nn.Module):
        return source
    for attr in ("module", "_module"):
        module = getattr(source, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"the {BACKEND} backend pushes from the FSDP2 module itself: pass source=ModuleSource(model) "
                    f"or the model, not {type(source).__name__}")


def check_landed(wanted: int | None, live: int | None) -> None:
    """Raise unless the version made live is at least the one ``update_weights`` asked for."""
    if wanted is not None and (live is None or live < wanted):
        raise RuntimeError(f"version {wanted} was confirmed landed, but commit made {live} live")
