"""Errors a user can act on. Each names the tensor, rank or setting at fault."""


class SyncError(RuntimeError):
    """A push failed (a peer died, a transport broke); the version did not land."""


class PlanError(ValueError):
    """The metadata of the two sides does not fit; refused before any byte moved."""


class SyncTimeout(SyncError, TimeoutError):
    """A peer did not answer within the configured timeout."""


class ControlPlaneError(SyncError):
    """A value on the control plane was refused: not in fsdp_sync's format, malformed, unsigned
    where a secret is set, or signed with another secret. Names the key; nothing acted on it."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key
