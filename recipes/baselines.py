"""The two ways RL frameworks move weights today, written here to time against fsdp_sync.

* rank-0 funnel: every parameter is gathered (``full_tensor()``) on the trainer; rank 0
  sends it whole to inference rank 0, which scatters the TP slices to its peers;
* bucketed all-gather + broadcast: the trainer gathers ~1 GiB buckets of parameters and
  rank 0 sends each flat bucket to every inference rank, which keeps its slices;
* same process (colocated, one trainer rank): the hybrid-engine path, where the engine's
  tensors live in the trainer's process and each parameter is gathered, cast and copied
  in turn.

Both cast to FP8 on trainer rank 0 when the receivers hold FP8. On one host the hop from
trainer rank 0 to a receiver is a CUDA IPC copy into the receiver's staging buffer (as
colocated RL frameworks do, and valid where NCCL refuses two ranks on one GPU); the
store says when a buffer is full and when it is free again.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

from fsdp_sync.layouts import make_layout
from fsdp_sync.meta import LayoutSpec, SourceParam, device_id
from fsdp_sync.quant import get_quant_format, scale_name, should_quantize


def _local_index(uuid: str) -> int:
    return next(i for i in range(torch.cuda.device_count()) if device_id(torch.device("cuda", i)) == uuid)


class Inbox:
    """A receiver's staging buffer that trainer rank 0 fills over CUDA IPC, one message at a time."""

    def __init__(self, store, rank: int, capacity: int, device: torch.device):
        self.store, self.rank, self.seq = store, rank, 0
        self.buf = torch.empty(capacity, dtype=torch.uint8, device=device)
        store.set(f"hop/{rank}/handle", pickle.dumps((device_id(device), *reduce_tensor(self.buf))))

    def take(self) -> torch.Tensor:
        self.seq += 1
        self.store.wait([f"hop/{self.rank}/full/{self.seq}"])
        return self.buf

    def release(self) -> None:
        self.store.set(f"hop/{self.rank}/free/{self.seq}", b"1")

    def finished(self, run: int) -> None:
        """Tell trainer rank 0 that this receiver has placed every slice of baseline run ``run``."""
        self.store.set(f"hop/{self.rank}/done/{run}", b"1")


class Outbox:
    """Trainer rank 0's side: copy a flat payload into a receiver's inbox once it is free."""

    def __init__(self, store, num_receivers: int):
        self.store = store
        self.bufs, self.seq = [], [0] * num_receivers
        for r in range(num_receivers):
            store.wait([f"hop/{r}/handle"])
            uuid, rebuild, args = pickle.loads(store.get(f"hop/{r}/handle"))
            args = list(args)
            args[6] = _local_index(uuid)
            self.bufs.append(rebuild(*args))

    def wait_finished(self, run: int) -> None:
        self.store.wait([f"hop/{r}/done/{run}" for r in range(len(self.bufs))])

    def put(self, r: int, flat: torch.Tensor) -> None:
        if self.seq[r]:
            self.store.wait([f"hop/{r}/free/{self.seq[r]}"])
        self.seq[r] += 1
        self.bufs[r][:flat.numel()].copy_(flat)
        torch.cuda.current_stream().synchronize()
        self.store.set(f"hop/{r}/full/{self.seq[r]}", b"1")


def _payload(name: str, full: torch.Tensor, quant: str) -> list[torch.Tensor]:
    fmt = get_quant_format(quant)
    if fmt.is_quantized and should_quantize(name, full.shape):
        from fsdp_sync.kernels.fp8_quant import quantize_full

        return list(quantize_full(full, fmt))
    return [full]


def _payload_like(name: str, shape, dtype, quant: str, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of a flat byte buffer shaped as a parameter's payload (values, then scales if FP8)."""
    fmt = get_quant_format(quant)
    parts = [(shape, dtype)]
    if fmt.is_quantized and should_quantize(name, shape):
        parts = [(shape, fmt.dtype), (fmt.scale_shape(shape), torch.float32)]
    out, offset = [], 0
    for part_shape, part_dtype in parts:
        n = torch.Size(part_shape).numel() * part_dtype.itemsize
        out.append(flat[offset:offset + n].view(part_dtype).view(part_shape))
        offset += n
    return out


def payload_bytes(name: str, shape, dtype, quant: str) -> int:
    fmt = get_quant_format(quant)
    numel = torch.Size(shape).numel()
    if fmt.is_quantized and should_quantize(name, shape):
        return numel + torch.Size(fmt.scale_shape(shape)).numel() * 4
    return numel * dtype.itemsize


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])


