"""Commit records that bind what they commit: per-batch digest documents and a hash chain.

Every commit of a writer (record id ``rid``: ``main`` or ``range-a-b``) appends one *log
document* before it advances its commit record::

    {"v": 1, "rid": "main", "seq": 7, "start": 224, "stop": 256,
     "regions": [[array, [[lo, hi], ...], xxh3], ...],   # every box written, per chunk
     "attrs": {array: xxh3}, "prev": "<chain of seq 6>"}

A *region* is the part of one chunk that the commit wrote (its box in array
coordinates) and the digest of those values in the stored dtype, C order. Regions are
hashed (XXH3-64) from the values, not of encoded bytes, so one rule serves every backend and codec,
and a region of committed samples inside a chunk that a later (possibly killed) batch
rewrites with the same values stays valid. Attention arrays, masks, token ids, label
blobs, sample ids and frames all go through it.

The commit record then holds ``{"start", "stop", "committed", "batches", "chain",
"since"}``: ``batches`` documents are committed, ``chain`` is the SHA-256 of the last
one's canonical JSON (which holds the previous chain), and ``since`` is the first sample
the log covers (archives resumed from an older format start their log there).
:func:`check_record` compares a record with its last document (one read per writer:
the cheap check every data command runs); :func:`verify_log` walks the whole chain and
re-reads every region (``attnscope verify``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from itertools import product
from typing import Any

import numpy as np
import xxhash

from attnscope.contracts import TOKEN_LABELS
from attnscope.errors import ArchiveCorruptError
from attnscope.store.backends.base import Write, chunk_ranges

__all__ = [
    "LOG_VERSION",
    "Region",
    "attrs_digest",
    "chain_of",
    "check_record",
    "digest",
    "make_doc",
    "regions_of",
    "verify_log",
]

LOG_VERSION = 1

#: (array path, box as [[lo, hi], ...] per dimension, digest of its values)
Region = tuple[str, list[list[int]], str]


def digest(data: Any) -> str:
    """XXH3-64 of a buffer, as 16 hex digits (~5 GB/s on one core of the dev VM)."""
    return xxhash.xxh3_64_hexdigest(data)


def _digest_array(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return xxhash.xxh3_64_hexdigest(a.data.cast("B") if a.size else b"")


def regions_of(writes: Iterable[Write]) -> list[Region]:
    """One region per chunk each box of ``writes`` touches: ``(array, box, digest)``."""
    out: list[Region] = []
    for handle, sel, data in writes:
        data = np.asarray(data)
        if data.dtype != handle.dtype:  # what the backend stores
            data = data.astype(handle.dtype)
        out.extend(_regions(handle.name, handle.chunks, sel, data))
    return out


def _regions(
    name: str, chunks: Sequence[int], sel: Sequence[slice], data: np.ndarray
) -> list[Region]:
    out: list[Region] = []
    for idx in product(*chunk_ranges(sel, chunks)):
        box, src = [], []
        for i, c, s in zip(idx, chunks, sel):
            lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
            box.append([lo, hi])
            src.append(slice(lo - s.start, hi - s.start))
        out.append((name, box, _digest_array(data[tuple(src)])))
    return out


def attrs_digest(attrs: dict[str, Any]) -> str:
    """Digest of an array's attributes in canonical JSON (detects an edited ``heads``)."""
    return digest(json.dumps(attrs, sort_keys=True, separators=(",", ":")).encode())


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def chain_of(doc: dict[str, Any]) -> str:
    """The chain value a commit record stores after ``doc``: SHA-256 of its canonical JSON."""
    return hashlib.sha256(_canonical(doc)).hexdigest()


def make_doc(
    rid: str, seq: int, start: int, stop: int, regions: Sequence[Region],
    attrs: dict[str, str], prev: str,
) -> dict[str, Any]:  # fmt: skip
    """The log document of commit ``seq`` of writer ``rid``: samples ``[start, stop)``."""
    return {
        "v": LOG_VERSION, "rid": rid, "seq": int(seq), "start": int(start), "stop": int(stop),
        "regions": [[n, box, c] for n, box, c in regions], "attrs": attrs, "prev": prev,
    }  # fmt: skip


def _damaged(path: str, rid: str, what: str) -> ArchiveCorruptError:
    return ArchiveCorruptError(
        f"{path!r}: commit record {rid!r} {what}; the archive is damaged (run 'attnscope verify')"
    )


