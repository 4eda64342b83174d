"""Token layout: which modality each token of a sequence belongs to, and its label.

A layout is pure JSON-able data, so it travels with the archive and every later
stage (analysis, render) can name tokens and draw modality boundaries without
the model.

A segment may carry a typed :class:`TokenGroup` (``text``, ``image`` with its patch grid,
``state``, ``action``, ``trajectory``); untyped segments (``group=None``, the default) are
never guessed to be images. Groups are stored in a side's JSON under ``"groups"`` (name ->
spec), beside ``segments``, so readers that predate them ignore them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attnscope.contracts import GROUP_KINDS, KIND_AXES, KINDS, STACKS
from attnscope.errors import ConfigError, SelectionError

__all__ = [
    "Segment",
    "SideLayout",
    "TokenGroup",
    "TokenLayout",
    "GROUP_KINDS",
    "KIND_AXES",
    "STACKS",
    "KINDS",
]

_GROUP_KEYS = ("kind", "grid", "camera", "steps")


@dataclass(frozen=True)
class TokenGroup:
    """What one modality's tokens are.

    Parameters
    ----------
    kind
        One of :data:`GROUP_KINDS`: ``text``, ``image``, ``state``, ``action``, ``trajectory``.
    grid
        ``image`` only (required): ``(rows, cols)`` of the patch grid, tokens in row-major
        order; ``rows * cols`` must equal the segment's length.
    camera
        ``image`` only: the camera name (default: none), used to find frames.
    steps
        ``trajectory`` only: time steps; the segment's length must be a multiple of it
        (default: one token per step).
    """

    kind: str
    grid: tuple[int, int] | None = None
    camera: str | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GROUP_KINDS:
            raise ConfigError(
                f"unknown token group kind {self.kind!r}; expected one of {GROUP_KINDS}"
            )
        if self.kind == "image":
            g = self.grid
            if (
                not isinstance(g, (tuple, list))
                or len(g) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in g)
            ):
                raise ConfigError(
                    f"image group needs grid=(rows, cols) of two positive ints, got {g!r}"
                )
            object.__setattr__(self, "grid", (int(g[0]), int(g[1])))
        elif self.grid is not None or self.camera is not None:
            raise ConfigError(f"grid and camera are for image groups only; got kind {self.kind!r}")
        if self.steps is not None and (
            self.kind != "trajectory"
            or isinstance(self.steps, bool)
            or not isinstance(self.steps, int)
            or self.steps < 1
        ):
            raise ConfigError(
                f"steps must be a positive int on a trajectory group, got {self.steps!r} on "
                f"kind {self.kind!r}"
            )
        if self.camera is not None and not isinstance(self.camera, str):
            raise ConfigError(f"camera must be a str, got {type(self.camera).__name__}")

    def check_length(self, name: str, n: int) -> None:
        """Raise :class:`ConfigError` unless the group fits a segment of ``n`` tokens."""
        if self.grid is not None and self.grid[0] * self.grid[1] != n:
            raise ConfigError(
                f"image group {name!r} has grid {list(self.grid)} = "
                f"{self.grid[0] * self.grid[1]} patches but the segment has {n} tokens; "
                "expected rows * cols == tokens"
            )
        if self.steps is not None and n % self.steps:
            raise ConfigError(
                f"trajectory group {name!r} has {n} tokens, not a multiple of steps={self.steps}"
            )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.grid is not None:
            out["grid"] = list(self.grid)
        if self.camera is not None:
            out["camera"] = self.camera
        if self.steps is not None:
            out["steps"] = self.steps
        return out

    @classmethod
    def from_json(cls, obj: Any) -> TokenGroup:
        """From a spec like ``{"kind": "image", "grid": [3, 3], "camera": "agentview"}``
        (or a bare kind string, ``"state"``)."""
        if isinstance(obj, TokenGroup):
            return obj
        if isinstance(obj, str):
            obj = {"kind": obj}
        if not isinstance(obj, Mapping):
            raise ConfigError(
                f"token group spec must be a dict like {{'kind': 'image', 'grid': [3, 3]}} "
                f"or a kind string, got {type(obj).__name__}"
            )
        bad = sorted(set(obj) - set(_GROUP_KEYS))
        if bad or "kind" not in obj:
            raise ConfigError(
                f"token group spec {dict(obj)!r}: unknown key(s) {bad} or no 'kind'; expected "
                f"keys {list(_GROUP_KEYS)}"
            )
        grid = obj.get("grid")
        return cls(
            obj["kind"],
            tuple(grid) if isinstance(grid, list) else grid,
            obj.get("camera"),
            obj.get("steps"),
        )


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens ``[start, stop)`` from one modality."""

    name: str
    start: int
    stop: int
    #: what the tokens are (None: untyped)
    group: TokenGroup | None = None

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
            if seg.group is not None:
                seg.group.check_length(seg.name, len(seg))
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

    @property
    def groups(self) -> dict[str, TokenGroup]:
        """Typed segments, ``{name: TokenGroup}`` (untyped segments left out)."""
        return {s.name: s.group for s in self.segments if s.group is not None}

    def select(self, query: Any, real: Any = None) -> tuple[tuple[int, ...], str]:
        """``(token indices, display name)`` of a query selection on this side.

        ``query``: a segment name, ``"all"`` (every token), ``"last"`` (the last real
        token) or token indices. ``real``: a sample's mask (ragged archives), whose padded
        tokens are dropped. Selecting no real token is a :class:`SelectionError`.
        """
        n = self.length
        ok = [True] * n if real is None else [bool(x) for x in real]
        if isinstance(query, str):
            if query == "all":
                idx, name = list(range(n)), "all tokens"
            elif query == "last":
                idx, name = [i for i in range(n) if ok[i]][-1:], "last token"
            else:
                seg = self.segment(query)
                idx, name = list(range(seg.start, seg.stop)), query
        else:
            idx = [query] if isinstance(query, int) else list(query)
            bad = [q for q in idx if isinstance(q, bool) or not 0 <= _as_index(q) < n]
            if bad or not idx:
                raise SelectionError(
                    f"query token {bad[0] if bad else idx!r} out of range; expected a segment "
                    f"name, 'all', 'last' or indices in [0, {n})"
                )
            idx = [int(q) for q in idx]
            name = f"tokens {idx}" if len(idx) > 1 else f"token {idx[0]}"
        kept = tuple(i for i in idx if ok[i])
        if not kept:
            raise SelectionError(f"query {query!r} selects no real token")
        return kept, name

    def segment(self, name: str) -> Segment:
        """The segment called ``name``."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise SelectionError(
            f"no segment {name!r}; expected one of {[s.name for s in self.segments]}"
        )

    def with_groups(self, groups: Mapping[str, Any], *, strict: bool = True) -> SideLayout:
        """A copy with these segments typed: ``{name: TokenGroup or JSON spec}``.

        With ``strict`` (default) a name that is no segment here is refused.
        """
        parsed = {str(k): TokenGroup.from_json(v) for k, v in groups.items()}
        names = {s.name for s in self.segments}
        if strict and set(parsed) - names:
            raise ConfigError(
                f"token group(s) {sorted(set(parsed) - names)} name no segment; expected "
                f"names among {[s.name for s in self.segments]}"
            )
        segs = tuple(
            Segment(s.name, s.start, s.stop, parsed.get(s.name, s.group)) for s in self.segments
        )
        return SideLayout(segs, self.labels)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "segments": [[s.name, s.start, s.stop] for s in self.segments],
            "labels": list(self.labels),
        }
        if self.groups:
            out["groups"] = {k: g.to_json() for k, g in self.groups.items()}
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SideLayout:
        # layouts written before typed groups have no "groups": every segment untyped
        side = cls(
            tuple(Segment(str(n), int(a), int(b)) for n, a, b in obj["segments"]),
            tuple(obj.get("labels", ())),
        )
        return side.with_groups(obj["groups"]) if obj.get("groups") else side


def _as_index(q: Any) -> int:
    try:
        return int(q.__index__())
    except (AttributeError, TypeError):
        return -1


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

    def with_groups(self, groups: Mapping[str, Any] | None) -> TokenLayout:
        """A copy with typed token groups, e.g. ``{"agentview_image": {"kind": "image",
        "grid": [3, 3], "camera": "agentview"}, "robot0_eef_pos": "state"}``.

        A plain name types that segment on every side that has it; ``"encoder/text"``
        types one side only. A name found on no side is refused.

        Examples
        --------
        >>> lay = TokenLayout(SideLayout.from_lengths({"text": 2, "img": 4}))
        >>> lay.with_groups({"img": {"kind": "image", "grid": [2, 2]}}).encoder.groups["img"].grid
        (2, 2)
        """
        if not groups:
            return self
        if not isinstance(groups, Mapping):
            raise ConfigError(
                f"token groups must be a dict of segment name -> spec, got {type(groups).__name__}"
            )
        per: dict[str, dict[str, Any]] = {s: {} for s in STACKS}
        for key, spec in groups.items():
            side, _, name = str(key).rpartition("/")
            sides = [side] if side else [s for s in STACKS if getattr(self, s) is not None]
            hits = [
                s
                for s in sides
                if getattr(self, s) is not None
                and name in {g.name for g in getattr(self, s).segments}
            ]
            if not hits:
                have = {s: [g.name for g in lay.segments] for s, lay in self._sides().items()}
                raise ConfigError(
                    f"token group {key!r} names no segment of the layout; segments: {have}"
                )
            for s in hits:
                per[s][name] = spec
        return TokenLayout(
            **{
                s: (getattr(self, s).with_groups(per[s]) if per[s] else getattr(self, s))
                for s in STACKS
            }
        )

    def _sides(self) -> dict[str, SideLayout]:
        return {s: getattr(self, s) for s in STACKS if getattr(self, s) is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            s: (None if getattr(self, s) is None else getattr(self, s).to_json()) for s in STACKS
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TokenLayout:
        return cls(
            **{s: (None if obj.get(s) is None else SideLayout.from_json(obj[s])) for s in STACKS}
        )
