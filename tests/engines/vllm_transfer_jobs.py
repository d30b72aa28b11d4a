"""An inference job of real vLLM 0.33 models on CPU and a real FSDP2 trainer job, meeting
through vLLM's own weight-transfer framework with fsdp_sync as the backend.

Engine side (one process per TP rank, vLLM's own gloo groups): each case's model is built
and loaded as ``make_vllm_fixtures`` does, with ``weight_transfer_config`` naming
fsdp_sync; the worker's engine comes from ``WeightTransferEngineFactory.create_engine``,
exactly as vLLM's ``Worker.load_model`` makes it, and the update calls run vLLM's own
worker methods (``CPUWorker``'s, which it inherits from the GPU ``Worker``). A serving
``LLM`` cannot start here: the PyPI wheel's CPU ops are missing. ``QueueClient`` stands
in for ``collective_rpc``: it runs each call on every worker and returns when all did.

Ground truth: after every ``finish_weight_update`` the worker builds a second model of
the same config and loads the pushed version's HF tensors through vLLM's own
``load_weights`` and post-processing; every parameter of the engine that received the
push (derived ones too) must equal it byte for byte.

Trainer side (2 processes, gloo): an FSDP2 module with the HF names of the case, its
values ``vllm_cases.fill`` with a salt per version, pushed through
``WeightTransferTrainerFactory.trainer_init(...)`` and ``send_weights()``; or, for a case
on the worker-extension path, by a plain ``WeightSender`` with the extension's methods
called on every worker.
"""

from __future__ import annotations

import os
import queue
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@dataclass
class TransferCase:
    name: str
    config: dict  # config.json
    quant: str
    port: int  # the control plane's
    salts: tuple[str, ...] = ("v1", "v2")  # version i + 1 holds fill(..., salt=salts[i])
    refused: str | None = None  # the init call must fail with this text
    # "native": vLLM's weight-transfer API; "extension": the worker extension (collective_rpc)
    path: str = "native"


# ---- engine side -----------------------------------------------------------------------

def _rpc_worker_cls(path: str):
    from vllm.v1.worker.cpu_worker import CPUWorker

    from fsdp_sync.engines.vllm_worker import FsdpSyncWorkerExtension

    # vLLM adds worker_extension_cls to the worker's bases; the native path needs none.
    bases = (FsdpSyncWorkerExtension,) if path == "extension" else ()

    class RpcWorker(*bases):
        """vLLM's own weight-transfer RPC methods on a model built outside a serving engine."""

        _check_weight_transfer_engine = CPUWorker._check_weight_transfer_engine
        init_weight_transfer_engine = CPUWorker.init_weight_transfer_engine
        start_weight_update = CPUWorker.start_weight_update
        _start_weight_update = CPUWorker._start_weight_update
        update_weights = CPUWorker.update_weights
        finish_weight_update = CPUWorker.finish_weight_update
        shutdown_weight_transfer_engine = CPUWorker.shutdown_weight_transfer_engine
        get_draft_model = CPUWorker.get_draft_model

        def __init__(self, vllm_config, model: nn.Module, rank: int) -> None:
            from vllm.distributed.weight_transfer import WeightTransferEngineFactory

            self.vllm_config, self.rank, self.speculative_config = vllm_config, rank, None
            self._weight_update_active = self._weight_update_is_draft = False
            self.model_runner = SimpleNamespace(model=model, get_model=lambda: model, get_draft_model=lambda: None,
                                                reset_lora_state=lambda: None)
            # What Worker.load_model does once the model is loaded.
            self.weight_transfer_engine = None if vllm_config.weight_transfer_config is None else (
                WeightTransferEngineFactory.create_engine(vllm_config.weight_transfer_config, vllm_config,
                                                          torch.device("cpu"), model))

        def live_version(self) -> int | None:
            attached = self._fsdp_sync if bases else self.weight_transfer_engine.attached
            return attached.receiver.version

    return RpcWorker


