"""Errors a user can act on. Each names the tensor, rank or setting at fault."""


class SyncError(RuntimeError):
    """A push failed (a peer died, a transport broke); the version did not land."""


class PlanError(ValueError):
    """The metadata of the two sides does not fit; refused before any byte moved."""


class SyncTimeout(SyncError, TimeoutError):
    """A peer did not answer within the configured timeout."""


class NonFiniteWeights(SyncError, ValueError):
    """A weight to push holds inf or NaN: the push was refused on every side, naming it."""
