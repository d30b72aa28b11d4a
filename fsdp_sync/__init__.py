"""fsdp_sync: move fresh FSDP2 weights into inference-engine buffers at the speed of the links."""

from ._version import __version__
from .config import LinkModel, SyncConfig
from .destinations import allocate_destinations, expected_destinations, mismatches
from .errors import NonFiniteWeights, PlanError, SyncError, SyncTimeout, TrainerGone
from .meta import LayoutSpec
from .receiver import WeightReceiver
from .sender import PushHandle, PushResult, WeightSender

__all__ = [
    "LayoutSpec", "LinkModel", "NonFiniteWeights", "PlanError", "PushHandle", "PushResult", "SyncConfig", "SyncError",
    "SyncTimeout", "TrainerGone", "WeightReceiver", "WeightSender", "__version__", "allocate_destinations",
    "expected_destinations", "mismatches",
]