def _build(vllm_config, cfg: dict, salt: str, *, complete: bool = True) -> nn.Module:
    """vLLM's model of ``cfg``, loaded with the tensors of ``salt`` and post-processed;
    ``complete``: every post-processing step must run (MoE ones cannot on CPU)."""
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    from tests.engines.make_vllm_fixtures import FP8, checkpoint, post_process

    with set_default_torch_dtype(vllm_config.model_config.dtype), torch.device("cpu"):
        model = initialize_model(vllm_config=vllm_config)
    fp8_modules = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.dtype == FP8}
    model.load_weights(checkpoint(cfg, fp8_modules, salt=salt))
    errors = post_process(model, vllm_config.model_config)
    assert not (complete and errors), errors
    return model


def _described(model: nn.Module) -> dict[str, list]:
    from tests.engines.vllm_cases import describe

    return {n: describe(p) for n, p in model.named_parameters()}


def engine(rank: int, tp: int, port: int, cases: list[TransferCase], scratch: str, commands, replies,
           results, timeout_s: float) -> None:
    """One vLLM TP rank: build each case's model, then serve weight-transfer calls until "done"."""
    try:
        _engine(rank, tp, port, cases, scratch, commands[rank], replies, results, timeout_s)
        results.put(("engine", rank, "ok", None))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put(("engine", rank, "error", f"{e!r}\n{traceback.format_exc()}"))


def _engine(rank, tp, port, cases, scratch, commands, replies, results, timeout_s) -> None:
    from vllm.config import (DeviceConfig, ModelConfig, ParallelConfig, VllmConfig, WeightTransferConfig,
                             set_current_vllm_config)
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_model_parallel

    from fsdp_sync.engines.vllm_transfer import BACKEND, register
    from tests.engines.make_vllm_fixtures import offer_triton_block_fp8_on_cpu

    register()  # what vLLM's general-plugin entry point does in an installed fsdp_sync
    offer_triton_block_fp8_on_cpu()

    def new_config(case: TransferCase) -> VllmConfig:
        model_config = ModelConfig(model=str(Path(scratch) / case.name), skip_tokenizer_init=True,
                                   enforce_eager=True, dtype="bfloat16")
        return VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"),
                          parallel_config=ParallelConfig(tensor_parallel_size=tp),
                          weight_transfer_config=(WeightTransferConfig(backend=BACKEND)
                                                  if case.path == "native" else None))

    def reference(case: TransferCase, salt: str) -> dict[str, list]:
        """A second model, loaded by vLLM itself; under its own config, where its attention
        layers register (layer names are unique per config)."""
        config = new_config(case)
        with set_current_vllm_config(config):
            return _described(_build(config, case.config, salt=salt))

    first = True
    for case in cases:
        vllm_config = new_config(case)
        with set_current_vllm_config(vllm_config):
            if first:
                init_distributed_environment(world_size=tp, rank=rank, local_rank=rank, backend="gloo",
                                             distributed_init_method=f"tcp://127.0.0.1:{port}")
                first = False
            initialize_model_parallel(tp)
            model = _build(vllm_config, case.config, salt="", complete=case.refused is None)
            worker = _rpc_worker_cls(case.path)(vllm_config, model, rank)
            results.put(("engine", rank, case.name, "backend", type(worker.weight_transfer_engine).__name__))
            while True:
                method, kwargs = commands.get(timeout=timeout_s)  # a trainer that died ends this job too
                if method == "done":
                    break
                try:
                    getattr(worker, method)(**kwargs)
                    replies.put((rank, method, None))
                except Exception as e:  # noqa: BLE001 - the trainer's client raises it
                    replies.put((rank, method, f"{type(e).__name__}: {e}"))
                    continue
                if method in ("finish_weight_update", "fsdp_sync_commit"):  # a version went live
                    version = worker.live_version()
                    got = _described(model)
                    want = reference(case, case.salts[version - 1])
                    diff = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
                    results.put(("engine", rank, case.name, version, {"compared": len(want), "differ": diff}))
            if case.path == "native":
                worker.shutdown_weight_transfer_engine()
            else:
                worker._fsdp_sync.receiver.close()
            del model, worker
            destroy_model_parallel()


