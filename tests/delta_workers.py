"""Trainer and receiver processes for the delta-push tests (real FSDP2, AdamW, gloo, TCPStore).

Each trainer rank runs two senders over the same model, one with delta on and one
pushing in full, under two job names; each receiver rank holds a destination set for
each. After every optimizer step both push the same version, and the receivers compare
the two sets bit for bit: the delta contract, at every version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fsdp_sync import LayoutSpec, SyncConfig, WeightReceiver, WeightSender, allocate_destinations
from fsdp_sync.delta import bits
from recipes.jobs import pack
from recipes.tiny_llama import apply_fsdp, build_model, param_shapes, tiny_llama_config
from tests.timeouts import scaled


@dataclass
class DeltaCase:
    name: str
    quant: str
    mode: str
    transport: str
    port: int  # the delta job's store
    full_port: int  # the full job's
    delta: str = "auto"
    tp: int = 1
    hsdp: bool = False  # the trainer's 2 ranks as HSDP (2 replicas of 1 shard) instead of FSDP over 2
    commit: str = "in_place"
    lr: float = 1e-5
    dtype: torch.dtype = torch.float32  # of the trainer's parameters (and the unquantized destinations)
    versions: int = 50
    verify_every: int = 0
    # version -> what happens just before it is pushed: "diverge" (receiver 0 forgets which version
    # its delta buffers hold), "reregister" (receiver 0's delta side restarts), "corrupt" (a byte of
    # receiver 0's delta buffers changes behind the library's back)
    events: dict[int, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    kernels: str = "auto"  # SyncConfig.kernels of the delta job (grouped: Triton, interpreted on CPU)
    device: str = "cpu"  # "cuda": every process on the GPU recipes.jobs.start_job gave it
    delta_shadow: str = "device"  # SyncConfig.delta_shadow of the delta job

    def config(self, delta: bool) -> SyncConfig:
        return SyncConfig(control=f"127.0.0.1:{self.port if delta else self.full_port}",
                          job=f"{self.name}-{'delta' if delta else 'full'}", quant=self.quant, mode=self.mode,
                          transport=self.transport, timeout_s=scaled(self.timeout_s), connect_timeout_s=scaled(60),
                          delta=self.delta if delta else "off", verify_every=self.verify_every if delta else 0,
                          kernels=self.kernels if delta else "auto", delta_shadow=self.delta_shadow)

    def layout(self, rank: int) -> LayoutSpec:
        return LayoutSpec("hf_tp", {"tp_rank": rank % self.tp, "tp_size": self.tp}) if self.tp > 1 else \
            LayoutSpec("identity")


def _model_config():
    return tiny_llama_config(num_hidden_layers=1, vocab_size=256)


def _device(case: DeltaCase) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if case.device == "cuda" else torch.device("cpu")


def trainer(rank: int, world_size: int, cases: list[DeltaCase], results, barrier) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    for case in cases:
        device = _device(case)
        mesh = (init_device_mesh(case.device, (world_size, 1), mesh_dim_names=("replicate", "shard")) if case.hsdp
                else init_device_mesh(case.device, (world_size,), mesh_dim_names=("shard",)))
        model = apply_fsdp(build_model(_model_config(), seed=0, dtype=case.dtype).to(device), mesh)
        optim = torch.optim.AdamW(model.parameters(), lr=case.lr, weight_decay=0.0)
        delta, full = WeightSender(model, case.config(True)), WeightSender(model, case.config(False))
        report = []
        for version in range(1, case.versions + 1):
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(version)).to(device)
            model(input_ids=ids, labels=ids).loss.backward()
            optim.step()
            optim.zero_grad()
            barrier.wait(timeout=scaled(case.timeout_s))  # receivers staged this version's events
            try:
                r = delta.push(version).wait()
                report.append((version, r.delta_base, r.bytes_sent, r.full_bytes, r.changed_fraction, r.shadow_bytes))
            except Exception as e:  # noqa: BLE001 - the test inspects it
                report.append((version, "error", f"{type(e).__name__}: {e}"))
            full.push(version).wait()
            barrier.wait(timeout=scaled(case.timeout_s))  # receivers compared this version
        results.put(("trainer", rank, case.name, "report", pack(report)))
        shadows = [s for _, s in delta._stores._shadows.values()] if delta._stores is not None else []
        shadows += list(delta._delta.shadows.values()) if delta._delta is not None else []
        results.put(("trainer", rank, case.name, "shadows", pack(sorted({str(s.device) + (" pinned" if s.is_pinned()
                                                                          else "") for s in shadows}))))
        delta.close()
        full.close()


def _receiver(case: DeltaCase, rank: int, delta: bool) -> WeightReceiver:
    layout = case.layout(rank)
    dests = allocate_destinations(param_shapes(_model_config(), case.dtype), layout=layout, quant=case.quant,
                                  device=_device(case))
    return WeightReceiver(dests, config=case.config(delta), layout=layout.name, layout_kwargs=layout.kwargs,
                          commit=case.commit)


def receiver(rank: int, world_size: int, cases: list[DeltaCase], results, barrier) -> None:
    for case in cases:
        delta, full = _receiver(case, rank, True), _receiver(case, rank, False)
        report = []
        for version in range(1, case.versions + 1):
            event = case.events.get(version) if rank == 0 else None
            if event == "diverge":
                delta._buffer_version = -1  # as if its buffers held some other version
            elif event == "reregister":
                delta.close()
                delta = _receiver(case, rank, True)
            elif event == "corrupt":
                name = next(n for n in delta.tensors if n.endswith("down_proj.weight"))
                bits(delta._staging[name]).view(-1)[7] ^= 0x10  # the buffer deltas build on
            barrier.wait(timeout=scaled(case.timeout_s))
            try:
                delta.wait_for(version)
                error = None
            except Exception as e:  # noqa: BLE001 - the test inspects it
                error = f"{type(e).__name__}: {e}"
            full.wait_for(version)
            if case.commit == "staged":
                delta.commit()
                full.commit()
            differ = sorted(n for n, t in full.tensors.items() if not torch.equal(bits(t), bits(delta.tensors[n])))
            report.append((version, delta.version, error, differ))
            barrier.wait(timeout=scaled(case.timeout_s))
        results.put(("receiver", rank, case.name, "report", pack(report)))
        delta.close()
        full.close()


