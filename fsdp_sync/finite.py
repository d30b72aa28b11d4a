"""Refuse a push whose weights hold inf or NaN, before any receiver commits it.

One inf in a weight would make its FP8 block's scale inf in the engine (its codes 0 and
NaN), and NaN spreads the same way: the engine would serve garbage with no error. FP8
params are always checked, at no extra read: every block's amax lands in the bucket's
scale grid, and an inf or NaN amax makes an inf or NaN scale. Params sent as they are
(``quant="none"``, and the embeddings and norms an FP8 push skips) are checked only with
``SyncConfig.check_finite``, which reads them once more.

Per bucket this is one reduction over its scale grid, one fused norm over its unquantized
tensors, and one flag copied to pinned host memory, all on the packing stream: no sync.
The transfer thread reads the flag after the event it waits on anyway, and refuses the
bucket before sending it; the push then fails on every side, and receivers keep their
last version (``commit="staged"``; in place, a push that fails after writing began
leaves the live tensors torn, as any failed push does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NonFiniteWeights


@dataclass
class FiniteCheck:
    """A bucket's verdict, computed on the device; ``flag`` is host memory filled by the packing stream."""

    bucket: int
    flag: torch.Tensor  # 0-dim bool: every checked value is finite (or, rarely, a norm overflowed)
    parts: list[tuple[str, str, torch.Tensor]]  # (param, "scales" or "values", tensor): to name culprits

    def raise_if_not_finite(self) -> None:
        """Once the bucket's packing work is done: raise NonFiniteWeights naming each culprit."""
        if bool(self.flag):
            return
        bad = [f"{name!r} ({'inf or NaN in its weights' if what == 'values' else 'a block amax of inf or NaN'})"
               for name, what, t in self.parts if not bool(torch.isfinite(t).all())]
        if bad:  # else only a norm of huge finite values overflowed: nothing to refuse
            raise NonFiniteWeights(f"bucket {self.bucket}: refusing to push non-finite weights: {', '.join(bad)}")


def finite_check(bucket: int, scales: torch.Tensor, grids: dict[str, torch.Tensor],
                 values: dict[str, torch.Tensor]) -> FiniteCheck | None:
    """The check of one bucket: ``scales`` is its flat scale grid (``grids`` its per-param
    views), ``values`` the unquantized tensors to check too. None if there is nothing to check."""
    parts = [(n, "scales", g) for n, g in grids.items()] + [(n, "values", t) for n, t in values.items()]
    if not any(t.numel() for _, _, t in parts):
        return None
    flags = []
    if scales.numel():
        flags.append(torch.isfinite(scales).all())  # the grid is ~1/16384 of the weights
    plain = [t for t in values.values() if t.numel()]
    if plain:
        # A norm reads each tensor once with no temporary of its size (isfinite writes one);
        # NaN and inf reach it, and overflow on finite values only costs the exact look above.
        flags.append(torch.isfinite(torch.nn.utils.get_total_norm(plain)))
    flag = flags[0] if len(flags) == 1 else flags[0] & flags[1]
    if flag.is_cuda:
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)  # read after the bucket's event: no sync of its own
        flag = host
    return FiniteCheck(bucket, flag, parts)
