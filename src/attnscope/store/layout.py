"""Token layout: which modality each token of a sequence belongs to, and its label.

A layout is pure JSON-able data, so it travels with the archive and every later
stage (analysis, render) can name tokens and draw modality boundaries without
the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attnscope.contracts import KIND_AXES, KINDS, STACKS
from attnscope.errors import ConfigError, SelectionError

__all__ = ["Segment", "SideLayout", "TokenLayout", "KIND_AXES", "STACKS", "KINDS"]


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens ``[start, stop)`` from one modality."""

    name: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SideLayout:
    """Ordered modality segments and per-token labels of one sequence (encoder or decoder)."""

    segments: tuple[Segment, ...]
    labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        pos = 0
        for seg in self.segments:
            if seg.start != pos or seg.stop <= seg.start:
                raise ConfigError(
                    f"segment {seg.name!r} spans [{seg.start}, {seg.stop}); expected a non-empty "
                    f"segment starting at {pos} (segments must be contiguous and in order)"
                )
            pos = seg.stop
        if not self.labels:
            object.__setattr__(self, "labels", tuple(_default_labels(self.segments)))
        if len(self.labels) != pos:
            raise ConfigError(f"layout has {pos} tokens but {len(self.labels)} labels")

    @classmethod
    def from_lengths(cls, lengths: Mapping[str, int] | Iterable[tuple[str, int]]) -> SideLayout:
        """Build from ordered ``(name, n_tokens)`` pairs, e.g. ``{"text": 10, "image": 9}``."""
        items = lengths.items() if isinstance(lengths, Mapping) else lengths
        segs, pos = [], 0
        for name, n in items:
            segs.append(Segment(str(name), pos, pos + int(n)))
            pos += int(n)
        return cls(tuple(segs))

    @classmethod
    def from_labels(cls, labels: Sequence[str], name: str = "tokens") -> SideLayout:
        """One segment holding all tokens, labelled (e.g. by a tokenizer)."""
        return cls((Segment(name, 0, len(labels)),), tuple(str(x) for x in labels))

    @property
    def length(self) -> int:
        return self.segments[-1].stop if self.segments else 0

    def segment_of(self, token: int) -> Segment:
        """The segment that holds ``token``."""
        for seg in self.segments:
            if seg.start <= token < seg.stop:
                return seg
        raise SelectionError(f"token {token} out of range [0, {self.length})")

    def segment_ids(self) -> list[int]:
        """Per-token index into :attr:`segments`, length ``self.length``."""
        out: list[int] = []
        for i, seg in enumerate(self.segments):
            out.extend([i] * len(seg))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "segments": [[s.name, s.start, s.stop] for s in self.segments],
            "labels": list(self.labels),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SideLayout:
        return cls(
            tuple(Segment(str(n), int(a), int(b)) for n, a, b in obj["segments"]),
            tuple(obj.get("labels", ())),
        )


def _default_labels(segments: Iterable[Segment]) -> Iterable[str]:
    for seg in segments:
        if len(seg) == 1:
            yield seg.name
        else:
            yield from (f"{seg.name}[{i}]" for i in range(len(seg)))


@dataclass(frozen=True)
class TokenLayout:
    """Layout of both sides of a model; either may be ``None`` (encoder-only / decoder-only)."""

    encoder: SideLayout | None = None
    decoder: SideLayout | None = None

    def side(self, name: str) -> SideLayout:
        """The layout of ``"encoder"`` or ``"decoder"``."""
        if name not in STACKS:
            raise SelectionError(f"unknown side {name!r}; expected one of {STACKS}")
        got = getattr(self, name)
        if got is None:
            raise SelectionError(f"this layout has no {name} side")
        return got

    def axes(self, stack: str, kind: str) -> tuple[SideLayout, SideLayout]:
        """``(query layout, key layout)`` of the attention ``kind`` in ``stack``."""
        try:
            q, k = KIND_AXES[(stack, kind)]
        except KeyError:
            raise SelectionError(
                f"unknown attention {stack}/{kind}; expected one of "
                f"{['/'.join(x) for x in KIND_AXES]}"
            ) from None
        return self.side(q), self.side(k)

    def to_json(self) -> dict[str, Any]:
        return {
            s: (None if getattr(self, s) is None else getattr(self, s).to_json()) for s in STACKS
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TokenLayout:
        return cls(
            **{s: (None if obj.get(s) is None else SideLayout.from_json(obj[s])) for s in STACKS}
        )
