"""Configuration dataclasses: the source of truth that Hydra's structured configs mirror.

Plain dataclasses with keyword-only fields, validated on construction so a bad setting
fails with its name before anything connects or moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .quant import DEFAULT_QUANT_SKIP, QUANT_FORMATS

MODES = ("direct", "reconstruct")
TRANSPORTS = ("auto", "gloo", "shm", "cuda_ipc", "nccl", "rdma")  # see fsdp_sync.transport
# auto: grouped Triton launches on GPU, the torch reference on CPU. grouped / per_box force
# Triton (on CPU under TRITON_INTERPRET=1, for tests); reference forces plain torch.
KERNELS = ("auto", "grouped", "per_box", "reference")


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
    wait_for_receivers: bool = True  # push().wait() returns once every receiver committed
    trace_dir: str | None = None  # write a Chrome trace of each push per rank here
    fused_writes: bool = True  # one-sided transports: kernels store straight into the destination
    kernels: str = "auto"  # FP8 kernels: auto | grouped (one launch per bucket) | per_box | reference
    links: LinkModel = field(default_factory=LinkModel)

    def __post_init__(self) -> None:
        if self.quant not in QUANT_FORMATS:
            raise ValueError(f"SyncConfig.quant={self.quant!r} is not one of {sorted(QUANT_FORMATS)}")
        if self.mode not in MODES:
            raise ValueError(f"SyncConfig.mode={self.mode!r} is not one of {list(MODES)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"SyncConfig.transport={self.transport!r} is not one of {list(TRANSPORTS)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"SyncConfig.kernels={self.kernels!r} is not one of {list(KERNELS)}")
        if self.watermark_mb <= 0:
            raise ValueError(f"SyncConfig.watermark_mb must be > 0, got {self.watermark_mb}")
        if self.timeout_s <= 0:
            raise ValueError(f"SyncConfig.timeout_s must be > 0, got {self.timeout_s}")
        host, sep, port = self.control.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"SyncConfig.control={self.control!r} must be host:port")
        if isinstance(self.links, dict):
            self.links = LinkModel(**self.links)
        self.quant_skip = tuple(self.quant_skip)
        self.buffers = tuple(self.buffers)

    @property
    def control_host(self) -> str:
        return self.control.rpartition(":")[0]

    @property
    def control_port(self) -> int:
        return int(self.control.rpartition(":")[2])

    @property
    def watermark_bytes(self) -> int:
        return int(self.watermark_mb * 2**20)
