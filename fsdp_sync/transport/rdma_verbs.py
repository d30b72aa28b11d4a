"""The pyverbs objects of the RDMA transport: NICs, regions, RC queue pairs, work requests.

Only the rdma modules import this file, so pyverbs stays an optional dependency.
Each process opens a NIC port once and keeps one protection domain on it for its
whole life; plans come and go with their own CQs, QPs and regions on that PD.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from dataclasses import dataclass

import pyverbs.device as d
import pyverbs.libibverbs_enums as e
from pyverbs.addr import GID, AHAttr, GlobalRoute
from pyverbs.cq import CQ
from pyverbs.mr import MR, DmaBufMR
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsError
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, RecvWR, SendWR

from ..errors import SyncError
from .rdma_discovery import NicPort, RdmaOptions
from .rdma_exchange import QpEndpoint
from .rdma_memory import Segment, dmabuf_fd, peermem_loaded
from .rdma_wr import Batch, Region

log = logging.getLogger(__name__)
REMOTE_WRITE = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
_MIN_RNR_TIMER = 12  # 0.64 ms before a sender retries a WRITE WITH IMM that found no receive posted
_RNR_RETRY_FOREVER = 7  # a receiver that is slow to repost is back-pressure, not an error
_HOP_LIMIT = 64
_STATUS = {
    e.IBV_WC_REM_ACCESS_ERR: "remote access error: a write fell outside the receiver's registered memory or rkey",
    e.IBV_WC_RETRY_EXC_ERR: "transport retry count exceeded: the receiver is unreachable or gone",
    e.IBV_WC_RNR_RETRY_EXC_ERR: "receiver-not-ready retry count exceeded",
    e.IBV_WC_LOC_PROT_ERR: "local protection error: a staging address is outside its region",
    e.IBV_WC_LOC_LEN_ERR: "local length error",
    e.IBV_WC_REM_INV_REQ_ERR: "remote invalid request (does the receiver's QP allow remote writes?)",
    e.IBV_WC_REM_OP_ERR: "remote operation error",
    e.IBV_WC_WR_FLUSH_ERR: "flushed: the queue pair had already failed",
    e.IBV_WC_FATAL_ERR: "fatal NIC error",
}


def status_text(status: int) -> str:
    return _STATUS.get(status, f"work completion status {status}")


@dataclass(frozen=True, slots=True)
class Completion:
    status: int
    qp_num: int
    wr_id: int
    imm: int  # host order; meaningful for a received WRITE WITH IMM only


@dataclass
class Registration:
    """A registered segment and what closes it."""

    mr: MR
    region: Region
    fd: int | None = None  # the dma-buf fd, kept open for the region's life

    def close(self) -> None:
        self.mr.close()
        if self.fd is not None:
            os.close(self.fd)


class Nic:
    """An opened port with its protection domain: one per (device, port) per process."""

    _opened: dict[tuple[str, int], "Nic"] = {}
    _lock = threading.Lock()

    def __init__(self, port: NicPort):
        self.port = port
        self.ctx = d.Context(name=port.device)
        self.pd = PD(self.ctx)

    @classmethod
    def get(cls, port: NicPort) -> "Nic":
        with cls._lock:
            key = (port.device, port.port)
            if key not in cls._opened:
                try:
                    cls._opened[key] = cls(port)
                except PyverbsError as exc:
                    raise SyncError(f"rdma: opening {port.device} failed: {exc}") from exc
            return cls._opened[key]

    def cq(self, depth: int) -> CQ:
        return CQ(self.ctx, depth)

    def qp(self, cq: CQ, *, max_send_wr: int, max_recv_wr: int) -> QP:
        cap = QPCap(max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=1, max_recv_sge=1)
        # sq_sig_all=0: only the writes the schedule marks signalled make completions.
        return QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0))

    def endpoint(self, qp: QP, psn: int) -> QpEndpoint:
        return QpEndpoint(qpn=qp.qp_num, psn=psn, lid=self.port.lid, gid=self.port.gid, mtu=self.port.mtu)

    def register(self, segment: Segment, options: RdmaOptions, *, access: int = REMOTE_WRITE) -> Registration:
        """Register a whole segment: host memory by address, GPU memory as dma-buf or through nvidia-peermem."""
        where = f"{segment.length} bytes at {segment.base:#x} on {segment.device} with {self.port.device}"
        if segment.device.type == "cuda" and options.gpu_registration != "peermem":
            try:
                return self._register_dmabuf(segment, access)
            except (SyncError, PyverbsError) as exc:
                if options.gpu_registration == "dmabuf" or not peermem_loaded():
                    raise SyncError(f"rdma: registering {where} as dma-buf failed: {exc} (or load nvidia-peermem "
                                    "and set FSDP_SYNC_RDMA_GPU_REG=peermem)") from exc
                log.info("fsdp_sync rdma: dma-buf registration failed (%s); using nvidia-peermem", exc)
        try:
            mr = MR(self.pd, segment.length, access, address=segment.base)
        except PyverbsError as exc:
            hint = " (is the memlock ulimit high enough? `ulimit -l unlimited`)" if segment.device.type == "cpu" else ""
            raise SyncError(f"rdma: registering {where} failed: {exc}{hint}") from exc
        return Registration(mr, Region(segment.base, segment.length, mr.rkey, segment.base))

    def _register_dmabuf(self, segment: Segment, access: int) -> Registration:
        fd = dmabuf_fd(segment)
        try:
            mr = DmaBufMR(self.pd, segment.length, access, dmabuf=fd, offset=0)
        except BaseException:
            os.close(fd)
            raise
        return Registration(mr, Region(segment.base, segment.length, mr.rkey, 0), fd)  # iova = dma-buf offset

    def buffer(self, length: int) -> MR:
        """A small buffer that pyverbs allocates and registers, for receive requests."""
        return MR(self.pd, length, e.IBV_ACCESS_LOCAL_WRITE)


def new_psn() -> int:
    return random.getrandbits(24)


def qp_attr(port: NicPort, psn: int, remote: QpEndpoint, options: RdmaOptions) -> QPAttr:
    """The attributes that take an RC QP from RESET through INIT and RTR to RTS towards ``remote``."""
    attr = QPAttr(port_num=port.port, path_mtu=min(port.mtu, remote.mtu))
    attr.qp_access_flags = REMOTE_WRITE
    attr.dest_qp_num = remote.qpn
    attr.rq_psn = remote.psn
    attr.sq_psn = psn
    attr.max_dest_rd_atomic = 1
    attr.max_rd_atomic = 1
    attr.min_rnr_timer = _MIN_RNR_TIMER
    attr.timeout = options.qp_timeout
    attr.retry_cnt = options.retry_count
    attr.rnr_retry = _RNR_RETRY_FOREVER
    if port.link_layer == "Ethernet":  # RoCE addresses by GID, so every packet carries a GRH
        route = GlobalRoute(dgid=GID(remote.gid), sgid_index=port.gid_index, hop_limit=_HOP_LIMIT,
                            traffic_class=options.traffic_class)
        attr.ah_attr = AHAttr(port_num=port.port, sl=options.service_level, is_global=1, gr=route)
    else:
        attr.ah_attr = AHAttr(dlid=remote.lid, port_num=port.port, sl=options.service_level)
    return attr


def connect(qp: QP, port: NicPort, psn: int, remote: QpEndpoint, options: RdmaOptions) -> None:
    try:
        qp.to_rts(qp_attr(port, psn, remote, options))
    except PyverbsError as exc:
        raise SyncError(f"rdma: bringing QP {qp.qp_num} on {port.device}:{port.port} to RTS towards QP "
                        f"{remote.qpn} (lid {remote.lid}, gid {remote.gid}) failed: {exc}") from exc


def send_chain(batch: Batch, slot_addr: int, lkey: int) -> list[SendWR]:
    """The batch as linked SendWRs (head first); keep the list alive while it may be posted.

    Every WR carries the batch id, so a completion, good or bad, names its batch.
    """
    chain: list[SendWR] = []
    following = None
    for w in reversed(batch.writes):
        opcode = e.IBV_WR_RDMA_WRITE_WITH_IMM if w.final else e.IBV_WR_RDMA_WRITE
        wr = SendWR(wr_id=batch.id, opcode=opcode, num_sge=1, sg=[SGE(slot_addr + w.offset, w.length, lkey)],
                    send_flags=e.IBV_SEND_SIGNALED if w.signaled else 0, next_wr=following)
        wr.set_wr_rdma(w.rkey, w.remote_addr)
        chain.append(wr)
        following = wr
    chain.reverse()
    return chain


def set_imm(wr: SendWR, imm: int) -> None:
    wr.imm_data = socket.htonl(imm)  # immediate data travels in network byte order


def recv_request(buffer: MR, wr_id: int) -> RecvWR:
    """A receive for one WRITE WITH IMM: it consumes the request but writes nothing into it."""
    return RecvWR(wr_id=wr_id, num_sge=1, sg=[SGE(buffer.buf, buffer.length, buffer.lkey)])


def poll(cq: CQ, max_entries: int = 64) -> list[Completion]:
    try:
        _, wcs = cq.poll(max_entries)
    except PyverbsError as exc:
        raise SyncError(f"rdma: polling the completion queue failed: {exc}") from exc
    return [Completion(wc.status, wc.qp_num, wc.wr_id, socket.ntohl(wc.imm_data)) for wc in wcs]
