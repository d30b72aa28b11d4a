"""Find the RDMA NIC and port a process should use, and the knobs it runs with.

Each GPU should talk through its nearest NIC: the one behind the same PCIe switch,
else on the same NUMA node. sysfs tells both; an explicit mapping in
``FSDP_SYNC_RDMA_DEVICES`` overrides it. With no usable device the answer is a
reason in words, so ``transport="auto"`` can fall back to NCCL and say why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import SyncError

SYSFS_RDMA = "/sys/class/infiniband"
SYSFS_PCI = "/sys/bus/pci/devices"
GPU_REGISTRATION = ("auto", "dmabuf", "peermem")
_FALLBACK = "use transport='nccl' (GPUs, any network) or transport='gloo' (CPU) instead"


@dataclass(frozen=True, kw_only=True)
class RdmaOptions:
    """Settings from ``FSDP_SYNC_RDMA_*`` environment variables (see docs/rdma.md)."""

    devices: tuple[str, ...] = ()  # "mlx5_0[:port]" for every process, or one per local GPU index
    gid_index: int | None = None  # None: RoCE v2 with an IPv4 address if any, else the first valid GID
    traffic_class: int = 0
    service_level: int = 0
    signal_every: int = 32  # one signalled completion per this many writes
    max_outstanding: int = 512  # writes in flight per queue pair
    max_wr_mb: float = 1024.0  # largest single write; longer runs are split
    qp_timeout: int = 14  # local ACK timeout: 4.096 us * 2**qp_timeout (14: ~67 ms)
    retry_count: int = 7
    gpu_registration: str = "auto"  # auto | dmabuf | peermem

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RdmaOptions":
        def number(name: str, kind: type, low: float, high: float | None = None):
            raw = env.get(name)
            if raw is None:
                return None
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a {kind.__name__}") from None
            if value < low or (high is not None and value > high):
                raise ValueError(f"{name}={raw!r} must be in [{low}, {high if high is not None else 'inf'}]")
            return value

        found = {
            "gid_index": number("FSDP_SYNC_RDMA_GID_INDEX", int, 0, 255),
            "traffic_class": number("FSDP_SYNC_RDMA_TRAFFIC_CLASS", int, 0, 255),
            "service_level": number("FSDP_SYNC_RDMA_SL", int, 0, 15),
            "signal_every": number("FSDP_SYNC_RDMA_SIGNAL_EVERY", int, 1),
            "max_outstanding": number("FSDP_SYNC_RDMA_MAX_OUTSTANDING", int, 1),
            "max_wr_mb": number("FSDP_SYNC_RDMA_MAX_WR_MB", float, 1e-3, 2048),
            "qp_timeout": number("FSDP_SYNC_RDMA_QP_TIMEOUT", int, 1, 31),
            "retry_count": number("FSDP_SYNC_RDMA_RETRY_COUNT", int, 0, 7),
        }
        if devices := env.get("FSDP_SYNC_RDMA_DEVICES"):
            found["devices"] = tuple(d.strip() for d in devices.split(","))
            for entry in found["devices"]:
                parse_device(entry, name="FSDP_SYNC_RDMA_DEVICES")
        if (reg := env.get("FSDP_SYNC_RDMA_GPU_REG")) is not None:
            if reg not in GPU_REGISTRATION:
                raise ValueError(f"FSDP_SYNC_RDMA_GPU_REG={reg!r} is not one of {list(GPU_REGISTRATION)}")
            found["gpu_registration"] = reg
        options = cls(**{k: v for k, v in found.items() if v is not None})
        if options.max_outstanding < options.signal_every:
            raise ValueError(f"FSDP_SYNC_RDMA_MAX_OUTSTANDING ({options.max_outstanding}) must be >= "
                             f"FSDP_SYNC_RDMA_SIGNAL_EVERY ({options.signal_every})")
        return options

    @property
    def max_wr_bytes(self) -> int:
        return int(self.max_wr_mb * 2**20)


@dataclass(frozen=True)
class NicPort:
    """One port of one RDMA device, as far as this process needs to know it."""

    device: str
    port: int
    active: bool
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    lid: int
    gid_index: int
    gid: str
    mtu: int  # ibv_mtu enum value
    max_msg_bytes: int
    max_qp_wr: int
    numa_node: int
    pci_path: str  # resolved sysfs path of the PCI function, "" if unknown


def parse_device(entry: str, *, name: str) -> tuple[str, int | None]:
    """``mlx5_0`` or ``mlx5_0:1`` -> (device, port or None)."""
    device, _, port = entry.partition(":")
    if not device or (port and not port.isdigit()):
        raise ValueError(f"{name}: {entry!r} is not 'device' or 'device:port' (e.g. mlx5_0:1)")
    return device, int(port) if port else None


def choose_gid(entries: Sequence[tuple[int, str, str]], link_layer: str, forced: int | None) -> tuple[int, str]:
    """Pick a GID index from (index, gid, type) entries, where type is "IB", "RoCE v1" or "RoCE v2".

    RoCE needs a routable GID that both ends agree on: RoCE v2 with an IPv4-mapped
    address first, then any RoCE v2, then anything valid. InfiniBand takes the first valid one.
    """
    valid = [(i, g, t) for i, g, t in entries if g.replace(":", "").strip("0")]
    if forced is not None:
        for i, g, _ in entries:
            if i == forced:
                return i, g
        raise ValueError(f"FSDP_SYNC_RDMA_GID_INDEX={forced} is not in this port's GID table")
    if not valid:
        raise SyncError("rdma: the port has no valid GID (is the interface up and does it have an address?)")
    if link_layer == "Ethernet":
        v2 = [e for e in valid if e[2] == "RoCE v2"]
        ipv4 = [e for e in v2 if e[1].lower().startswith("0000:0000:0000:0000:0000:ffff:")]
        valid = ipv4 or v2 or valid
    index, gid, _ = valid[0]
    return index, gid


def nearest_nic(gpu_pci_path: str, gpu_numa: int, nics: Sequence[tuple[str, str, int]]) -> str:
    """The NIC among (name, pci_path, numa_node) that shares the most PCIe bridges with the GPU.

    Ties go to the same NUMA node, then to the first name, so every process on a
    host agrees. With no paths known this is the first NIC on the GPU's NUMA node.
    """
    gpu_parts = gpu_pci_path.split("/") if gpu_pci_path else []

    def shared(path: str) -> int:
        n = 0
        for a, b in zip(gpu_parts, path.split("/") if path else []):
            if a != b:
                break
            n += 1
        return n

    return min(nics, key=lambda nic: (-shared(nic[1]), nic[2] != gpu_numa, nic[0]))[0]


def rdma_available() -> tuple[bool, str]:
    """(True, which ports) when an active RDMA port is usable here, else (False, why not)."""
    try:
        ports = list_ports()
    except SyncError as e:
        return False, str(e)
    active = [p for p in ports if p.active]
    if not active:
        seen = ", ".join(f"{p.device}:{p.port}" for p in ports)
        return False, f"RDMA devices found ({seen}) but no port is ACTIVE (check the cable and `ibv_devinfo`)"
    return True, ", ".join(f"{p.device}:{p.port} ({p.link_layer})" for p in active)


def require_rdma() -> None:
    """Raise the SyncError that says what is missing and what to use instead."""
    ok, reason = rdma_available()
    if not ok:
        raise SyncError(f"transport='rdma' is not usable on {os.uname().nodename}: {reason}; {_FALLBACK}")


def list_ports() -> list[NicPort]:
    """Every port of every RDMA device, or a SyncError naming what is missing."""
    try:
        import pyverbs.device as d
        import pyverbs.libibverbs_enums as e
        from pyverbs.pyverbs_error import PyverbsError
    except ImportError as exc:
        raise SyncError(f"pyverbs is not installed ({exc}); pip install 'fsdp_sync[rdma]'") from exc
    try:
        devices = d.get_device_list()
    except PyverbsError as exc:
        raise SyncError(f"no RDMA device ({exc}: no /sys/class/infiniband entries or no verbs provider)") from exc
    if not devices:
        raise SyncError("no RDMA device found (libibverbs lists none)")
    forced_gid = RdmaOptions.from_env().gid_index
    ports = []
    for dev in devices:
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        sysfs = os.path.join(SYSFS_RDMA, name, "device")
        with d.Context(name=name) as ctx:
            attr = ctx.query_device()
            for port in range(1, attr.phys_port_cnt + 1):
                pattr = ctx.query_port(port)
                link = "Ethernet" if pattr.link_layer == e.IBV_LINK_LAYER_ETHERNET else "InfiniBand"
                entries = []
                for i in range(pattr.gid_tbl_len):
                    try:
                        gid = ctx.query_gid(port, i).gid
                        kind = "IB" if link == "InfiniBand" else (
                            "RoCE v2" if ctx.query_gid_type(port, i) == e.IBV_GID_TYPE_SYSFS_ROCE_V2 else "RoCE v1")
                    except PyverbsError:
                        continue  # unpopulated entries of a RoCE GID table do not query
                    entries.append((i, gid, kind))
                try:
                    gid_index, gid = choose_gid(entries, link, forced_gid)
                except SyncError:
                    gid_index, gid = -1, ""
                ports.append(NicPort(device=name, port=port, link_layer=link, lid=pattr.lid,
                                     active=pattr.state == e.IBV_PORT_ACTIVE and gid_index >= 0,
                                     gid_index=gid_index, gid=gid, mtu=pattr.active_mtu,
                                     max_msg_bytes=pattr.max_msg_sz, max_qp_wr=attr.max_qp_wr,
                                     numa_node=_numa_node(sysfs), pci_path=_resolve(sysfs)))
    return ports


def select_port(device: torch.device, options: RdmaOptions) -> NicPort:
    """The port this process uses: the configured one, else the active port nearest ``device``."""
    ports = [p for p in list_ports() if p.active]
    if not ports:
        require_rdma()
    if options.devices:
        index = device.index if device.type == "cuda" and device.index is not None else 0
        entry = options.devices[index % len(options.devices)]
        name, port = parse_device(entry, name="FSDP_SYNC_RDMA_DEVICES")
        for p in ports:
            if p.device == name and (port is None or p.port == port):
                return p
        raise ValueError(f"FSDP_SYNC_RDMA_DEVICES names {entry!r}, but the active ports here are "
                         f"{[f'{p.device}:{p.port}' for p in ports]}")
    if device.type != "cuda":
        return ports[0]
    gpu_dir = os.path.join(SYSFS_PCI, _pci_bus_id(device))
    name = nearest_nic(_resolve(gpu_dir), _numa_node(gpu_dir), [(p.device, p.pci_path, p.numa_node) for p in ports])
    return next(p for p in ports if p.device == name)


def _pci_bus_id(device: torch.device) -> str:
    """The GPU's PCI address as sysfs spells it, e.g. 0000:1b:00.0."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


def _resolve(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else ""


def _numa_node(device_dir: str) -> int:
    try:
        with open(os.path.join(device_dir, "numa_node")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1
