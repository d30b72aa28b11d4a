"""Transports by name. Optional dependencies are imported inside their own modules."""

from __future__ import annotations

from .base import RecvTransport, SendTransport


def _gloo():
    from .gloo import GlooRecv, GlooSend
    return GlooSend, GlooRecv


def _shm():
    from .shm import ShmRecv, ShmSend
    return ShmSend, ShmRecv


def _cuda_ipc():
    from .cuda_ipc import CudaIpcRecv, CudaIpcSend
    return CudaIpcSend, CudaIpcRecv


def _nccl():
    from .nccl import NcclRecv, NcclSend
    return NcclSend, NcclRecv


def _rdma():
    try:
        from .rdma import RdmaRecv, RdmaSend
    except ImportError as e:
        if not (e.name or "").startswith("pyverbs"):
            raise
        from ..errors import SyncError
        raise SyncError(f"transport='rdma' needs pyverbs ({e}): pip install 'fsdp_sync[rdma]', "
                        "or use transport='nccl' or 'gloo'") from e
    return RdmaSend, RdmaRecv


TRANSPORTS = {"gloo": _gloo, "shm": _shm, "cuda_ipc": _cuda_ipc, "nccl": _nccl, "rdma": _rdma}


def get_transport(name: str) -> tuple[type[SendTransport], type[RecvTransport]]:
    """The (send, receive) classes of a transport, or a ValueError listing the valid names."""
    try:
        loader = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; valid: {sorted(TRANSPORTS)}") from None
    return loader()


__all__ = ["RecvTransport", "SendTransport", "TRANSPORTS", "get_transport"]
