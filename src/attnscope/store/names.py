"""Names of the attention arrays inside an archive: ``"stack/layer/kind"``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from attnscope.contracts import KIND_AXES, KINDS, QUERY_ROWS, STACKS
from attnscope.errors import InputError, SelectionError

__all__ = [
    "array_name", "parse_array_name", "sort_key", "flatten_weights", "stored_names", "rows_of",
]  # fmt: skip


def array_name(stack: str, layer: int, kind: str) -> str:
    """Storage path of one attention array, e.g. ``"decoder/2/cross_attention"``."""
    if (stack, kind) not in KIND_AXES:
        raise SelectionError(
            f"unknown attention {stack}/{kind}; expected one of {['/'.join(x) for x in KIND_AXES]}"
        )
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise SelectionError(f"layer must be a non-negative int, got {layer!r}")
    return f"{stack}/{int(layer)}/{kind}"


def parse_array_name(name: str) -> tuple[str, int, str]:
    """Inverse of :func:`array_name`: ``"encoder/0/self_attention"`` -> ``("encoder", 0, ...)``."""
    parts = str(name).split("/")
    if len(parts) != 3 or not parts[1].isdigit() or (parts[0], parts[2]) not in KIND_AXES:
        raise SelectionError(
            f"bad array name {name!r}; expected 'stack/layer/kind' with stack in {STACKS}, "
            f"an int layer and kind in {KINDS} (e.g. 'encoder/0/self_attention')"
        )
    return parts[0], int(parts[1]), parts[2]


def rows_of(meta: Mapping[str, Any], name: str) -> list[int] | None:
    """The query rows array ``name`` keeps under the root metadata ``meta`` (its query side's
    ``query_rows``), or None: every row."""
    stack, _layer, kind = parse_array_name(name)
    rows = (meta.get(QUERY_ROWS) or {}).get(KIND_AXES[(stack, kind)][0])
    return None if rows is None else [int(r) for r in rows]


def sort_key(name: str) -> tuple[int, int, int]:
    """Order of arrays everywhere: stack (encoder first), layer, kind."""
    s, layer, k = parse_array_name(name)
    return STACKS.index(s), layer, KINDS.index(k)


def flatten_weights(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Array name -> weights, from the model's nested dict or an already flat one.

    ``{"encoder": [{"self_attention": w}], "decoder": [...]}`` becomes
    ``{"encoder/0/self_attention": w, ...}``; ``None`` entries (not captured) are dropped.
    """
    if not isinstance(weights, Mapping):
        raise InputError(
            f"weights must be a dict (nested by stack or flat by array name), got "
            f"{type(weights).__name__}"
        )
    out: dict[str, Any] = {}
    if weights and all(k in STACKS for k in weights):
        for stack, layers in weights.items():
            if layers is None:
                continue
            if isinstance(layers, Mapping) or not hasattr(layers, "__len__"):
                raise InputError(
                    f"weights[{stack!r}] must be a list of per-layer dicts, got "
                    f"{type(layers).__name__}"
                )
            for layer, kinds in enumerate(layers):
                if kinds is None:
                    continue
                if not isinstance(kinds, Mapping):
                    raise InputError(
                        f"weights[{stack!r}][{layer}] must be a dict kind -> tensor, got "
                        f"{type(kinds).__name__}"
                    )
                for kind, w in kinds.items():
                    if w is not None:
                        out[array_name(stack, layer, kind)] = w
        return out
    unknown = [k for k in weights if not (isinstance(k, str) and "/" in k)]
    if unknown:
        raise InputError(
            f"unknown attention keys {unknown}; expected 'encoder'/'decoder' lists of "
            "{kind: tensor} dicts or flat 'stack/layer/kind' keys"
        )
    for name, w in weights.items():
        if w is not None:
            parse_array_name(name)
            out[name] = w
    return out


def stored_names(backend: Any) -> list[str]:
    """Names of the attention nodes a backend holds (arrays, or groups of sparse parts),
    in :func:`sort_key` order: the ``stack/layer/kind`` paths below each stack group."""
    out = []
    for stack in STACKS:
        for layer in backend.list_children(stack):
            for kind in backend.list_children(f"{stack}/{layer}"):
                out.append(f"{stack}/{layer}/{kind}")
    return sorted(out, key=_safe_key)


def _safe_key(name: str) -> tuple:
    try:
        return sort_key(name)
    except SelectionError:  # a foreign node: listed last, refused when opened
        return (len(STACKS), 0, 0, name)
