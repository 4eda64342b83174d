"""Fixtures for render tests: seeded attention, the guide's modality layout, a lazy fake archive.

The fake archive follows the store contract (``attention(stack, layer, kind)`` returning an
array-like indexed ``[sample, head]``) and counts what is read, so tests can check that
plots read only the selected sample and head.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests are headless; library modules never call use()

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from attnscope.errors import SelectionError  # noqa: E402
from attnscope.store.layout import SideLayout, TokenLayout  # noqa: E402

ENC = {"text": 10, "robot0_eef_pos": 1, "agentview_image": 9, "agentview_depth": 9}
DEC = {"text": 10, "robot0_eef_pos_past_traj": 10, "robot0_eef_pos_past_traj_delta": 9}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_attention(rng: np.random.Generator, shape: tuple[int, ...], sharp: float = 2.0):
    return softmax(rng.normal(size=shape) * sharp).astype(np.float32)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def layout() -> TokenLayout:
    return TokenLayout(SideLayout.from_lengths(ENC), SideLayout.from_lengths(DEC))


@pytest.fixture
def guide_weights(rng):
    """The guide's nested dict: 3 encoder + 3 decoder layers, B=2, 8 heads, S=29, T=29."""
    s, t = sum(ENC.values()), sum(DEC.values())
    return {
        "encoder": [{"self_attention": random_attention(rng, (2, 8, s, s))} for _ in range(3)],
        "decoder": [
            {
                "self_attention": random_attention(rng, (2, 8, t, t)),
                "cross_attention": random_attention(rng, (2, 8, t, s)),
            }
            for _ in range(3)
        ],
    }


class FakeArray:
    """Lazy array following the store's AttentionArray contract; records every read."""

    def __init__(self, data: np.ndarray, stack: str, layer: int, kind: str, archive):
        self._data = data
        self.shape = data.shape
        self.heads = data.shape[1]
        self.stack, self.layer, self.kind, self.archive = stack, layer, kind, archive
        self.reads: list[tuple] = []

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        self.reads.append(key)
        return np.array(self._data[key])


class FakeArchive:
    def __init__(self, weights: dict, layout: TokenLayout):
        self.layout = layout
        self.n_samples = next(iter(weights["encoder"][0].values())).shape[0]
        self._arrays = {
            (st, i, k): FakeArray(np.asarray(v), st, i, k, self)
            for st, layers in weights.items()
            for i, d in enumerate(layers)
            for k, v in d.items()
        }

    def arrays(self):
        return [f"{s}/{i}/{k}" for (s, i, k) in self._arrays]

    def layers(self, stack):
        return sorted({i for (s, i, _) in self._arrays if s == stack})

    def kinds(self, stack, layer):
        return [k for (s, i, k) in self._arrays if s == stack and i == layer]

    def attention(self, stack, layer, kind):
        try:
            return self._arrays[(stack, layer, kind)]
        except KeyError:
            raise SelectionError(f"no array {stack}/{layer}/{kind}") from None

    def identity(self):
        return {"archive": "/tmp/fake.zarr", "schema_version": 1, "n_samples": self.n_samples,
                "fingerprint": "abc"}


@pytest.fixture
def fake_archive(guide_weights, layout) -> FakeArchive:
    return FakeArchive(guide_weights, layout)


@pytest.fixture(params=["zarr", "h5"])
def real_archive(request, tmp_path, guide_weights, layout):
    """A real archive (Zarr and HDF5) holding ``guide_weights``."""
    from attnscope.store import ArchiveWriter, open_archive

    path = tmp_path / f"run.{request.param}"
    w = ArchiveWriter.create(path, layout, dtype="float32")
    w.append(guide_weights)
    w.close()
    arc = open_archive(path)
    yield arc
    arc.close()


def small_weights(rng: np.random.Generator) -> dict:
    """Tiny guide-shaped weights: 3 + 3 layers, 2 samples, 4 heads, 5 encoder / 4 decoder tokens."""
    return {
        "encoder": [{"self_attention": random_attention(rng, (2, 4, 5, 5))} for _ in range(3)],
        "decoder": [
            {"self_attention": random_attention(rng, (2, 4, 4, 4)),
             "cross_attention": random_attention(rng, (2, 4, 4, 5))}
            for _ in range(3)
        ],
    }


SMALL_LAYOUT = TokenLayout(SideLayout.from_lengths({"text": 3, "img": 2}),
                           SideLayout.from_lengths({"text": 2, "traj": 2}))


def write_archive(path, weights, layout):
    from attnscope.store import ArchiveWriter

    with ArchiveWriter.create(path, layout, dtype="float32") as w:
        w.append(weights)
    return path


@pytest.fixture
def small_archive(rng, tmp_path):
    """A real (Zarr) archive of ``small_weights``, open; batch tests stay fast."""
    from attnscope.store import open_archive

    path = write_archive(tmp_path / "small.zarr", small_weights(rng), SMALL_LAYOUT)
    with open_archive(path) as arc:
        yield arc


#: the model head ids an archive keeps when a capture asks for heads 0 and 3
KEPT_HEADS = [0, 3]


def kept_heads_weights(rng: np.random.Generator) -> dict:
    """Tiny guide-shaped weights of 2 stored heads (model heads 0 and 3); the decoder's
    self-attention causal, so masks and forced rows show too."""
    w = small_weights(rng)
    w = {st: [{k: v[:, :2].copy() for k, v in layer.items()} for layer in layers]
         for st, layers in w.items()}
    tril = np.tril(rng.random((2, 2, 4, 4)) + 0.1)
    for layer in w["decoder"]:
        layer["self_attention"] = (tril / tril.sum(-1, keepdims=True)).astype(np.float32)
    return w


@pytest.fixture
def kept_heads_archive(rng, tmp_path):
    """Path of an archive (Zarr) whose every array keeps model heads 0 and 3 (stored at
    positions 0 and 1)."""
    from attnscope.store import ArchiveWriter

    w = kept_heads_weights(rng)
    names = [f"{st}/{i}/{k}" for st, layers in w.items() for i, lay in enumerate(layers)
             for k in lay]
    path = tmp_path / "kept.zarr"
    with ArchiveWriter.create(path, SMALL_LAYOUT, dtype="float32",
                              heads={n: KEPT_HEADS for n in names}) as wr:
        wr.append(w)
    return path
