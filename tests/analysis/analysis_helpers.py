"""Seeded attention data and archive builders shared by the analysis tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from attnscope.store.layout import SideLayout, TokenLayout


def softmax_block(
    rng: np.random.Generator, shape: tuple[int, ...], *, causal: bool = False, sharp: float = 2.0
) -> np.ndarray:
    """Random attention rows ``(..., T, S)`` that sum to 1 (optionally causal)."""
    z = rng.standard_normal(shape) * sharp
    if causal:
        t, s = shape[-2], shape[-1]
        mask = np.arange(s)[None, :] > np.arange(t)[:, None] + (s - t)
        z = np.where(mask, -np.inf, z)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def make_weights(
    seed: int = 0, n: int = 6, h: int = 4, s_len: int = 12, t_len: int = 10, layers: int = 1
) -> dict[str, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    enc = [{"self_attention": softmax_block(rng, (n, h, s_len, s_len))} for _ in range(layers)]
    dec = [
        {
            "self_attention": softmax_block(rng, (n, h, t_len, t_len), causal=True),
            "cross_attention": softmax_block(rng, (n, h, t_len, s_len)),
        }
        for _ in range(layers)
    ]
    return {"encoder": enc, "decoder": dec}


def make_layout(s_len: int = 12, t_len: int = 10) -> TokenLayout:
    return TokenLayout(
        encoder=SideLayout.from_lengths({"text": s_len - 5, "agentview_image": 5}),
        decoder=SideLayout.from_lengths({"bos": 1, "action": t_len - 1}),
    )


# ---- a duck-typed archive following the store contract, for when the store is absent ----
class FakeArray:
    def __init__(self, name: str, data: np.ndarray, chunk_n: int = 2) -> None:
        self.name = name
        self.stack, layer, self.kind = name.split("/")
        self.layer = int(layer)
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.chunks = (chunk_n, *data.shape[1:])
        self.heads = list(range(data.shape[1]))
        self.is_sparse = False

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self._data[key])


class FakeArchive:
    def __init__(self, path: Path, weights: dict, layout: TokenLayout, dtype: str) -> None:
        self.path = str(path)
        self.format = "fake"
        self.schema_version = 1
        self.metadata: dict[str, Any] = {}
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.mode = "dense"
        self.topk = None
        self._arrays = {}
        for stack, layers in weights.items():
            for i, kinds in enumerate(layers):
                for kind, arr in kinds.items():
                    name = f"{stack}/{i}/{kind}"
                    self._arrays[name] = FakeArray(name, np.asarray(arr, dtype=dtype))
        self.n_samples = next(iter(self._arrays.values())).shape[0]

    def arrays(self) -> list[str]:
        return sorted(self._arrays)

    def attention(self, stack: str, layer: int, kind: str) -> FakeArray:
        return self._arrays[f"{stack}/{layer}/{kind}"]

    def __getitem__(self, name: str) -> FakeArray:
        return self._arrays[name]

    def to_dask(self, name: str) -> Any:
        import dask.array as da

        arr = self._arrays[name]
        return da.from_array(arr._data, chunks=arr.chunks)

    def identity(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for name in self.arrays():
            h.update(self._arrays[name]._data.tobytes())
        return {
            "archive": self.path,
            "schema_version": 1,
            "n_samples": self.n_samples,
            "fingerprint": h.hexdigest()[:16],
        }


def _store() -> Any:
    # The store package re-exporting its API is the signal that it is ready to use.
    try:
        import attnscope.store as mod
        from attnscope.store import ArchiveWriter, open_archive  # noqa: F401
    except ImportError:
        return None
    return mod


def store_available() -> bool:
    return _store() is not None


def build_archive(
    path: Path, weights: dict, layout: TokenLayout, dtype: str = "float32", **kw: Any
) -> Any:
    """Write ``weights`` batch by batch through ArchiveWriter and reopen (fake without store)."""
    if not store_available():
        return FakeArchive(path, weights, layout, dtype)
    mod = _store()
    ArchiveWriter, open_archive = mod.ArchiveWriter, mod.open_archive  # noqa: N806

    n = (
        next(iter(weights["encoder"][0].values())).shape[0]
        if weights.get("encoder")
        else next(iter(weights["decoder"][0].values())).shape[0]
    )
    with ArchiveWriter.create(path, layout, dtype=dtype, **kw) as w:
        for i in range(0, n, 2):
            w.append(
                {
                    st: [{k: v[i : i + 2] for k, v in layer.items()} for layer in layers]
                    for st, layers in weights.items()
                }
            )
    return open_archive(path)
