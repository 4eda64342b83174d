"""Resume checks: a capture appends to an archive only with the inputs that wrote it.

The committed samples' input hashes (sample ids ``INPUT_HASH_KEYS``, four uint64 words of
a SHA-256 per batch) and the archive's batch size are read once when the archive is
reopened (or, for a rank, when it opens its own range), and every batch that covers a
committed sample is compared with them before anything is skipped or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from attnscope.capture.provenance import input_digest, input_hash_ids
from attnscope.errors import ConfigError
from attnscope.store.meta import INPUT_HASH_KEYS

__all__ = ["ResumeCheck"]


@dataclass
class ResumeCheck:
    """What the committed samples were made from, and the check of a new batch against it.

    ``hashes``: ``(n, 4)`` uint64 input-hash words of committed samples from sample ``base``
    on (None: not recorded); ``batch_size``: the archive's; ``hash_inputs``: whether this
    run records input hashes (an archive from a version that did not continues without).
    """

    hashes: np.ndarray | None = None
    base: int = 0
    batch_size: int | None = None
    hash_inputs: bool = True
    who: str = ""  # "rank k: " in a multi-process capture

    def read(self, meta: dict[str, Any], ids: dict[str, np.ndarray], n: int) -> None:
        """Adopt a reopened archive's ``n`` committed samples (root ``meta``, sample ``ids``)."""
        self.hash_inputs = n == 0 or set(INPUT_HASH_KEYS) <= set(ids)
        if n and self.hash_inputs:
            cols = [np.asarray(ids[k], dtype=np.uint64) for k in INPUT_HASH_KEYS]
            self.hashes = np.stack(cols, 1)
        bsz = meta.get("batch_size")
        self.batch_size = int(bsz) if n and isinstance(bsz, int) else None

    def adopt(self, ids: dict[str, np.ndarray] | None, base: int) -> None:
        """A rejoining rank: the hashes of its own committed samples, from sample ``base``."""
        if ids is not None:
            self.hashes = np.stack([ids[k].astype(np.uint64) for k in INPUT_HASH_KEYS], 1)
            self.base = base

    def check(self, bi: int, bsz: int, pos: int, batch: Any, digest: Any = None) -> None:
        """Refuse batch ``bi`` (``bsz`` samples from sample ``pos``) if its committed samples
        came from other inputs, or if the batch size differs from the archive's."""
        if bi == 0 and self.batch_size is not None and bsz != self.batch_size:
            raise ConfigError(
                f"resume: batch size differs: archive has {self.batch_size}, this run's first "
                f"batch has {bsz}; resume with the batch size (--batch-size "
                f"{self.batch_size}) and inputs that wrote the archive"
            )
        i = pos - self.base
        if self.hashes is None or not 0 <= i < len(self.hashes):
            return
        stored = self.hashes[i]
        digest = input_digest(batch) if digest is None else digest
        words = np.array([w[0] for w in input_hash_ids(digest, 1).values()])
        if not np.array_equal(stored, words):
            have = stored.astype(">u8").tobytes().hex()[:12]
            got = words.astype(">u8").tobytes().hex()[:12]
            raise ConfigError(
                f"{self.who}resume: batch {bi}'s inputs differ from the committed ones (sample "
                f"{pos}): archive has input hash sha256:{have}…, this run's batch has "
                f"sha256:{got}…; resume with the inputs, order and batch size that wrote the "
                "archive, or capture into a new one"
            )
