"""Provenance of a capture: what a reader needs to trust a figure made from the archive.

Recorded in the archive's ``capture`` metadata at create: the model's class, training
state, where its weights came from (:func:`mark_weights`: ``pretrained from FOLDER`` or
``random, seed N``), the attention implementation each array's module ran with, the
compute and storage dtypes, the device, and the git state of the capturing code. Each
batch's inputs are hashed (:func:`input_digest`) and the digest goes with the batch's
``append`` as per-sample ids (:data:`~attnscope.store.meta.INPUT_HASH_KEYS`), so it is
committed with the batch.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from attnscope.store.meta import INPUT_HASH_KEYS

__all__ = [
    "input_digest", "input_hash_ids", "run_provenance", "git_state", "mark_weights",
    "weights_of",
]  # fmt: skip

# attribute of a model holding where its weights came from (set by mark_weights)
_WEIGHTS_ATTR = "_attnscope_weights"


def input_digest(batch: Any) -> bytes:
    """SHA-256 over every tensor / array of ``batch`` (keys, dtype, shape and bytes).

    Mappings are walked in sorted key order, sequences in order; other leaves (ints,
    strings) are hashed by their ``repr``. The same inputs give the same digest on any
    device.
    """
    h = hashlib.sha256()
    _feed(h, batch, "")
    return h.digest()


def _feed(h: Any, obj: Any, path: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().reshape(-1).contiguous().cpu()
        h.update(f"{path}:{t.dtype}:{tuple(obj.shape)};".encode())
        try:
            h.update(memoryview(t.view(torch.uint8).numpy()))
        except (RuntimeError, TypeError):  # e.g. quantized: hash values
            h.update(memoryview(t.double().numpy()))
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"{path}:{a.dtype}:{a.shape};".encode())
        h.update(memoryview(a.view(np.uint8).reshape(-1)) if a.dtype.kind != "O" else b"")
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            _feed(h, obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _feed(h, v, f"{path}[{i}]")
    else:
        h.update(f"{path}={obj!r};".encode())


def input_hash_ids(digest: bytes, n: int) -> dict[str, np.ndarray]:
    """The batch digest as per-sample ids: four uint64 words, repeated for ``n`` samples."""
    words = np.frombuffer(digest, dtype=">u8").astype(np.uint64)
    return {k: np.full(n, w, dtype=np.uint64) for k, w in zip(INPUT_HASH_KEYS, words)}


def git_state(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git work tree holding ``cwd``; None outside one.

    Best effort: no git, no work tree or a git error all give None.
    """
    where = os.fspath(cwd) if cwd is not None else os.getcwd()

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(
                ["git", *args], cwd=where, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status), "cwd": where}


def mark_weights(net: nn.Module, record: Mapping[str, Any]) -> None:
    """Record where ``net``'s weights came from, for the archive's provenance.

    ``record`` is JSON: ``{"source": "pretrained", "from": folder, ...}`` or ``{"source":
    "random", "seed": N, ...}``. The command line marks the models it builds; a model
    given to :func:`~attnscope.capture.capture` unmarked has ``weights: null`` (its
    parameter hash is recorded either way).
    """
    if record.get("source") not in ("pretrained", "random"):
        raise ValueError(f"weights source {record.get('source')!r}; expected pretrained/random")
    object.__setattr__(net, _WEIGHTS_ATTR, dict(record))


def weights_of(net: nn.Module) -> dict[str, Any] | None:
    """What :func:`mark_weights` recorded for ``net`` (None: not marked)."""
    rec = getattr(net, _WEIGHTS_ATTR, None)
    return None if rec is None else dict(rec)


def run_provenance(
    net: nn.Module,
    impl: Mapping[str, str],
    *,
    device: torch.device,
    dtype: str,
) -> dict[str, Any]:
    """The ``capture.provenance`` block (JSON) of a capture of ``net``."""
    p = next(iter(net.parameters()), None)
    return {
        "model_class": f"{type(net).__module__}.{type(net).__qualname__}",
        "training": bool(net.training),
        "weights": weights_of(net),
        "attention_implementation": dict(impl),
        "device": str(device),
        "compute_dtype": str(p.dtype).removeprefix("torch.") if p is not None else None,
        "storage_dtype": dtype,
        "input_hash": {"algorithm": "sha256", "per": "batch", "sample_ids": list(INPUT_HASH_KEYS)},
        "git": git_state(),
    }

