"""Capture policies: which query rows of each side an archive keeps.

A :class:`RowPolicy` maps a query *side* (``"encoder"`` / ``"decoder"``, the query side of
an array being ``contracts.KIND_AXES[(stack, kind)][0]``) to a rule; a side without a rule
keeps every row. Spellings (one parser for ``capture(..., rows=...)`` and the CLI's
``--rows``, repeatable or comma-joined)::

    decoder:last            the last query row
    decoder:last=4          the last 4 rows
    decoder:every=8         rows 0, 8, 16, ...
    decoder:segment=traj    every row of the layout segment (modality / token group) "traj";
                            a typed group kind (``action``) names every segment of that kind
    encoder:rows=0,5,9      explicit row indices
    {"decoder": [3, 4, 5]}  a mapping side -> indices or one of the rules above
    {"decoder": "last"}

Rows are positions on the archive's query axis: in a ragged archive the padded
(maximum-length) axis, so ``last`` is the axis' last position and the per-sample masks
still say which kept rows are real tokens. :meth:`RowPolicy.resolve` turns a policy into
sorted unique row indices per side, once the first batch's layout is known.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnscope.contracts import STACKS
from attnscope.errors import ConfigError, SelectionError
from attnscope.store import TokenLayout

__all__ = ["RowPolicy", "RULES"]

#: rule names of a side's policy ("rows" = explicit indices)
RULES = ("last", "every", "segment", "rows")
_SPEC = re.compile(r"^\s*(?P<side>[A-Za-z_]+)\s*:\s*(?P<rule>[A-Za-z_]+)\s*(=\s*(?P<arg>.*))?$")
_EXAMPLES = (
    "decoder:last, decoder:last=4, decoder:every=8, decoder:segment=traj, encoder:rows=0,5,9"
)


@dataclass(frozen=True)
class RowPolicy:
    """Per query side, which rows to keep: ``{side: (rule, argument)}``.

    ``rule`` is one of :data:`RULES`; its argument: ``last`` -> count (int >= 1), ``every``
    -> step (int >= 1), ``segment`` -> segment name, ``rows`` -> tuple of ints.

    Examples
    --------
    >>> RowPolicy.parse("decoder:last=2").resolve(layout)  # doctest: +SKIP
    {'decoder': array([14, 15])}
    """

    sides: tuple[tuple[str, str, Any], ...]  # ((side, rule, argument), ...), sorted by side

    def __post_init__(self) -> None:
        seen = [s for s, _r, _a in self.sides]
        for side in seen:
            if side not in STACKS:
                raise ConfigError(
                    f"rows: unknown side {side!r}; expected one of {list(STACKS)} "
                    f"(e.g. {_EXAMPLES})"
                )
        dup = sorted({s for s in seen if seen.count(s) > 1})
        if dup:
            raise ConfigError(f"rows: side(s) {dup} given more than once; one policy per side")
        for side, rule, arg in self.sides:
            _check_rule(side, rule, arg)

    # -- parsing ------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: Any) -> RowPolicy | None:
        """A policy from a spec string (``"decoder:last"``; comma-joined specs allowed), a
        sequence of spec strings, a mapping ``{side: indices | rule string}``, a policy, or
        None (keep every row). Bad spellings raise :class:`ConfigError`."""
        if spec is None or isinstance(spec, RowPolicy):
            return spec
        if isinstance(spec, Mapping):
            return cls(_sorted(_from_mapping(spec)))
        if isinstance(spec, str):
            spec = [spec]
        if not isinstance(spec, Iterable):
            raise ConfigError(
                f"rows must be a spec string, a list of them or a dict side -> rows, got "
                f"{type(spec).__name__}"
            )
        items: list[tuple[str, str, Any]] = []
        for s in spec:
            if not isinstance(s, str):
                raise ConfigError(f"rows: expected spec strings like {_EXAMPLES}; got {s!r}")
            items.extend(_split(s))
        if not items:
            raise ConfigError(f"rows: empty policy; expected e.g. {_EXAMPLES}")
        return cls(_sorted(items))

    @classmethod
    def from_json(cls, obj: Any) -> RowPolicy | None:
        """Inverse of :meth:`to_json` (None stays None)."""
        if obj is None:
            return None
        if not isinstance(obj, Mapping):
            raise ConfigError(f"rows policy JSON must be an object, got {obj!r}")
        items = []
        for side, v in obj.items():
            if not isinstance(v, Mapping) or set(v) != {"rule", "arg"}:
                raise ConfigError(f"rows policy JSON of {side!r} must be {{rule, arg}}, got {v!r}")
            arg = tuple(v["arg"]) if v["rule"] == "rows" else v["arg"]
            items.append((str(side), str(v["rule"]), arg))
        return cls(_sorted(items))

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{side: {"rule", "arg"}}`` (stored in the capture identity, compared on resume)."""
        return {
            side: {"rule": rule, "arg": list(arg) if rule == "rows" else arg}
            for side, rule, arg in self.sides
        }

    def __str__(self) -> str:
        parts = []
        for side, rule, arg in self.sides:
            if rule == "rows":
                parts.append(f"{side}:rows={','.join(map(str, arg))}")
            elif rule == "last" and arg == 1:
                parts.append(f"{side}:last")
            else:
                parts.append(f"{side}:{rule}={arg}")
        return " ".join(parts)

    # -- resolution ---------------------------------------------------------------------
    def resolve(self, layout: TokenLayout) -> dict[str, np.ndarray]:
        """Per side with a rule, the sorted unique ``int64`` row indices into that side's axis
        (the layout's length: a ragged archive's maximum).

        Raises :class:`SelectionError` for a side the layout lacks, a segment it does not
        name (listing those it has), a row out of range or a ``last`` count beyond the
        axis (naming the length) or a rule that keeps no row.
        """
        out: dict[str, np.ndarray] = {}
        for side, rule, arg in self.sides:
            lay = getattr(layout, side)
            if lay is None:
                have = [s for s in STACKS if getattr(layout, s) is not None]
                raise SelectionError(
                    f"rows: the model has no {side} side (its sides: {have}); drop "
                    f"'{side}:{rule}' from the policy"
                )
            n = int(lay.length)
            if rule == "last":
                if int(arg) > n:
                    raise SelectionError(
                        f"rows: '{side}:last={int(arg)}' asks for more rows than the {side} "
                        f"axis has ({n}); expected last=1..{n}"
                    )
                rows = np.arange(n - int(arg), n)
            elif rule == "every":
                rows = np.arange(0, n, int(arg))
            elif rule == "segment":
                rows = _segment_rows(side, lay, arg)
            else:
                rows = np.unique(np.asarray(arg, dtype=np.int64))
                bad = [int(r) for r in rows if not 0 <= r < n]
                if bad:
                    raise SelectionError(
                        f"rows: {side} row(s) {bad} out of range: the {side} axis has {n} "
                        f"rows (0..{n - 1})"
                    )
            if rows.size == 0:
                raise SelectionError(f"rows: '{side}:{rule}' keeps no row of the {n} {side} rows")
            out[side] = rows.astype(np.int64)
        return out


