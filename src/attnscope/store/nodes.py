"""The attention nodes of an archive writer: their storage arrays, created from the root
metadata's chunk and codec policy, and the checks of a range writer against them."""

from __future__ import annotations

from typing import Any

import numpy as np

from attnscope.contracts import DIMS, QUERY_ROWS
from attnscope.errors import ConfigError
from attnscope.store.backends.base import ArrayHandle, choose_chunks
from attnscope.store.codecs import storage_dtype
from attnscope.store.names import parse_array_name, rows_of

__all__ = ["Node", "check_range_fits", "create_node"]


class Node:
    """What the writer knows about one attention node: (H, T, S), heads, storage handles."""

    def __init__(self, name: str, h: int, t: int, s: int, heads: list[int]) -> None:
        self.name, self.h, self.t, self.s, self.heads = name, h, t, s, heads
        self.handles: dict[str, ArrayHandle] = {}


def create_node(
    w: Any, name: str, h: int, t: int, s: int, *, n: int, batch: int | None = None
) -> Node:
    """Create the storage of attention node ``name`` (B=``n`` samples) for writer ``w``."""
    b = w._backend
    assert b is not None
    stack, layer, kind = parse_array_name(name)
    w._rules.check_shape(name, h, t, s, {})
    heads = w._rules.heads.get(name) or list(range(h))
    attrs = {"stack": stack, "layer": layer, "kind": kind, "hts": [h, t, s],
             "heads": [int(x) for x in heads], "dims": list(DIMS)}  # fmt: skip
    rows = rows_of(w._meta, name)
    if rows is not None:
        attrs[QUERY_ROWS] = rows
    sdt = storage_dtype(w._rules.dtype)
    comp, lvl = w._meta.get("compressor", "zstd"), w._meta.get("level")
    # HDF5 grows a rewritten chunk in place at the end of the file; a crash before the
    # next flush leaves it undecodable. One sample per chunk means a chunk holding
    # committed samples is never rewritten (Zarr renames whole chunk files instead).
    cs = 1 if w.format == "hdf5" else w._meta.get("chunk_samples")
    bs, qb = w._meta.get("batch_size") or batch, w._meta.get("query_block")
    node = Node(name, h, t, s, attrs["heads"])
    if w._rules.sparse:
        k = int(w._rules.topk)  # type: ignore[arg-type]
        chunks = choose_chunks(h, t, k, sdt.itemsize, chunk_samples=cs, batch_size=bs)
        b.set_attrs(name, {**attrs, "topk": k}, group=True)
        idt = np.dtype(np.int16 if s < 32768 else np.int32)
        rank = DIMS[:3] + ("rank",)
        for part, dt, shape, ch, dims in (
            ("values", sdt, (n, h, t, k), chunks, rank),
            ("indices", idt, (n, h, t, k), chunks, rank),
            ("residual", np.dtype(np.float32), (n, h, t), chunks[:3], DIMS[:3]),
        ):
            node.handles[part] = b.create_array(
                f"{name}/{part}", shape, ch, dt, dims=dims, compressor=comp, level=lvl,
                overwrite=w._fresh,
            )
    else:
        chunks = choose_chunks(h, t, s, sdt.itemsize, chunk_samples=cs, batch_size=bs,
                               query_block=qb)  # fmt: skip
        node.handles[""] = b.create_array(
            name, (n, h, t, s), chunks, sdt, dims=DIMS, attrs=attrs, compressor=comp,
            level=lvl,
            overwrite=w._fresh,  # an unlisted array of a batch that never committed
        )
    w._nodes[name] = node
    return node


def check_range_fits(w: Any, node: Node) -> None:
    """A range writer's ``[start, stop)`` fits the node's capacity and chunks."""
    a, b = w._start, w._stop
    assert b is not None
    for part, handle in node.handles.items():
        n, cs = handle.shape[0], handle.chunks[0]
        if n < b:
            raise ConfigError(
                f"{node.name}{'/' + part if part else ''}: sample_range stop {b} exceeds "
                f"the archive capacity {n}; create it with capacity >= {b}"
            )
        if a % cs or (b % cs and b != n):
            raise ConfigError(
                f"{node.name}: sample_range ({a}, {b}) is not aligned to the {cs}-sample "
                f"chunks (two writers would share a chunk); use multiples of {cs} or "
                f"create with chunk_samples=1"
            )
