"""What RDMA peers tell each other through the control-plane store, and under which keys.

An RC queue pair connects only once it knows its peer's QP number, PSN and address
(LID on InfiniBand, GID on RoCE); a sender writes only once it knows where the
receiver's tensors live and the keys of the regions that hold them. Both sides
publish that once per plan, under the plan's fingerprint, and wait for each other
with a deadline, aborting as soon as a peer posts a setup error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..control import PUSH_LATEST, ControlPlane, done_key, push_key, sender_error_key
from ..errors import SyncError
from .rdma_wr import Region, RemoteTensor

SEND = "send"
RECV = "recv"
_WHO = {SEND: "sender", RECV: "receiver"}


@dataclass(frozen=True)
class QpEndpoint:
    """One side of an RC connection."""

    qpn: int
    psn: int
    lid: int
    gid: str
    mtu: int  # ibv_mtu enum value; a connection runs at the smaller of both ends


@dataclass(frozen=True)
class Endpoint:
    """What one rank publishes: its NIC, a QP per peer and, for receivers, its memory."""

    rank: int
    nic: str  # "device:port@host", for messages
    link_layer: str
    qps: dict[int, QpEndpoint]  # by peer rank
    regions: tuple[Region, ...] = ()
    tensors: dict[str, RemoteTensor] = field(default_factory=dict)


def endpoint_key(fp: str, role: str, rank: int) -> str:
    return f"rdma/{fp}/{role}/{rank}"


def setup_error_key(fp: str, role: str, rank: int) -> str:
    return f"rdma/{fp}/error/{role}/{rank}"


def connected_key(fp: str, receiver: int) -> str:
    """Set once a receiver's QPs are ready to receive (RTR, receives posted): senders may write."""
    return f"rdma/{fp}/connected/{receiver}"


def publish(control: ControlPlane, fp: str, role: str, endpoint: Endpoint) -> None:
    control.set(endpoint_key(fp, role, endpoint.rank), endpoint)


def report_setup_error(control: ControlPlane, fp: str, role: str, rank: int, message: str) -> None:
    """Tell the peers why this rank will not connect, so they stop waiting."""
    control.set(setup_error_key(fp, role, rank), f"rdma {_WHO[role]} {rank}: {message}")


def peer_errors(control: ControlPlane, fp: str, peer_role: str, peers: list[int]) -> str | None:
    return control.first_error([setup_error_key(fp, peer_role, p) for p in peers])


def wait_endpoints(control: ControlPlane, fp: str, peer_role: str, peers: list[int], *,
                   timeout_s: float) -> dict[int, Endpoint]:
    """The endpoints of ``peers`` (of ``peer_role``), once all are published."""
    control.wait([endpoint_key(fp, peer_role, p) for p in peers], timeout_s=timeout_s,
                 describe=lambda keys: f"rdma {_WHO[peer_role]}s {_ranks(keys)} to publish their connection data",
                 abort=lambda: peer_errors(control, fp, peer_role, peers))
    endpoints = control.get_many([endpoint_key(fp, peer_role, p) for p in peers], expect=Endpoint)
    for p, endpoint in zip(peers, endpoints):
        if endpoint.rank != p:
            raise SyncError(f"rdma: the endpoint published for {_WHO[peer_role]} {p} is {_WHO[peer_role]} "
                            f"{endpoint.rank}'s")
    return dict(zip(peers, endpoints))


def wait_connected(control: ControlPlane, fp: str, receivers: list[int], *, timeout_s: float) -> None:
    control.wait([connected_key(fp, r) for r in receivers], timeout_s=timeout_s,
                 describe=lambda keys: f"rdma receivers {_ranks(keys)} to connect",
                 abort=lambda: peer_errors(control, fp, RECV, receivers))


def open_push(control: ControlPlane, sender: int, *, after: int | None) -> int:
    """The push this sender is running: the first it has neither finished nor failed.

    The transport sees buckets, not push numbers, yet the WRITE WITH IMM must carry
    one. A sender runs its pushes one at a time and marks each done or failed, so
    the pushes it has ended form a prefix: walk on from ``after`` (the last one this
    transport served), or find the prefix's end by bisection the first time.
    """
    def ended(seq: int) -> bool:
        return control.has(done_key(seq, sender)) or control.has(sender_error_key(seq, sender))

    if after is None:
        if not control.has(PUSH_LATEST):
            raise SyncError("rdma: no push has been announced yet")
        low, high = 1, control.get(PUSH_LATEST, expect=int) + 1
        while low < high:
            mid = (low + high) // 2
            if ended(mid):
                low = mid + 1
            else:
                high = mid
        seq = low
    else:
        seq = after + 1
        while ended(seq):
            seq += 1
    if not control.has(push_key(seq)):
        raise SyncError(f"rdma sender {sender}: push {seq} was never announced; cannot number the writes")
    return seq


def _ranks(keys: list[str]) -> list[int]:
    return sorted(int(k.rsplit("/", 1)[1]) for k in keys)