def _segment_rows(side: str, lay: Any, name: str) -> np.ndarray:
    """Rows of the segment ``name``, else of every segment typed as group kind ``name``
    (e.g. ``action``: ``TokenGroup(kind="action")``)."""
    names = [s.name for s in lay.segments]
    if name in names:
        seg = lay.segment(name)
        return np.arange(seg.start, seg.stop)
    typed = [s for s in lay.segments if s.group is not None and s.group.kind == name]
    if not typed:
        kinds = sorted({s.group.kind for s in lay.segments if s.group is not None})
        raise SelectionError(
            f"rows: {side} has no segment {name!r}; its segments are {names}"
            + (f" (group kinds {kinds})" if kinds else "")
        )
    return np.concatenate([np.arange(s.start, s.stop) for s in typed])


def _sorted(items: Sequence[tuple[str, str, Any]]) -> tuple[tuple[str, str, Any], ...]:
    seen = [s for s, _r, _a in items]
    dup = sorted({s for s in seen if seen.count(s) > 1})
    if dup:
        raise ConfigError(f"rows: side(s) {dup} given more than once; one policy per side")
    return tuple(sorted(items, key=lambda x: STACKS.index(x[0]) if x[0] in STACKS else 9))


def _split(text: str) -> list[tuple[str, str, Any]]:
    """``"decoder:last,encoder:rows=0,5"`` -> items; a bare int after ``rows=`` continues it."""
    items: list[tuple[str, str, Any]] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if re.fullmatch(r"-?\d+", piece) and items and items[-1][1] == "rows":
            side, rule, arg = items.pop()
            items.append((side, rule, (*arg, int(piece))))
            continue
        m = _SPEC.match(piece)
        if m is None:
            raise ConfigError(f"rows: cannot parse {piece!r}; expected e.g. {_EXAMPLES}")
        items.append(_item(m["side"], m["rule"], m["arg"], piece))
    return items


