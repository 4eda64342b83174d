"""The structural check every data command runs on an archive before computing on it.

:func:`structure_problems` lists what ``verify`` would reject about an archive's
structure without reading any chunk data: commit records that are impossible (negative
counts, a range writer claiming more than its range), arrays the root metadata lists but
storage lost, attention arrays whose attributes disagree with the layout, and chunks
missing inside the committed samples (a commit record raised past the stored data, or a
deleted chunk). :func:`check_structure` raises it as one ``ArchiveCorruptError`` line; the
data commands (``analyze``, ``rollout``, ``diff``, ``timeline``, ``render``, ``report``)
call it where they open the archive, and :func:`attnscope.store.verify` reports the
same problems before it reads the data.

Cost: one small JSON read per array (its attributes) and one listing of the stored chunk
keys per array (a directory walk of ``<array>/c/`` for a local Zarr archive, one LIST
request per 1000 keys at a URL, a walk of the chunk index in the HDF5 file, no chunk
read); arrays of at most 64 committed chunks stat those chunks instead. The listings are
cached on the open archive, so the reads that follow reuse them. Commands that read only
a few chunks (figures, the report) pass ``every_chunk=False``: then only the first chunk
of the last committed sample of each array is looked up (one stat or HEAD), which still
catches a commit record raised past the stored data; a chunk missing further inside is
refused by the read that touches it.

The checks run in the order of :data:`CHECKS`; each adds one line per problem to a
:class:`Structure`. A new check is a function ``(archive, structure) -> None`` appended
there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope.contracts import (
    KIND_AXES,
    SAMPLE_IDS,
    STACKS,
    TOKEN_IDS,
    TOKEN_LABEL_SPANS,
    TOKEN_MASK,
)
from attnscope.errors import ArchiveCorruptError, AttnscopeError
from attnscope.store.backends.base import ArrayHandle
from attnscope.store.commitlog import check_records
from attnscope.store.meta import MAIN, damage_is_corruption
from attnscope.store.reader import AttentionArchive
from attnscope.store.tokens import side_path

__all__ = ["Structure", "structure_problems", "check_structure", "CHECKS"]


@dataclass
class Structure:
    """What :func:`structure_problems` found.

    ``problems`` holds one line per problem; ``unreadable`` the attention arrays whose
    data must not be read (their attributes or chunks are damaged), so that ``verify``
    skips their data checks.
    """

    problems: list[str] = field(default_factory=list)
    unreadable: set[str] = field(default_factory=set)
    every_chunk: bool = True  # what _missing looks up (see the module docstring)

    def __bool__(self) -> bool:
        return not self.problems


def _line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _commits(a: AttentionArchive, st: Structure) -> None:
    """Commit records a writer could have written: counts >= 0 inside their range."""
    for rid, (start, stop, c) in sorted(a.commits.items()):
        if c < 0 or start < 0 or stop < start or (rid != MAIN and c > stop - start):
            st.problems.append(
                f"commit record {rid!r} is inconsistent: start={start} stop={stop} committed={c}"
            )


def _arrays(a: AttentionArchive, st: Structure) -> None:
    """Every listed array is stored, and committed samples have attention arrays."""
    for name in a.missing_arrays():
        st.problems.append(
            f"{name}: listed in the root metadata but missing from storage (deleted?)"
        )
        st.unreadable.add(name)
    if not a.arrays and a.n_samples:
        st.problems.append(
            f"{a.n_samples} samples committed but the archive holds no attention arrays"
        )


def _missing(h: ArrayHandle, n: int, st: Structure, where: str | None = None) -> bool:
    """Report a storage array shorter than ``n`` samples or missing chunks among them."""
    if h.shape[0] < n:
        st.problems.append(
            f"{h.name}: holds {h.shape[0]} samples but {n} are committed (truncated, or the "
            "commit record claims more than was written)"
        )
        return True
    if not n:
        return False
    if st.every_chunk:
        box = (slice(0, n), *(slice(0, d) for d in h.shape[1:]))
    else:
        box = (slice(n - 1, n), *(slice(0, min(1, d)) for d in h.shape[1:]))
    try:
        gone = h.missing_in(box)
    except Exception as e:  # noqa: BLE001 - an unreadable chunk index is damage
        st.problems.append(f"{h.name}: chunk index unreadable ({type(e).__name__}: {_line(e)})")
        return True
    if gone:
        cs, first = h.chunks[0], gone[0]
        st.problems.append(
            f"{where or h.name}: {len(gone)} chunk(s) missing or truncated inside the "
            f"committed samples, first chunk {first} "
            f"(samples {first[0] * cs}..{min(n, (first[0] + 1) * cs) - 1})"
        )
        return True
    return False


def _shape(a: AttentionArchive, name: str, arr: Any, st: Structure) -> None:
    """Heads, query rows and lengths of one array agree with the archive's layout."""
    p = st.problems
    h, t, s = arr.shape[1:]
    if len(arr.heads) != h:
        p.append(f"{name}: lists {len(arr.heads)} head ids for {h} stored heads")
    elif len(set(arr.heads)) != h or min(arr.heads, default=0) < 0:
        p.append(f"{name}: head ids {arr.heads} are not distinct non-negative indices")
    qs, ks = KIND_AXES[(arr.stack, arr.kind)]
    for side, got, dim in ((qs, t, "query"), (ks, s, "key")):
        lay = getattr(a.layout, side)
        if lay is None:
            p.append(f"{name}: the layout has no {side} side")
        elif dim == "query" and arr.query_rows is not None:
            rows = arr.query_rows
            if len(rows) != got or (len(rows) and (rows.min() < 0 or rows.max() >= lay.length)):
                p.append(
                    f"{name}: query_rows {rows.tolist()} do not fit {got} stored rows of the "
                    f"{lay.length}-token {side} layout"
                )
            elif np.any(np.diff(rows) <= 0):
                p.append(f"{name}: query_rows {rows.tolist()} are not ascending and unique")
        elif lay.length != got:
            p.append(f"{name}: {dim} length {got} != {lay.length} tokens of the {side} layout")


