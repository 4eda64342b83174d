"""Render against the real store (Zarr and HDF5), not only the fake archive."""

import numpy as np
import pytest

from attnscope import AttentionVisualizer
from attnscope.render import batch, plot_heatmap, render_archive


def test_heatmap_from_archive_selection(real_archive, guide_weights):
    arr = real_archive.attention("decoder", 1, "cross_attention")
    fig = AttentionVisualizer().plot_attention_heatmap(arr, head_idx=3, batch_idx=1, show=False)
    ax = fig.axes[0]
    np.testing.assert_allclose(
        ax.images[0].get_array(), guide_weights["decoder"][1]["cross_attention"][1, 3], rtol=1e-6
    )
    # layout from the archive: keys are encoder tokens, queries decoder tokens
    assert ax.get_xticklabels()[10].get_text() == "robot0_eef_pos"
    assert ax.get_yticklabels()[10].get_text() == "robot0_eef_pos_past_traj[0]"


def test_head_average_from_archive(real_archive, guide_weights):
    fig = plot_heatmap(real_archive.attention("encoder", 2, "self_attention"), batch_idx=0)
    np.testing.assert_allclose(
        fig.axes[0].images[0].get_array(),
        guide_weights["encoder"][2]["self_attention"][0].mean(0),
        rtol=1e-5,
    )


def test_render_archive_from_path_is_reproducible(real_archive, tmp_path):
    path = real_archive.identity()["archive"]
    kw = dict(layers=[0], heads=[1], what=["heatmap"], progress=False)
    a = render_archive(path, tmp_path / "a", **kw)
    b = render_archive(path, tmp_path / "b", **kw)
    assert len(a) == 3
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_tables_from_real_analysis(real_archive, tmp_path):
    from attnscope.analysis import analyze

    if str(real_archive.identity()["archive"]).endswith(".h5"):
        pytest.skip("tables do not depend on the backend; run once, on zarr")
    analyze(real_archive, tmp_path / "tables")
    paths = render_archive(
        real_archive,
        tmp_path / "out",
        layers=[1],
        stacks=["decoder"],
        kinds=["cross_attention"],
        what=["tables"],
        tables_dir=tmp_path / "tables",
        progress=False,
    )
    assert sorted(p.name for p in paths) == [
        "entropy-decoder-cross_attention.png",
        "segment_mass-decoder-L01-cross_attention.png",
        "top_pairs-decoder-L01-cross_attention.png",
    ]


def test_archive_selection_brings_its_modality_axes(tmp_path) -> None:
    from attnscope.render import plot_heatmap
    from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

    rng = np.random.default_rng(0)
    enc = SideLayout.from_lengths({"text": 3, "image": 4})
    path = tmp_path / "lay.zarr"
    w = rng.random((2, 2, 7, 7))
    with ArchiveWriter.create(path, TokenLayout(enc, None)) as wr:
        wr.append({"encoder/0/self_attention": w / w.sum(-1, keepdims=True)})
    with open_archive(path) as a:
        fig = plot_heatmap(a["encoder/0/self_attention"], head_idx=1)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()][:4] == [
            "text[0]",
            "text[1]",
            "text[2]",
            "image[0]",
        ]
        # one boundary between text and image on each axis, at token 3 - 0.5
        xs = sorted({round(float(x), 2) for ln in ax.lines for x in ln.get_xdata()})
        assert 2.5 in xs


def test_parallel_rendering_writes_identical_files(tmp_path, monkeypatch) -> None:
    from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

    rng = np.random.default_rng(1)
    lay = TokenLayout(SideLayout.from_lengths({"a": 3, "b": 3}), SideLayout.from_lengths({"c": 4}))
    path = tmp_path / "par.zarr"

    def soft(*shape):
        x = rng.random(shape)
        return x / x.sum(-1, keepdims=True)

    with ArchiveWriter.create(path, lay) as w:
        w.append(
            {
                "encoder": [{"self_attention": soft(2, 2, 6, 6)}] * 2,
                "decoder": [
                    {
                        "self_attention": _causal(2, 2, 4),
                        "cross_attention": soft(2, 2, 4, 6),
                    }
                ]
                * 2,
            }
        )
    monkeypatch.setattr(batch, "MIN_PARALLEL_FIGURES", 8)  # parallel even for a few figures
    one = render_archive(
        path, tmp_path / "one", what=["heatmap", "grid"], heads=[None, 1], progress=False, workers=1
    )
    two = render_archive(
        path, tmp_path / "two", what=["heatmap", "grid"], heads=[None, 1], progress=False, workers=2
    )
    assert len(one) == len(two) >= 8
    for a, b in zip(one, two):
        assert a.relative_to(tmp_path / "one") == b.relative_to(tmp_path / "two")
        assert a.read_bytes() == b.read_bytes()


def _causal(b: int, h: int, t: int) -> np.ndarray:
    m = np.tril(np.ones((t, t)))
    return np.broadcast_to(m / m.sum(-1, keepdims=True), (b, h, t, t)).copy()
