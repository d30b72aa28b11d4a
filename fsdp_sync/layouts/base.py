"""The unit every layout produces: a box of a source parameter and where it lands."""

from __future__ import annotations

from dataclasses import dataclass

from ..boxes import Box


@dataclass(frozen=True, slots=True)
class Piece:
    """``src_box`` of source ``src`` is written to ``dst_box`` of destination ``dst``."""

    src: str
    src_box: Box
    dst: str
    dst_box: Box