def _attention(a: AttentionArchive, st: Structure) -> None:
    """Each attention array opens, fits the layout and stores every committed chunk."""
    n = a.n_samples
    for name in a.arrays:
        before = len(st.problems)
        try:
            arr = a.attention(name)
        except AttnscopeError as e:
            st.problems.append(f"{name}: {e}" if not str(e).startswith(name) else str(e))
            st.unreadable.add(name)
            continue
        _shape(a, name, arr, st)
        for h in arr._parts.values():
            _missing(h, n, st)
        if len(st.problems) > before:
            st.unreadable.add(name)


def _side_data(a: AttentionArchive, st: Structure) -> None:
    """Per-sample ids, masks and token data hold every committed sample's chunks."""
    n = a.n_samples
    backend = a._backend
    for key in backend.list_children(SAMPLE_IDS):
        _missing(backend.get_array(f"{SAMPLE_IDS}/{key}"), n, st, f"sample_ids[{key!r}]")
    for side in STACKS:
        if getattr(a.layout, side) is None:
            continue
        for part in (TOKEN_MASK, TOKEN_IDS, TOKEN_LABEL_SPANS):
            h = a._side_handle(side, part)
            if h is not None:
                _missing(h, n, st)
            elif part == TOKEN_MASK and a.ragged and n:
                st.problems.append(
                    f"{side_path(side, TOKEN_MASK)}: missing from a ragged archive (every "
                    "sample's real-token mask is lost)"
                )


def _log(a: AttentionArchive, st: Structure) -> None:
    """Each commit record against the last document of its commit log (one read per
    writer): a count raised or lowered after the fact, a missing ``main`` record."""
    try:
        check_records(a.path, a._backend)
    except ArchiveCorruptError as e:
        st.problems.append(str(e))


#: the structural checks, in order; each is ``(archive, structure) -> None``
CHECKS: list[Callable[[AttentionArchive, Structure], None]] = [
    _commits,
    _arrays,
    _attention,
    _side_data,
    _log,
]


def structure_problems(a: AttentionArchive, *, every_chunk: bool = True) -> Structure:
    """Run every check of :data:`CHECKS` on an open archive; reads no chunk data.

    ``every_chunk``: look up every chunk of the committed samples (one listing per array),
    or only each array's last committed sample's first chunk (module docstring).

    Returns
    -------
    Structure
        One line per problem (empty: the structure is sound).
    """
    st = Structure(every_chunk=every_chunk)
    for check in CHECKS:
        try:
            with damage_is_corruption(a.path):
                check(a, st)
        except ArchiveCorruptError as e:
            st.problems.append(str(e))
    return st


def check_structure(a: AttentionArchive, *, every_chunk: bool = True) -> None:
    """Refuse an archive whose structure ``verify`` would reject, before computing on it.

    ``every_chunk=False`` for commands that read a few chunks (see :func:`structure_problems`).

    Raises
    ------
    ArchiveCorruptError
        One line: the archive, the first problem (and how many more), and the advice to
        run ``attnscope verify``.
    """
    got = structure_problems(a, every_chunk=every_chunk)
    if got.problems:
        more = f" (+{len(got.problems) - 1} more)" if len(got.problems) > 1 else ""
        raise ArchiveCorruptError(
            f"{a.path!r} is damaged: {got.problems[0]}{more}; refusing to compute on it "
            "(run 'attnscope verify' for every problem)"
        )
