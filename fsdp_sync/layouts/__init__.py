"""Layouts: receiver-side rules that map source boxes to destination boxes.

A layout answers one question for the planner: for a source parameter, which boxes of
it land where in this receiver's tensors (a list of ``Piece``). Layouts are looked up by
name from a ``LayoutSpec`` so receivers can publish them as plain data.
"""

from __future__ import annotations

from typing import Callable, Protocol

from ..meta import LayoutSpec, SourceParam
from .base import Piece
from .identity import IdentityLayout
from .tp import TensorParallelLayout
from .vllm import SGLangLayout, VllmLayout


class Layout(Protocol):
    """Maps a source parameter to the pieces this receiver holds.

    A layout may also define ``unwritten() -> dict[str, list[Box]]``: destination boxes
    that no source fills (e.g. vocab padding), which the planner's exact-cover proof
    then treats as covered and which no task may write.
    """

    def pieces(self, src: SourceParam) -> list[Piece]: ...


LAYOUTS: dict[str, Callable[..., Layout]] = {
    "identity": IdentityLayout,
    "hf_tp": TensorParallelLayout,
    "vllm": VllmLayout,
    "sglang": SGLangLayout,
}


def make_layout(spec: LayoutSpec) -> Layout:
    try:
        factory = LAYOUTS[spec.name]
    except KeyError:
        raise ValueError(f"unknown layout {spec.name!r}; valid: {sorted(LAYOUTS)}") from None
    return factory(**spec.kwargs)


__all__ = ["Layout", "LAYOUTS", "Piece", "make_layout", "IdentityLayout", "SGLangLayout", "TensorParallelLayout",
           "VllmLayout"]