def check_record(
    path: str, rid: str, rec: dict[str, Any], read_doc: Callable[[str, int], Any]
) -> None:
    """Cheap consistency of one commit record with its last log document (one read).

    Refuses a negative or impossible count, a count raised or lowered after the fact
    (the last document's samples end elsewhere), and a chain that does not match.
    Records of archives written before the log (no ``batches``) pass unchanged.
    """
    start, stop, n = rec["start"], rec["stop"], rec["committed"]
    if n < 0 or start < 0 or (stop and start + n > stop):
        raise _damaged(path, rid, f"claims {n} samples from {start} (range end {stop})")
    if "batches" not in rec:
        return
    k = int(rec["batches"])
    since = int(rec.get("since", start))
    if k < 0:
        raise _damaged(path, rid, f"claims {k} log documents")
    if k == 0:
        if start + n != since:
            raise _damaged(path, rid, f"claims {n} samples but its log holds no commit")
        return
    doc = read_doc(rid, k - 1)
    if not isinstance(doc, dict):
        raise _damaged(path, rid, f"claims {k} commits but log document {k - 1} is missing")
    if int(doc.get("stop", -1)) != start + n:
        raise _damaged(
            path, rid,
            f"claims {n} samples from {start} but its last commit ends at sample {doc.get('stop')}",
        )  # fmt: skip
    if chain_of(doc) != rec.get("chain"):
        raise _damaged(path, rid, f"does not match its log document {k - 1} (hash chain)")


def verify_log(
    path: str,
    rid: str,
    rec: dict[str, Any],
    read_doc: Callable[[str, int], Any],
    read_box: Callable[[str, tuple[slice, ...]], np.ndarray],
    get_attrs: Callable[[str], dict[str, Any]],
) -> list[str]:
    """Problems of writer ``rid``'s log: the chain, sample coverage, every region's values
    and every array's attributes, re-read and compared. ``[]`` when all hold."""
    problems: list[str] = []
    try:
        check_record(path, rid, rec, read_doc)
    except ArchiveCorruptError as e:
        return [str(e)]
    if "batches" not in rec:
        return problems
    prev, pos = "", int(rec.get("since", rec["start"]))
    attrs: dict[str, str] = {}
    for seq in range(int(rec["batches"])):
        doc = read_doc(rid, seq)
        if not isinstance(doc, dict):
            return [f"commit record {rid!r}: log document {seq} is missing or unreadable"]
        if doc.get("prev") != prev or doc.get("seq") != seq:
            problems.append(f"commit record {rid!r}: log document {seq} breaks the hash chain")
        # a main writer that resumed after other writers' ranges continues past them
        if not isinstance(doc.get("start"), int) or doc["start"] < pos:
            problems.append(
                f"commit record {rid!r}: log document {seq} starts at sample {doc.get('start')}, "
                f"before the end of the previous commit ({pos})"
            )
        pos, prev = int(doc.get("stop", pos)), chain_of(doc)
        attrs.update(doc.get("attrs") or {})
        for name, box, want in doc.get("regions") or []:
            sel = tuple(slice(int(lo), int(hi)) for lo, hi in box)
            try:
                got = _digest_array(read_box(name, sel))
            except Exception as e:  # noqa: BLE001 - a missing array or chunk is damage too
                problems.append(f"{name} {_box(box)}: cannot be read ({_first_line(e)})")
                continue
            if got != want:
                problems.append(
                    f"{name} {_box(box)}: values differ from what commit {seq} of {rid!r} wrote "
                    "(digest mismatch: a chunk replaced, moved or rewritten)"
                )
            if len(problems) > 20:
                return problems
    for name, want in attrs.items():
        try:
            now = attrs_digest(get_attrs(name))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: attributes cannot be read ({_first_line(e)})")
            continue
        if now != want:
            problems.append(f"{name}: attributes (e.g. 'heads') edited after they were committed")
    return problems


def _box(box: list[list[int]]) -> str:
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in box) + "]"


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def new_record(start: int, stop: int, committed: int) -> dict[str, Any]:
    """The commit record of a writer whose log starts now (nothing logged yet)."""
    return {"start": int(start), "stop": int(stop), "committed": int(committed),
            "batches": 0, "chain": "", "since": int(start) + int(committed)}  # fmt: skip


class LogState:
    """One writer's position in its commit log (sequence number, chain, attrs logged)."""

    def __init__(self, enabled: bool, seq: int, chain: str, since: int) -> None:
        self.enabled, self.seq, self.chain, self.since = enabled, seq, chain, since
        self._logged: set[str] = set()

    @classmethod
    def resume(cls, record: dict[str, Any], next_sample: int, fmt: str) -> LogState:
        """Continue ``record``'s log; a record written before the log starts one at
        ``next_sample`` (Zarr) or keeps the old record form (HDF5: its record is a
        fixed-size dataset that cannot be replaced in one write)."""
        if "batches" in record:
            k = int(record["batches"])
            # a log that holds nothing yet starts where this writer starts
            since = int(record.get("since", record["start"])) if k else next_sample
            return cls(True, k, str(record.get("chain") or ""), since)
        return cls(fmt != "hdf5", 0, "", next_sample)

    def regions(self, writes: Sequence[Write]) -> list[Region]:
        return regions_of(writes) if self.enabled else []

    def new_attrs(self, nodes: Iterable[str]) -> list[str]:
        """Attention nodes whose attributes this writer has not logged yet."""
        if not self.enabled:
            return []
        new = [n for n in nodes if n not in self._logged]
        self._logged.update(new)
        return new

    def commit(
        self, backend: Any, rid: str, start: int, stop: int, pos: int, end: int,
        regions: Sequence[Region], attrs: dict[str, str],
    ) -> dict[str, Any]:  # fmt: skip
        """Write the log document of samples ``[pos, end)``; the record that commits it."""
        if not self.enabled:
            return {"start": start, "stop": stop, "committed": end - start}
        doc = make_doc(rid, self.seq, pos, end, regions, attrs, self.chain)
        backend.write_log(rid, self.seq, doc)
        self.seq, self.chain = self.seq + 1, chain_of(doc)
        return {"start": start, "stop": stop, "committed": end - start,
                "batches": self.seq, "chain": self.chain, "since": self.since}  # fmt: skip


