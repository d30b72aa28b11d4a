"""Layouts as data: an ordered table of name patterns, each naming the rule that maps it.

A layout for an engine is mostly a table: ``q_proj`` goes into ``qkv_proj`` here,
``o_proj`` is split along its input dim, norms are copied whole. Writing the table as
data keeps each engine's naming in one readable place, and the rules themselves are a
handful of box computations shared by every table. The first pattern that matches a
source name decides; a name that no pattern matches is refused by name, so a renamed
parameter fails at plan time instead of being silently skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from ..boxes import Box
from ..meta import SourceParam
from .base import Piece


class TPRanks(Protocol):
    """What the generic rules need from a layout: this receiver's tensor-parallel coordinates."""

    tp_rank: int
    tp_size: int


class Rule(Protocol):
    def __call__(self, layout, match: re.Match, src: SourceParam) -> list[Piece]: ...


class RuleTable:
    """``(pattern, rule)`` pairs; ``pieces`` applies the rule of the first pattern found in a name."""

    def __init__(self, rules: Sequence[tuple[str, Rule]], *, what: str):
        self.rules = [(re.compile(p), rule) for p, rule in rules]
        self.what = what

    def match(self, name: str) -> tuple[re.Match, Rule]:
        for pattern, rule in self.rules:
            m = pattern.search(name)
            if m:
                return m, rule
        raise ValueError(f"tensor {name!r} matches no rule of layout {self.what!r}")

    def pieces(self, layout, src: SourceParam) -> list[Piece]:
        m, rule = self.match(src.name)
        return rule(layout, m, src)


def slab(src: SourceParam, dst: str, spans: Mapping[int, tuple[int, int, int]]) -> Piece:
    """A piece of ``src``: per dim in ``spans``, ``size`` elements from ``start`` land at ``dst_start``.

    Dims not in ``spans`` are taken whole and land at the same offsets, so one call
    expresses a TP slice, a place inside a fused tensor, or both at once.
    """
    offsets, sizes, dst_offsets = [0] * len(src.shape), list(src.shape), [0] * len(src.shape)
    for dim, (start, size, dst_start) in spans.items():
        offsets[dim], sizes[dim], dst_offsets[dim] = start, size, dst_start
    return Piece(src.name, Box(tuple(offsets), tuple(sizes)), dst, Box(tuple(dst_offsets), tuple(sizes)))


def even_part(name: str, size: int, num_parts: int, index: int, *, what: str, by: str) -> tuple[int, int]:
    """(start, size) of part ``index`` of ``num_parts`` equal parts; refuses an uneven split by name."""
    if size % num_parts:
        raise ValueError(f"tensor {name!r}: {what} of size {size} does not divide by {by} {num_parts}")
    part = size // num_parts
    return index * part, part


# Expanded names by (template, pattern, groups): Python 3.11 parses a template on every
# ``match.expand``, and a plan expands the same few hundred names once per receiver class.
_EXPANDED: dict[tuple, str] = {}
_MAX_EXPANDED = 1 << 16


def target(template: str | None, match: re.Match, src: SourceParam) -> str:
    """The destination name: ``template`` expanded with the match's groups, or the source name."""
    if template is None:
        return src.name
    key = (template, match.re, match.groups())  # all an expansion reads of the match
    name = _EXPANDED.get(key)
    if name is None:
        if len(_EXPANDED) >= _MAX_EXPANDED:
            _EXPANDED.clear()
        name = _EXPANDED[key] = match.expand(template)
    return name


def check_dim(src: SourceParam, dim: int) -> None:
    if dim >= len(src.shape):
        raise ValueError(f"tensor {src.name!r} of shape {src.shape} has no dim {dim} to split for TP")


@dataclass(frozen=True)
class Keep:
    """The whole tensor on every rank, renamed by the ``match.expand`` template ``dst`` if given."""

    dst: str | None = None

    def __call__(self, layout, match: re.Match, src: SourceParam) -> list[Piece]:
        name = target(self.dst, match, src)
        return [Piece(src.name, Box.full(src.shape), name, Box.full(src.shape))]


@dataclass(frozen=True)
class Split:
    """Megatron-style TP: rank r holds the r-th equal slice along ``dim`` (0: column, 1: row parallel)."""

    dim: int
    dst: str | None = None

    def __call__(self, layout: TPRanks, match: re.Match, src: SourceParam) -> list[Piece]:
        name = target(self.dst, match, src)
        if layout.tp_size == 1:
            return [Piece(src.name, Box.full(src.shape), name, Box.full(src.shape))]
        check_dim(src, self.dim)
        start, size = even_part(src.name, src.shape[self.dim], layout.tp_size, layout.tp_rank,
                                what=f"dim {self.dim}", by="tp_size")
        return [slab(src, name, {self.dim: (start, size, 0)})]


@dataclass(frozen=True)
class Refuse:
    """A name this layout recognises but cannot place; ``why`` tells the user what to do."""

    why: str

    def __call__(self, layout, match: re.Match, src: SourceParam) -> list[Piece]:
        raise ValueError(f"tensor {src.name!r}: {self.why}")
