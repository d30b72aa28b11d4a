"""Errors a user can act on. Each names the tensor, rank or setting at fault."""


class SyncError(RuntimeError):
    """A push failed (a peer died, a transport broke); the version did not land."""


class PlanError(ValueError):
    """The metadata of the two sides does not fit; refused before any byte moved."""


class SyncTimeout(SyncError, TimeoutError):
    """A peer did not answer within the configured timeout."""


class TrainerGone(SyncError):
    """The trainer job closed, or its control plane went away; the receiver keeps its last version
    and re-registers when a trainer comes back."""


class ControlPlaneLost(SyncError):
    """The control-plane store could not be reached any more (its host, trainer rank 0, exited)."""


class NonFiniteWeights(SyncError, ValueError):
    """A weight to push holds inf or NaN: the push was refused on every side, naming it."""


class ControlPlaneError(SyncError):
    """A value on the control plane was refused: not in fsdp_sync's format, malformed, unsigned
    where a secret is set, or signed with another secret. Names the key; nothing acted on it."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key