def check_records(path: str, backend: Any) -> None:
    """:func:`check_record` for every writer of an open backend (one document read each).

    Every archive has a ``main`` record from its creation on: one that is gone was deleted.
    """
    records = backend.read_records()
    if "main" not in records:
        raise _damaged(path, "main", "is missing (deleted?); every archive is created with it")
    for rid, rec in records.items():
        check_record(path, rid, rec, backend.read_log)


def verify_records(path: str, backend: Any) -> tuple[list[str], bool]:
    """:func:`verify_log` for every writer: ``(problems, any writer keeps a log)``."""
    problems: list[str] = []
    logged = False
    records = backend.read_records()
    if "main" not in records:
        problems.append(str(_damaged(path, "main", "is missing (deleted?)")))
    for rid, rec in sorted(records.items()):
        logged |= "batches" in rec
        problems += verify_log(
            path, rid, rec, backend.read_log,
            lambda name, sel: backend.get_array(name).read(sel), backend.get_attrs,
        )  # fmt: skip
    return problems, logged


class DigestIndex:
    """Checks reads against the commit log: every region a read box covers whole must
    match its digest, so a chunk moved, replaced or rewritten is refused by the reads that
    touch it (analysis reads whole-sample blocks, which cover their regions; a read of
    part of a region, e.g. one head of a many-head chunk, is left to ``verify``).

    Only the documents of the commits covering a read's samples are fetched: a writer's
    documents are in sample order, so a binary search over them finds the first one
    (``log2(commits)`` reads, each document read once and kept), which keeps the first
    read of a large archive on object storage at a few GETs.
    """

    def __init__(self, path: str, backend: Any) -> None:
        self.path, self._b = path, backend
        self._records: dict[str, dict[str, Any]] | None = None
        self._docs: dict[tuple[str, int], dict[str, Any]] = {}

    def _doc(self, rid: str, seq: int) -> dict[str, Any]:
        key = (rid, seq)
        if key not in self._docs:
            doc = self._b.read_log(rid, seq)
            if not isinstance(doc, dict):
                raise ArchiveCorruptError(
                    f"{self.path!r}: commit record {rid!r} log document {seq} is missing or "
                    "unreadable; the archive is damaged (run 'attnscope verify')"
                )
            self._docs[key] = doc
        return self._docs[key]

    def _covering(self, lo: int, hi: int) -> list[tuple[str, int, dict[str, Any]]]:
        """``(rid, seq, doc)`` of every committed document whose samples meet ``[lo, hi)``."""
        if self._records is None:
            self._records = self._b.read_records()
        out = []
        for rid, rec in self._records.items():
            k = int(rec.get("batches", 0))
            a, b = 0, k  # first document whose stop > lo
            while a < b:
                m = (a + b) // 2
                if int(self._doc(rid, m).get("stop", 0)) <= lo:
                    a = m + 1
                else:
                    b = m
            for seq in range(a, k):
                doc = self._doc(rid, seq)
                if int(doc.get("start", 0)) >= hi:
                    break
                out.append((rid, seq, doc))
        return out

    def check(self, name: str, sel: tuple[slice, ...], data: np.ndarray) -> None:
        """Raise ArchiveCorruptError if a region inside ``sel`` differs from its digest.

        ``sel`` is in samples along its first axis for every array a commit covers
        (attention, masks, ids, frames); the label blobs (bytes) are checked by ``verify``.
        """
        if not sel or f"/{TOKEN_LABELS}/" in name:  # the label blobs: bytes, not samples
            return
        for rid, seq, doc in self._covering(sel[0].start, sel[0].stop):
            for rname, box, dg in doc.get("regions") or []:
                if rname != name or len(box) != len(sel) or not all(
                    s.start <= b0 and b1 <= s.stop for (b0, b1), s in zip(box, sel)
                ):
                    continue
                src = tuple(slice(b0 - s.start, b1 - s.start) for (b0, b1), s in zip(box, sel))
                if _digest_array(data[src]) != dg:
                    raise ArchiveCorruptError(
                        f"{self.path!r}: array {name!r} {_box(box)} differs from what commit "
                        f"{seq} of {rid!r} wrote (a chunk moved, replaced or rewritten); the "
                        "archive is damaged (run 'attnscope verify')"
                    )
