"""What an archive holds, as read-only views: ``archive.arrays``, ``.layers``, ``.kinds``,
``.heads``, and the key forms ``archive[...]`` accepts.

One key grammar for every view keyed by array (``archive[key]``, ``archive.heads[key]``,
``archive.attention(...)``):

- ``"encoder/0/self_attention"``: an array name;
- ``("encoder", 0)``: a stack and a layer number, the kind defaulting when that layer holds one;
- ``("decoder", 0, "cross")``: stack, layer and kind (``"self"`` / ``"cross"`` or the full
  ``"self_attention"`` / ``"cross_attention"``);
- ``"encoder"``: a stack holding a single array.

Layers are layer *numbers* as captured (``archive.layers["encoder"]``), not positions: a
negative number is refused (the last layer is ``archive.layers["encoder"][-1]``). A key
that names nothing raises one :class:`~attnscope.errors.SelectionError` naming the key and
the choices.

The call forms of the 0.x API (``archive.arrays``, ``archive.layers(stack)``,
``archive.kinds(stack, layer)``, ``archive.heads(name)``) still work and warn
(``DeprecationWarning``), returning lists as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from attnscope.contracts import KINDS, STACKS
from attnscope.errors import SelectionError
from attnscope.store.names import parse_array_name

__all__ = [
    "ArrayNames", "LayerMap", "KindMap", "HeadMap", "resolve_key", "has_key", "KIND_ALIASES",
]

#: short kind names accepted in keys: "self" -> "self_attention", "cross" -> "cross_attention"
KIND_ALIASES = {k.removesuffix("_attention"): k for k in KINDS}

_FORMS = "an array name ('encoder/0/self_attention'), (stack, layer) or (stack, layer, kind)"


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"archive.{old} is deprecated; use archive.{new}", DeprecationWarning, stacklevel=3
    )


def _kind(kind: Any) -> str:
    if isinstance(kind, str) and kind in KIND_ALIASES:
        return KIND_ALIASES[kind]
    return kind


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _parsed(names: Sequence[str]) -> list[tuple[str, int, str]]:
    """``(stack, layer, kind)`` of each name; a foreign node (damage, which opening it
    reports) is left out."""
    out = []
    for n in names:
        try:
            out.append(parse_array_name(n))
        except SelectionError:
            continue
    return out


def resolve_key(names: Sequence[str], key: Any) -> str:
    """The array name ``key`` designates among ``names`` (the grammar in the module doc).

    Raises
    ------
    SelectionError
        ``key`` names no stored array, or several (the message lists the choices).
    """
    if isinstance(key, str) and "/" in key:
        if key in names:
            return key
        raise SelectionError(f"no array {key!r}; the archive holds {list(names)}")
    parts = key if isinstance(key, tuple) else (key,)
    if not 1 <= len(parts) <= 3 or not isinstance(parts[0], str):
        raise SelectionError(f"bad archive key {key!r}; expected {_FORMS}")
    stack = parts[0]
    if stack not in STACKS:
        raise SelectionError(f"bad archive key {key!r}: unknown stack {stack!r}; "
                             f"expected one of {STACKS}")
    got = [p for p in _parsed(names) if p[0] == stack]
    if not got:
        raise SelectionError(f"the archive holds no {stack} array (key {key!r}); "
                             f"it holds {list(names)}")
    layers = sorted({lyr for _s, lyr, _k in got})
    if len(parts) >= 2:
        layer = parts[1]
        if not _is_int(layer):
            raise SelectionError(
                f"bad archive key {key!r}: layer must be an int layer number, got {layer!r}"
            )
        if int(layer) not in layers:
            hint = (f" (layers are numbers, not positions: the last is "
                    f"archive.layers[{stack!r}][-1])" if int(layer) < 0 else "")
            what = (f"no array '{stack}/{int(layer)}/{_kind(parts[2])}'" if len(parts) == 3
                    else f"no {stack} layer {int(layer)}")
            raise SelectionError(
                f"{what} in the archive (key {key!r}); {stack} layers stored: {layers}{hint}"
            )
        got = [g for g in got if g[1] == int(layer)]
    if len(parts) == 3:
        kind = _kind(parts[2])
        kinds = [k for _s, _l, k in got]
        if kind not in kinds:
            raise SelectionError(
                f"no {kind!r} attention at key {key!r}; that layer holds {kinds} "
                f"(short forms: {sorted(KIND_ALIASES)})"
            )
        got = [g for g in got if g[2] == kind]
    if len(got) == 1:
        return "/".join(str(x) for x in got[0])
    choices = ["/".join(str(x) for x in g) for g in got]
    raise SelectionError(f"archive key {key!r} is ambiguous: it matches {choices}; "
                         f"give {_FORMS}")


def has_key(names: Sequence[str], key: Any) -> bool:
    """Whether :func:`resolve_key` finds one array for ``key``."""
    try:
        resolve_key(names, key)
    except SelectionError:
        return False
    return True


class ArrayNames(Sequence[str]):
    """``archive.arrays``: the stored array names, sorted by (stack, layer, kind)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = tuple(names)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, str):
            raise SelectionError(
                f"archive.arrays is the sequence of array names; index the archive itself "
                f"for an array: archive[{i!r}]"
            )
        return self._names[i]

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ArrayNames, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ArrayNames({list(self._names)!r})"

    def __call__(self) -> list[str]:
        _deprecated("arrays()", "arrays (a property: archive.arrays[0], list(archive.arrays))")
        return list(self._names)


