"""Helpers shared by the store tests (unique module name: tests/ has no packages)."""

from __future__ import annotations

import numpy as np

FORMATS = {"zarr": "run.zarr", "hdf5": "run.h5"}
ENC, DEC, H = 9, 4, 4


def softmax(
    rng: np.random.Generator, shape: tuple[int, ...], *, causal: bool = False
) -> np.ndarray:
    """Softmax-normalised float32 weights of ``shape`` (..., T, S)."""
    x = rng.standard_normal(shape).astype(np.float32) * 2
    if causal:
        t, s = shape[-2:]
        x = np.where(np.tril(np.ones((t, s), bool)), x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def make_batch(rng: np.random.Generator, b: int, *, layers: int = 2) -> dict[str, np.ndarray]:
    """Flat batch: encoder self, decoder self (causal) and cross attention per layer."""
    out = {}
    for i in range(layers):
        out[f"encoder/{i}/self_attention"] = softmax(rng, (b, H, ENC, ENC))
        out[f"decoder/{i}/self_attention"] = softmax(rng, (b, H, DEC, DEC), causal=True)
        out[f"decoder/{i}/cross_attention"] = softmax(rng, (b, H, DEC, ENC))
    return out


def nested(flat: dict[str, np.ndarray]) -> dict[str, list]:
    """The model's nested form of a flat batch."""
    out: dict[str, list] = {"encoder": [], "decoder": []}
    for name, w in flat.items():
        stack, layer, kind = name.split("/")
        layers = out[stack]
        while len(layers) <= int(layer):
            layers.append({})
        layers[int(layer)][kind] = w
    return out


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
