"""fsdp_sync: move fresh FSDP2 weights into inference-engine buffers at the speed of the links."""

from .config import LinkModel, SyncConfig
from .destinations import allocate_destinations, expected_destinations, mismatches
from .errors import PlanError, SyncError, SyncTimeout
from .meta import LayoutSpec
from .receiver import WeightReceiver
from .sender import PushHandle, PushResult, WeightSender

__all__ = [
    "LayoutSpec", "LinkModel", "PlanError", "PushHandle", "PushResult", "SyncConfig", "SyncError", "SyncTimeout",
    "WeightReceiver", "WeightSender", "allocate_destinations", "expected_destinations", "mismatches",
]
