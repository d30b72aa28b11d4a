"""Configuration dataclasses: the source of truth that Hydra's structured configs mirror.

Plain dataclasses with keyword-only fields, validated on construction so a bad setting
fails with its name before anything connects or moves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .quant import DEFAULT_QUANT_SKIP, QUANT_FORMATS

# Bumped whenever what the two jobs exchange on the control plane changes meaning.
PROTOCOL_VERSION = 3  # 3: a push announcement carries its delta base and whether it is verified
SHARED_SETTINGS = ("quant", "mode", "delta")  # SyncConfig fields both jobs must set alike
MODES = ("direct", "reconstruct")
TRANSPORTS = ("auto", "gloo", "shm", "cuda_ipc", "nccl", "rdma")  # see fsdp_sync.transport
# auto: grouped Triton launches on GPU, the torch reference on CPU. grouped / per_box force
# Triton (on CPU under TRITON_INTERPRET=1, for tests); reference forces plain torch.
KERNELS = ("auto", "grouped", "per_box", "reference")
# off: every push is full. on: a push after a good one sends only what changed (see
# fsdp_sync.delta). auto: as on, but a piece whose encoded change is not smaller goes dense.
DELTA_MODES = ("off", "auto", "on")
# Where a delta sender keeps the last payload it sent (its shadow): beside its weights, or in
# pinned host memory, which a GPU sender's kernels read and write over PCIe (UVA): device
# memory saved, every delta pass PCIe-bound.
DELTA_SHADOWS = ("device", "pinned")
# After a failed push: "fail" keeps every registered receiver in the plan (the next push
# waits for them all again); "drop" leaves out the receivers whose heartbeat stopped and
# pushes on to the rest, and plans with the receivers registered so far.
RECEIVER_FAILURE_POLICIES = ("fail", "drop")
SECRET_ENV = "FSDP_SYNC_SECRET"  # read when SyncConfig.secret is None


@dataclass(kw_only=True)
class LinkModel:
    """Bandwidths (GB/s) the planner balances against and computes its floor from."""

    intra_host_gbps: float = 20.0  # same host: NVLink / shared memory
    inter_host_gbps: float = 12.5  # across hosts: one 100 Gb/s NIC per rank
    hbm_gbps: float = 20.0  # memory of one device

    def __post_init__(self) -> None:
        for name in ("intra_host_gbps", "inter_host_gbps", "hbm_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LinkModel.{name} must be > 0, got {getattr(self, name)}")


# Buffers that change in training and that engines hold as parameters: synced by default.
# DeepSeek-V3 / Kimi-K2 routers update e_score_correction_bias outside the optimizer.
DEFAULT_SYNC_BUFFERS = (r"\.e_score_correction_bias$",)


@dataclass(kw_only=True)
class SyncConfig:
    """Settings shared by the trainer (senders) and the inference job (receivers)."""

    control: str = "127.0.0.1:29600"  # host:port of the control-plane TCPStore
    job: str = "default"  # namespace of every control key: one per trainer/engine pair
    host_control: bool = True  # trainer rank 0 hosts the store; False: one already runs at `control`
    quant: str = "none"  # none | fp8_block | fp8_rowwise | fp8_tensor
    quant_skip: tuple[str, ...] = DEFAULT_QUANT_SKIP  # names kept in high precision
    buffers: tuple[str, ...] = DEFAULT_SYNC_BUFFERS  # patterns of named buffers synced like parameters
    mode: str = "direct"  # direct | reconstruct
    transport: str = "gloo"
    watermark_mb: float = 256.0  # bound on a sender's temporary bytes in flight
    timeout_s: float = 120.0  # any wait on a peer longer than this is an error
    # Reaching the control-plane store (a receiver may start before the trainer hosts it).
    # Apart from timeout_s: a push's short deadline must not make connecting fail on a busy host.
    connect_timeout_s: float = 60.0
    wait_for_receivers: bool = True  # push().wait() returns once every receiver committed
    trace_dir: str | None = None  # write a Chrome trace of each push per rank here
    fused_writes: bool = True  # one-sided transports: kernels store straight into the destination
    kernels: str = "auto"  # FP8 kernels: auto | grouped (one launch per bucket) | per_box | reference
    on_receiver_failure: str = "fail"  # fail | drop: what a failed push does to a dead receiver
    check_finite: bool = False  # refuse inf/NaN in tensors sent unquantized too (FP8 ones always are)
    delta: str = "off"  # off | auto | on: send only what changed since the receiver's last version
    verify_every: int = 0  # every N-th push both sides hash every destination and compare (0: never)
    delta_shadow: str = "device"  # device | pinned: where a sender's shadow of what it sent lives
    links: LinkModel = field(default_factory=LinkModel)
    # Shared secret that signs every control value (HMAC-SHA256); None: $FSDP_SYNC_SECRET if
    # set, else unsigned. Never printed: repr=False, and only its HMAC state is kept once connected.
    secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.quant not in QUANT_FORMATS:
            raise ValueError(f"SyncConfig.quant={self.quant!r} is not one of {sorted(QUANT_FORMATS)}")
        if self.mode not in MODES:
            raise ValueError(f"SyncConfig.mode={self.mode!r} is not one of {list(MODES)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"SyncConfig.transport={self.transport!r} is not one of {list(TRANSPORTS)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"SyncConfig.kernels={self.kernels!r} is not one of {list(KERNELS)}")
        if self.on_receiver_failure not in RECEIVER_FAILURE_POLICIES:
            raise ValueError(f"SyncConfig.on_receiver_failure={self.on_receiver_failure!r} is not one of "
                             f"{list(RECEIVER_FAILURE_POLICIES)}")
        if self.delta not in DELTA_MODES:
            raise ValueError(f"SyncConfig.delta={self.delta!r} is not one of {list(DELTA_MODES)}")
        if self.delta_shadow not in DELTA_SHADOWS:
            raise ValueError(f"SyncConfig.delta_shadow={self.delta_shadow!r} is not one of {list(DELTA_SHADOWS)}")
        if type(self.verify_every) is not int or self.verify_every < 0:
            raise ValueError(f"SyncConfig.verify_every must be an int >= 0, got {self.verify_every!r}")
        if self.watermark_mb <= 0:
            raise ValueError(f"SyncConfig.watermark_mb must be > 0, got {self.watermark_mb}")
        for name in ("timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyncConfig.{name} must be > 0, got {getattr(self, name)}")
        host, sep, port = self.control.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"SyncConfig.control={self.control!r} must be host:port")
        if self.secret is not None and not isinstance(self.secret, str) or self.secret == "":
            raise ValueError(f"SyncConfig.secret must be a non-empty str or None (None reads ${SECRET_ENV})")
        if isinstance(self.links, dict):
            self.links = LinkModel(**self.links)
        self.quant_skip = tuple(self.quant_skip)
        self.buffers = tuple(self.buffers)

    def shared_settings(self) -> dict[str, object]:
        """What a receiver registers and the controller compares with its own, before planning."""
        return {"protocol": PROTOCOL_VERSION, **{name: getattr(self, name) for name in SHARED_SETTINGS}}

    def resolved_secret(self) -> str | None:
        """The secret that signs control values: ``secret``, else $FSDP_SYNC_SECRET, else None."""
        return self.secret if self.secret is not None else (os.environ.get(SECRET_ENV) or None)

    @property
    def control_host(self) -> str:
        return self.control.rpartition(":")[0]

    @property
    def control_port(self) -> int:
        return int(self.control.rpartition(":")[2])

    @property
    def watermark_bytes(self) -> int:
        return int(self.watermark_mb * 2**20)