class _View(Mapping):
    """A read-only mapping whose missing keys raise :class:`SelectionError` (``get`` and
    ``in`` still work as for any mapping)."""

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except SelectionError:
            return default

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except SelectionError:
            return False
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.items())!r})"


class LayerMap(_View):
    """``archive.layers``: stack -> its stored layer numbers ``(int, ...)`` ascending;
    keys are the stacks the archive holds."""

    def __init__(self, names: Sequence[str]) -> None:
        got: dict[str, set[int]] = {}
        for s, layer, _k in _parsed(names):
            got.setdefault(s, set()).add(layer)
        self._by = {s: tuple(sorted(got[s])) for s in STACKS if s in got}

    def __getitem__(self, stack: Any) -> tuple[int, ...]:
        if not isinstance(stack, str) or stack not in self._by:
            raise SelectionError(
                f"archive.layers is keyed by stack; no stack {stack!r} in the archive, "
                f"it holds {list(self._by)}"
            )
        return self._by[stack]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by)

    def __len__(self) -> int:
        return len(self._by)

    def __call__(self, stack: str) -> list[int]:
        _deprecated(f"layers({stack!r})", f"layers[{stack!r}]")
        if stack not in STACKS:
            raise SelectionError(f"unknown stack {stack!r}; expected one of {STACKS}")
        return list(self._by.get(stack, ()))


class KindMap(_View):
    """``archive.kinds``: ``(stack, layer)`` -> the kinds stored at that layer ``(str, ...)``."""

    def __init__(self, names: Sequence[str]) -> None:
        self._by: dict[tuple[str, int], tuple[str, ...]] = {}
        for s, layer, k in _parsed(names):
            self._by[(s, layer)] = (*self._by.get((s, layer), ()), k)

    def __getitem__(self, key: Any) -> tuple[str, ...]:
        if isinstance(key, tuple) and len(key) == 2 and _is_int(key[1]):
            key = (key[0], int(key[1]))
        if not isinstance(key, tuple) or key not in self._by:
            raise SelectionError(
                f"archive.kinds is keyed by (stack, layer); no {key!r} in the archive, "
                f"it holds {list(self._by)}"
            )
        return self._by[key]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._by)

    def __len__(self) -> int:
        return len(self._by)

    def __call__(self, stack: str, layer: int) -> list[str]:
        _deprecated(f"kinds({stack!r}, {layer!r})", f"kinds[{stack!r}, {layer!r}]")
        return list(self._by.get((stack, int(layer)), ()))


class HeadMap(_View):
    """``archive.heads``: array -> the original head numbers it keeps ``(int, ...)``.

    Keyed by array name; any archive key form works (``heads["encoder", 0]``).
    """

    def __init__(self, archive: Any) -> None:
        self._archive = archive

    def __getitem__(self, key: Any) -> tuple[int, ...]:
        if _is_int(key):
            raise SelectionError(
                f"archive.heads is keyed by array, not by position (got {key!r}): "
                f"archive.heads[{self._archive.arrays[0]!r}]"
                if self._archive.arrays else f"archive.heads[{key!r}]: the archive holds no array"
            )
        return tuple(self._archive[key].heads)

    def __iter__(self) -> Iterator[str]:
        return iter(self._archive.arrays)

    def __len__(self) -> int:
        return len(self._archive.arrays)

    def __call__(self, name_or_stack: str, layer: int | None = None,
                 kind: str | None = None) -> list[int]:
        _deprecated("heads(...)", "heads[name] or archive.heads[stack, layer, kind]")
        return list(self._archive.attention(name_or_stack, layer, kind).heads)
