"""Trainer and receiver processes for the multi-process sync tests (real FSDP2, gloo, TCPStore).

Each case builds a fresh sender and receivers under its own job name and control port,
pushes two versions with an optimizer step between them, and ships the trainer's
full tensors and every receiver's tensors back to the test as bytes.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fsdp_sync import LayoutSpec, SyncConfig, WeightReceiver, WeightSender, allocate_destinations
from fsdp_sync.param_scan import synced_buffers
from recipes.jobs import pack
from recipes.tiny_llama import apply_fsdp, build_model, param_shapes, tiny_llama_config
from tests.timeouts import scaled

DTYPE = torch.bfloat16


@dataclass
class Case:
    name: str
    model: str  # "llama" or "odd"
    mesh: tuple[int, ...]  # (shard,) for FSDP, (replicate, shard) for HSDP
    num_receivers: int
    tp: int  # TP degree of one receiver replica
    quant: str
    mode: str
    port: int
    transport: str = "gloo"
    versions: int = 2
    watermark_mb: float = 256.0
    kill_sender_at_version: int | None = None  # SIGKILL trainer rank 1 mid-push of this version
    inf_at: tuple[str, int] | None = None  # (param, version): trainer rank 0 puts an inf in its shard first
    commit: str = "in_place"  # the receivers' commit mode; staged ones commit each version they land
    check_finite: bool = False
    timeout_s: float = 60.0
    extra: dict = field(default_factory=dict)
    device: str = "cpu"  # "cuda": each process on its own GPU (see recipes.jobs.start_job)
    kernels: str = "auto"
    secret: str | None = None  # both jobs sign their control values with it
    llama: dict = field(default_factory=dict)  # tiny_llama_config overrides: smaller where size tests nothing

    def __post_init__(self) -> None:
        self.timeout_s = scaled(self.timeout_s)  # once, in the test process: workers get the pickled value

    def config(self) -> SyncConfig:
        return SyncConfig(control=f"127.0.0.1:{self.port}", job=self.name, quant=self.quant, mode=self.mode,
                          transport=self.transport, timeout_s=self.timeout_s, watermark_mb=self.watermark_mb,
                          connect_timeout_s=scaled(60), kernels=self.kernels, check_finite=self.check_finite,
                          secret=self.secret)

    def layout(self, receiver: int) -> LayoutSpec:
        if self.tp == 1:
            return LayoutSpec("identity")
        return LayoutSpec("hf_tp", {"tp_rank": receiver % self.tp, "tp_size": self.tp})


class OddModel(nn.Module):
    """Shapes that do not divide by the world size, one with fewer rows than ranks, partial FP8 blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(257, 130, bias=True)  # 130 rows over 4 ranks: 33, 33, 33, 31
        self.tiny = nn.Parameter(torch.randn(3, 200) * 0.1)  # 3 rows over 4 ranks: one holds none
        self.wide = nn.Parameter(torch.randn(7, 300) * 0.1)
        self.scale = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).pow(2).mean() + self.tiny.pow(2).sum() + self.wide.pow(2).sum() + self.scale.pow(2).sum()


