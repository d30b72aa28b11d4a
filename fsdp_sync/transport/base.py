"""The transport interface: how bytes of a task reach a receiver's destination tensor.

A transport is built once per plan on each side and replayed every push. Senders hand
it one bucket of packed tasks at a time; receivers ask it to block until every
arrival of a push has landed, or raise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from ..config import SyncConfig
from ..control import ControlPlane
from ..meta import ReceiverMeta
from ..plan import ReceiverPlan, SenderPlan, Task


def namespace(fingerprint: str, generation: int) -> str:
    """Where a transport's connection keys live: per plan and per generation.

    The generation counts failed pushes (``PUSH_FAILURES``): after one, both sides build
    their transport again under a new namespace, since a failed push can leave two-sided
    connections unusable (gloo closes a pair on a timeout; NCCL aborts its communicator).
    """
    return fingerprint if generation == 0 else f"{fingerprint}/g{generation}"


class SendTransport(ABC):
    """The sending side, set up when a sender first sees a plan."""

    def __init__(self, control: ControlPlane, plan: SenderPlan, receivers: dict[int, ReceiverMeta],
                 config: SyncConfig, host: str, *, generation: int = 0,
                 abort: Callable[[], str | None] | None = None):
        """``abort()``: the reason to stop waiting for peers during setup (the push it is built
        for failed elsewhere), or None."""
        self.control = control
        self.plan = plan
        self.receivers = receivers
        self.config = config
        self.host = host
        self.namespace = namespace(plan.fingerprint, generation)
        self.abort = abort

    @abstractmethod
    def send(self, items: list[tuple[Task, torch.Tensor | None]]) -> None:
        """Deliver every (task, packed data) of one bucket; return once the data may be freed.

        A None payload was already written through ``destination``.
        """

    def destination(self, task: Task) -> torch.Tensor | None:
        """A tensor that the packer may write ``task``'s bytes into directly, if this transport
        is one-sided; then no staging copy and no transfer step is needed."""
        return None

    def writes_to_peer(self, task: Task) -> bool:
        """Whether stores into ``destination(task)`` cross to another GPU (NVLink), which the
        packer uses to mix such stores with local ones in one launch."""
        return False

    def finish(self) -> None:
        """Called once per push after the last bucket: wait for writes still in flight."""

    def close(self) -> None:
        """Release connections and mappings."""


class MappedSend(SendTransport):
    """A one-sided sender that holds every receiver's tensors mapped (shm files, CUDA IPC).

    Subclasses fill ``mapped[(receiver, name)]``. Each task's view into it is built once:
    the mappings live as long as the plan, and a push asks for every task's view.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mapped: dict[tuple[int, str], torch.Tensor] = {}
        self._views: dict[int, torch.Tensor] = {}  # id(task) -> its destination view

    def destination(self, task: Task) -> torch.Tensor:
        view = self._views.get(id(task))
        if view is None:
            view = self._views[id(task)] = task.dst_box.view(self.mapped[(task.receiver, task.dst)])
        return view

    def close(self) -> None:
        self._views.clear()
        self.mapped.clear()


class RecvTransport(ABC):
    """The receiving side, set up when a receiver first sees a plan."""

    def __init__(self, control: ControlPlane, plan: ReceiverPlan, tensors: dict[str, torch.Tensor],
                 config: SyncConfig, *, generation: int = 0):
        self.control = control
        self.plan = plan
        self.tensors = tensors
        self.config = config
        self.namespace = namespace(plan.fingerprint, generation)

    @staticmethod
    def prepare(tensors: dict[str, torch.Tensor], *, job: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Make destination tensors reachable (e.g. move them to shared memory) at registration.

        Returns the tensors to use from now on and the information senders need.
        """
        return tensors, {}

    @abstractmethod
    def receive(self, seq: int, timeout_s: float) -> None:
        """Block until every arrival of push ``seq`` landed; raise SyncError otherwise."""

    def close(self) -> None:
        """Release connections and mappings."""