def _keep_slices(name: str, payload: list[torch.Tensor], layout: LayoutSpec, quant: str,
                 dests: dict[str, torch.Tensor]) -> None:
    """Copy this receiver's slices of a whole (possibly quantized) parameter into its destinations."""
    values = payload[0]
    block = get_quant_format(quant).block_shape(values.shape) if len(payload) == 2 else None
    for piece in make_layout(layout).pieces(SourceParam(name, tuple(values.shape), values.dtype, ())):
        piece.dst_box.view(dests[piece.dst]).copy_(piece.src_box.view(values))
        if block is not None:
            piece.dst_box.to_blocks(block).view(dests[scale_name(piece.dst)]).copy_(
                piece.src_box.to_blocks(block).view(payload[1]))


def buckets(shapes, quant: str, bucket_bytes: int) -> list[list[str]]:
    out, current, size = [], [], 0
    for name, (shape, dtype) in shapes.items():
        nbytes = payload_bytes(name, shape, dtype, quant)
        if current and size + nbytes > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return out + ([current] if current else [])


def capacity(shapes, quant: str, bucket_bytes: int) -> int:
    """The staging bytes a receiver needs: the largest bucket (a bucket may be one big parameter)."""
    return max(sum(payload_bytes(n, *shapes[n], quant) for n in b) for b in buckets(shapes, quant, bucket_bytes))


def funnel_trainer(model, outbox: Outbox | None, quant: str) -> None:
    for name, p in model.named_parameters():
        full = p.full_tensor()  # one all-gather per parameter, as the funnel does
        if outbox is not None:
            outbox.put(0, _flat(_payload(name, full, quant)))


def funnel_receiver(rank: int, shapes, layouts: list[LayoutSpec], quant: str, dests, inbox: Inbox) -> None:
    """Receiver 0 takes every whole parameter and sends each TP peer the whole payload to slice."""
    for name, (shape, dtype) in shapes.items():
        n = payload_bytes(name, shape, dtype, quant)
        if rank == 0:
            flat = inbox.take()[:n]
            for r in range(1, len(layouts)):
                dist.send(flat, r)
            _keep_slices(name, _payload_like(name, shape, dtype, quant, flat), layouts[0], quant, dests)
            torch.cuda.current_stream().synchronize()  # the copies out of the inbox are done
            inbox.release()
        else:
            flat = torch.empty(n, dtype=torch.uint8, device=dests[next(iter(dests))].device)
            dist.recv(flat, 0)
            _keep_slices(name, _payload_like(name, shape, dtype, quant, flat), layouts[rank], quant, dests)
    torch.cuda.synchronize()


def broadcast_trainer(model, outbox: Outbox | None, shapes, quant: str, bucket_bytes: int, num_receivers: int) -> None:
    params = dict(model.named_parameters())
    for bucket in buckets(shapes, quant, bucket_bytes):
        fulls = {n: params[n].full_tensor() for n in bucket}
        if outbox is not None:
            flat = _flat([t for n in bucket for t in _payload(n, fulls[n], quant)])
            for r in range(num_receivers):
                outbox.put(r, flat)


def broadcast_receiver(shapes, layout: LayoutSpec, quant: str, dests, inbox: Inbox, bucket_bytes: int) -> None:
    for bucket in buckets(shapes, quant, bucket_bytes):
        flat, offset = inbox.take(), 0
        for n in bucket:
            size = payload_bytes(n, *shapes[n], quant)
            _keep_slices(n, _payload_like(n, *shapes[n], quant, flat[offset:offset + size]), layout, quant, dests)
            offset += size
        torch.cuda.synchronize()
        inbox.release()


def same_process_loop(model, dests: dict[str, torch.Tensor], layout: LayoutSpec, quant: str) -> None:
    """One parameter at a time into engine tensors of this process: gather, cast, copy."""
    for name, p in model.named_parameters():
        _keep_slices(name, _payload(name, p.full_tensor(), quant), layout, quant, dests)
    torch.cuda.synchronize()