class RouterModel(OddModel):
    """OddModel plus a DeepSeek-style router buffer that training moves outside the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Module()
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(5, dtype=torch.float32))


def _model(case: Case) -> nn.Module:
    if case.model == "llama":
        return build_model(tiny_llama_config(**case.llama), seed=0, dtype=DTYPE)
    torch.manual_seed(0)
    if case.model == "router":
        model = RouterModel().to(DTYPE)
        model.gate.e_score_correction_bias = model.gate.e_score_correction_bias.float()  # kept in fp32, as DeepSeek's
        return model
    return OddModel().to(DTYPE)


def _device(case: Case) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if case.device == "cuda" else torch.device("cpu")


def _shapes(case: Case) -> dict:
    if case.model == "llama":
        return param_shapes(tiny_llama_config(**case.llama), DTYPE)
    shapes = {n: (tuple(p.shape), DTYPE) for n, p in OddModel().named_parameters()}
    if case.model == "router":
        shapes["gate.e_score_correction_bias"] = ((5,), torch.float32)
    return shapes


def _step(case: Case, model: nn.Module, optim: torch.optim.Optimizer, version: int) -> None:
    gen = torch.Generator().manual_seed(version)
    device = _device(case)
    if case.model == "llama":
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=gen).to(device)
        model(input_ids=ids, labels=ids).loss.backward()
    else:
        model(torch.randn(4, 257, generator=gen).to(DTYPE).to(device)).backward()
    optim.step()
    optim.zero_grad()
    if case.model == "router":  # DeepSeek-V3 nudges the bias by load balance, outside the optimizer
        model.gate.e_score_correction_bias.add_(torch.arange(5.0, device=device) * version / 8)


def trainer(rank: int, world_size: int, cases: list[Case], results, barrier) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    for case in cases:
        names = ("replicate", "shard") if len(case.mesh) == 2 else ("shard",)
        mesh = init_device_mesh(case.device, case.mesh, mesh_dim_names=names)
        model = _model(case).to(_device(case))
        if case.model == "llama":
            apply_fsdp(model, mesh)
        else:
            from torch.distributed.fsdp import fully_shard
            fully_shard(model, mesh=mesh)
        optim = torch.optim.SGD(model.parameters(), lr=0.1)
        def die_mid_push(done: int, total: int, v=case.kill_sender_at_version) -> None:
            if sender.version == v:
                # Flushed first: a process killed while its feeder thread holds the queue's
                # write lock leaves it taken, and every other process's report blocks for good.
                results.close()
                results.join_thread()
                os.kill(os.getpid(), signal.SIGKILL)

        doomed = case.kill_sender_at_version is not None and rank == 1
        sender = WeightSender(model, case.config(), progress=die_mid_push if doomed else None)
        for version in range(1, case.versions + 1):
            _step(case, model, optim, version)
            if case.inf_at is not None and case.inf_at[1] == version and rank == 0:
                with torch.no_grad():  # the shard FSDP2 holds, in place: what the sender reads
                    dict(model.named_parameters())[case.inf_at[0]].to_local().view(-1)[1] = float("inf")
            outcome = {}
            try:
                outcome["result"] = sender.push(version).wait()
            except Exception as e:  # noqa: BLE001 - the test inspects it
                outcome["error"] = repr(e)
            full = ({n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()}
                    if "error" not in outcome else None)
            if full is not None:
                full |= {n: b.detach().cpu() for n, b in synced_buffers(model, case.config().buffers)}
            results.put(("trainer", rank, case.name, version, pack({"full": full, "plans": sender.num_plans_built, **outcome})))
            if "error" in outcome:
                break
            barrier.wait(timeout=case.timeout_s)
        if case.extra.get("report_replays"):  # buckets whose launches were recorded, of how many
            results.put(("trainer", rank, case.name, "replays",
                         pack((sorted(sender._packer._replays), len(sender._plan.buckets)))))
        if case.extra.get("report_reduce"):  # per bucket: whether direct mode still all-reduces amaxes
            results.put(("trainer", rank, case.name, "reduce", pack(sorted(sender._packer._reduce.items()))))
        if case.extra.get("bad_version"):
            try:
                sender.push(1)
                results.put(("trainer", rank, case.name, "bad_version", pack("no error")))
            except ValueError as e:
                results.put(("trainer", rank, case.name, "bad_version", pack(str(e))))
        if case.extra.get("add_param"):
            model.register_parameter("extra_bias", nn.Parameter(torch.zeros(4, dtype=DTYPE)))
            try:
                sender.push().wait()
                results.put(("trainer", rank, case.name, "add_param", pack("no error")))
            except Exception as e:  # noqa: BLE001 - the test inspects it
                results.put(("trainer", rank, case.name, "add_param", pack(f"{type(e).__name__}: {e}")))
            del model._parameters["extra_bias"]  # fixed: the next push must plan and land again
            try:
                handle = sender.push()
                if case.extra.get("late_close") and rank != 0:
                    time.sleep(1.0)  # reads its acks late: rank 0, which hosts the store, must still be there
                handle.wait()
                results.put(("trainer", rank, case.name, "after_fix", pack(f"ok {sender.num_plans_built}")))
            except Exception as e:  # noqa: BLE001 - the test inspects it
                results.put(("trainer", rank, case.name, "after_fix", pack(f"{type(e).__name__}: {e}")))
        sender.close()
        if case.extra.get("memory_back"):
            barrier.wait(timeout=case.timeout_s)  # every sender unmapped the receivers' buffers
        if case.extra.get("late_close"):
            started = time.perf_counter()
            sender.close()  # a second close is a no-op: no second wait for the other ranks
            results.put(("trainer", rank, case.name, "second_close_s", pack(time.perf_counter() - started)))


def receiver(rank: int, world_size: int, cases: list[Case], results, barrier) -> None:
    for case in cases:
        layout = case.layout(rank)
        reserved = torch.cuda.memory_reserved() if case.device == "cuda" else 0
        dests = allocate_destinations(_shapes(case), layout=layout, quant=case.quant, device=_device(case))
        recv = WeightReceiver(dests, config=case.config(), layout=layout.name, layout_kwargs=layout.kwargs,
                              commit=case.commit)
        for version in range(1, case.versions + 1):
            try:
                got = recv.wait_for(version)
                if case.commit == "staged":
                    recv.commit()
                tensors = {n: t.cpu() for n, t in recv.tensors.items()}
                results.put(("receiver", rank, case.name, version, pack({"version": got, "tensors": tensors})))
            except Exception as e:  # noqa: BLE001 - the test inspects it
                # What the engine serves after the failure: staged receivers keep their last version.
                tensors = {n: t.cpu() for n, t in recv.tensors.items()}
                results.put(("receiver", rank, case.name, version,
                             pack({"error": f"{type(e).__name__}: {e}", "version": recv.version, "tensors": tensors})))
                break
            barrier.wait(timeout=case.timeout_s)
        if case.extra.get("add_param"):
            try:
                recv.wait_for(case.versions + 1, timeout=case.timeout_s)  # the refused push raises here
                results.put(("receiver", rank, case.name, "add_param", pack("no error")))
            except Exception as e:  # noqa: BLE001 - the test inspects it
                results.put(("receiver", rank, case.name, "add_param", pack(f"{type(e).__name__}: {e}")))
            try:
                results.put(("receiver", rank, case.name, "after_fix",
                             pack(f"version {recv.wait_for(case.versions + 1, timeout=case.timeout_s)}")))
            except Exception as e:  # noqa: BLE001 - the test inspects it
                results.put(("receiver", rank, case.name, "after_fix", pack(f"{type(e).__name__}: {e}")))
        recv.close()
        if case.extra.get("memory_back"):
            barrier.wait(timeout=case.timeout_s)  # every sender closed: nobody maps our buffers now
            del dests, recv
            gc.collect()
            torch.cuda.ipc_collect()  # exports whose senders all unmapped them leave torch's IPC limbo
            torch.cuda.empty_cache()
            results.put(("receiver", rank, case.name, "reserved", pack((reserved, torch.cuda.memory_reserved()))))