class QueueClient:
    """A ``VLLMWeightSyncClient`` over queues: each call runs on every worker (as
    ``collective_rpc`` does) and returns once all did, raising the first worker's error."""

    def __init__(self, commands, replies, timeout_s: float) -> None:
        self.commands, self.replies, self.timeout_s = commands, replies, timeout_s

    def _call(self, method: str, **kwargs) -> None:
        for q in self.commands:
            q.put((method, kwargs))
        errors = []
        for _ in self.commands:
            try:
                rank, got, error = self.replies.get(timeout=self.timeout_s)
            except queue.Empty:
                raise TimeoutError(f"{method}: no reply from the workers in {self.timeout_s:.0f} s") from None
            assert got == method, (got, method)
            if error:
                errors.append(f"worker {rank}: {error}")
        if errors:
            raise RuntimeError(f"{method} failed: " + "; ".join(errors))

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._call("init_weight_transfer_engine", init_info=init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._call("update_weights", update_info=update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update")

    def collective_rpc(self, method: str, **kwargs) -> None:  # the worker extension's calls
        self._call(method, **kwargs)

    def done(self) -> None:
        for q in self.commands:
            q.put(("done", {}))


# ---- trainer side ----------------------------------------------------------------------

def _hf_module(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose named_parameters are exactly ``tensors`` (HF names)."""
    root = nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, nn.Parameter(t.clone()))
    return root


def trainer(rank: int, world_size: int, cases: list[TransferCase], commands, replies, results,
            timeout_s: float) -> list:
    """One FSDP2 rank (``recipes.jobs.start_job`` made the gloo world): per case, trainer_init
    through vLLM's trainer factory, then one send_weights per version."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

    from fsdp_sync import SyncConfig
    from fsdp_sync.engines.vllm_transfer import TrainerInitInfo, register
    from tests.engines.vllm_cases import hf_tensors

    register()
    client = QueueClient(commands, replies, timeout_s) if rank == 0 else None
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("shard",))
    for case in cases:
        model = _hf_module(hf_tensors(case.config, salt=case.salts[0]))
        fully_shard(model, mesh=mesh)
        config = SyncConfig(control=f"127.0.0.1:{case.port}", job=case.name, quant=case.quant, transport="gloo",
                            timeout_s=timeout_s, connect_timeout_s=timeout_s)
        if case.path == "extension":
            _extension_round(rank, case, model, mesh, config, client, results, timeout_s)
            continue
        try:
            engine = WeightTransferTrainerFactory.trainer_init(TrainerInitInfo(config=config, rank=rank),
                                                               client=client, source=ModuleSource(model))
        except RuntimeError as e:  # every rank: trainer_init shares rank 0's outcome
            results.put(("trainer", rank, case.name, "init", str(e)))
            if rank == 0:
                client.done()
            continue
        results.put(("trainer", rank, case.name, "engine", type(engine).__name__))
        for version, salt in enumerate(case.salts, start=1):
            if version > 1:
                _set_values(model, hf_tensors(case.config, salt=salt), mesh)
            result = engine.send_weights()
            results.put(("trainer", rank, case.name, version, result.version))
        engine.shutdown()
        if rank == 0:
            client.done()
    return []


def _set_values(model: nn.Module, tensors: dict[str, torch.Tensor], mesh) -> None:
    """The next version's values, into the shards FSDP2 holds."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.to_local().copy_(distribute_tensor(tensors[name], mesh, p.placements).to_local())


def _extension_round(rank, case, model, mesh, config, client, results, timeout_s) -> None:
    """The worker-extension path: a WeightSender, and ``collective_rpc`` of its three methods."""
    from dataclasses import asdict

    from fsdp_sync import WeightSender
    from tests.engines.vllm_cases import hf_tensors

    sender = WeightSender(model, config)
    if rank == 0:
        client.collective_rpc("fsdp_sync_register", config=asdict(config), commit="staged")
    results.put(("trainer", rank, case.name, "engine", "FsdpSyncWorkerExtension"))
    for version, salt in enumerate(case.salts, start=1):
        if version > 1:
            _set_values(model, hf_tensors(case.config, salt=salt), mesh)
        result = sender.push(version).wait()
        if rank == 0:
            client.collective_rpc("fsdp_sync_wait_for", version=version, timeout=timeout_s)
            client.collective_rpc("fsdp_sync_commit")
        results.put(("trainer", rank, case.name, version, result.version))
    sender.close()
    if rank == 0:
        client.done()