def _item(side: str, rule: str, arg: str | None, text: str) -> tuple[str, str, Any]:
    if rule not in RULES:
        raise ConfigError(f"rows: unknown rule {rule!r} in {text!r}; expected one of {list(RULES)}")
    arg = None if arg is None else arg.strip()
    if rule == "last":
        return side, rule, 1 if arg is None else _int(arg, text)
    if arg is None or arg == "":
        raise ConfigError(f"rows: {rule} needs a value in {text!r}, e.g. {side}:{rule}=...")
    if rule == "every":
        return side, rule, _int(arg, text)
    if rule == "segment":
        return side, rule, arg
    return side, rule, (_int(arg, text),)


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"rows: expected an integer in {where!r}, got {text!r}") from None


def _from_mapping(spec: Mapping[Any, Any]) -> list[tuple[str, str, Any]]:
    if not spec:
        raise ConfigError(f"rows: empty policy; expected e.g. {{'decoder': 'last'}} or {_EXAMPLES}")
    items: list[tuple[str, str, Any]] = []
    for side, v in spec.items():
        side = str(side)
        if isinstance(v, str):
            got = _split(f"{side}:{v}")
            if len(got) != 1 or got[0][0] != side:
                raise ConfigError(f"rows[{side!r}]: expected one rule like 'last', got {v!r}")
            items.append(got[0])
            continue
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            v = [v]
        try:
            vals = [int(x) for x in np.asarray(v).reshape(-1)]
            if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v):
                raise TypeError
        except (TypeError, ValueError):
            raise ConfigError(
                f"rows[{side!r}] must be row indices or a rule like 'last', got {v!r}"
            ) from None
        items.append((side, "rows", tuple(vals)))
    return items


def _check_rule(side: str, rule: str, arg: Any) -> None:
    if rule not in RULES:
        raise ConfigError(f"rows: unknown rule {rule!r} for {side}; expected one of {list(RULES)}")
    if rule in ("last", "every"):
        if isinstance(arg, bool) or not isinstance(arg, (int, np.integer)) or arg < 1:
            what = "count" if rule == "last" else "step"
            raise ConfigError(f"rows: {side}:{rule} needs a {what} >= 1, got {arg!r}")
    elif rule == "segment":
        if not isinstance(arg, str) or not arg:
            raise ConfigError(f"rows: {side}:segment needs a segment name, got {arg!r}")
    elif not arg:
        raise ConfigError(f"rows: {side}:rows lists no row")
    else:
        neg = [int(r) for r in arg if int(r) < 0]
        if neg:
            raise ConfigError(f"rows: {side} row(s) {neg} are negative; rows count from 0")
