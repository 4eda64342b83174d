"""Image-patch overlays and episode timelines on archives with planted patterns."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from click.testing import CliRunner

from attnscope.analysis import load_table
from attnscope.analysis.timeline import timeline
from attnscope.cli import cli
from attnscope.errors import ConfigError, SelectionError
from attnscope.render import render_archive
from attnscope.render.overlay import (
    find_frame,
    plot_overlay,
    prepare_overlay,
    read_frame,
    upsample,
)
from attnscope.store import ArchiveWriter, open_archive
from attnscope.store.layout import SideLayout, TokenLayout

GROUPS = {"cam": {"kind": "image", "grid": [3, 3], "camera": "agentview"}, "pos": "state"}
PATCH = (1, 2)  # the planted head 0 always looks here
N, H = 6, 3


def _layout(groups: dict | None = GROUPS) -> TokenLayout:
    enc = SideLayout.from_lengths({"text": 2, "pos": 1, "cam": 9})
    dec = SideLayout.from_lengths({"act": 2, "traj": 3})
    return TokenLayout(enc, dec).with_groups(groups)


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def soft(n: int, t: int, s: int) -> np.ndarray:
        x = rng.random((n, H, t, s)).astype(np.float32) ** 4
        return x / x.sum(-1, keepdims=True)

    cross = soft(N, 5, 12)
    cross[:, 0] = 0.0
    cross[:, 0, :, 3 + PATCH[0] * 3 + PATCH[1]] = 1.0  # head 0: every query -> patch (1, 2)
    return {
        "encoder/0/self_attention": soft(N, 12, 12),
        "decoder/0/self_attention": soft(N, 5, 5),
        "decoder/0/cross_attention": cross,
        "decoder/1/cross_attention": soft(N, 5, 12),
    }


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    w = _weights(np.random.default_rng(0))
    path = tmp_path / "planted.zarr"
    with ArchiveWriter.create(path, _layout()) as wr:
        wr.append(
            w,
            sample_ids={"episode": np.array([0, 0, 0, 1, 1, 1]), "step": np.array([0, 1, 2] * 2)},
        )
    return path, w


def test_planted_head_lights_exactly_its_patch(planted: tuple) -> None:
    path, _ = planted
    ov = prepare_overlay(path, sample=2, head=0, array="decoder/0/cross_attention")
    want = np.zeros((3, 3))
    want[PATCH] = 1.0
    np.testing.assert_allclose(ov.grid, want, atol=1e-3)
    assert ov.fraction == pytest.approx(1.0, abs=1e-3) and ov.image == "cam"
    assert ov.camera == "agentview"


def test_overlay_values_equal_numpy(planted: tuple) -> None:
    path, w = planted
    x = w["decoder/1/cross_attention"][4]  # (H, T, S)
    ov = prepare_overlay(path, sample=4, query="traj")  # default: decoder cross, last layer
    assert ov.array == "decoder/1/cross_attention" and ov.queries == (2, 3, 4)
    want = x[:, 2:5, 3:12].mean(axis=(0, 1)).reshape(3, 3)
    np.testing.assert_allclose(ov.grid, want, atol=2e-3)  # float16 storage
    assert ov.fraction == pytest.approx(want.sum(), abs=5e-3)
    last = prepare_overlay(path, sample=4, query="last", head=1)
    np.testing.assert_allclose(last.grid, x[1, 4, 3:12].reshape(3, 3), atol=2e-3)
    enc = prepare_overlay(path, sample=0, query="text")  # encoder query: encoder self
    assert enc.array == "encoder/0/self_attention"


def test_untyped_image_and_grid_mismatch_refused(tmp_path: Path, planted: tuple) -> None:
    path = tmp_path / "untyped.zarr"
    with ArchiveWriter.create(path, _layout(None)) as wr:
        wr.append(_weights(np.random.default_rng(1)))
    with pytest.raises(SelectionError, match="no image group") as e:
        prepare_overlay(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="rows \\* cols == tokens"):
        _layout({"cam": {"kind": "image", "grid": [2, 3]}})
    with pytest.raises(SelectionError, match="no segment"):
        prepare_overlay(planted[0], query="nope")


def test_upsampling_and_frames(tmp_path: Path) -> None:
    g = np.arange(4, dtype=float).reshape(2, 2)
    near = upsample(g, (4, 4), "nearest")
    np.testing.assert_array_equal(near, np.kron(g, np.ones((2, 2))))
    bil = upsample(g, (4, 4), "bilinear")
    assert bil[0, 0] == g[0, 0] and bil[-1, -1] == g[-1, -1]
    assert bil[0, 1] == pytest.approx(0.25)  # a quarter of the way to the next centre
    with pytest.raises(ConfigError, match="expected one of"):
        upsample(g, (4, 4), "cubic")
    frame = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    assert read_frame(frame).max() <= 1.0
    (tmp_path / "agentview").mkdir()
    mpimg.imsave(tmp_path / "agentview" / "episode1_step2.png", frame)
    got = find_frame(tmp_path, 5, camera="agentview", ids={"episode": [1] * 6, "step": [2] * 6})
    assert got.name == "episode1_step2.png"
    with pytest.raises(ConfigError, match="no frame for sample 3"):
        find_frame(tmp_path, 3)


def test_plot_overlay_over_frame(planted: tuple) -> None:
    frame = np.zeros((24, 24, 3), dtype=np.float32)
    fig = plot_overlay(planted[0], frame=frame, head=0, array="decoder/0/cross_attention")
    ax = fig.axes[0]
    assert len(ax.images) == 2 and ax.images[1].get_array().shape == (24, 24)
    assert "100.0% of the mass on the image" in ax.get_title()


def test_timeline_equals_numpy_on_planted_episode(planted: tuple, tmp_path: Path) -> None:
    path, w = planted
    timeline(path, tmp_path / "t", query="traj")
    df = load_table(tmp_path / "t", "timeline", with_mean_head=True)  # mean: head_index -1
    x = w["decoder/1/cross_attention"][3:6]  # episode 1, steps 0..2
    want_img = x[:, :, 2:5, 3:12].sum(-1).mean(-1).mean(-1)  # head mean
    got = df[(df.episode == 1) & (df.layer == 1) & (df.kind == "cross_attention")
             & (df.head_index == -1) & (df.key_segment == "cam")].sort_values("step")
    np.testing.assert_allclose(got["mass"], want_img, atol=5e-3)
    assert list(got["step"]) == [0, 1, 2] and set(got["key_kind"]) == {"image"}
    head0 = df[(df.layer == 0) & (df.kind == "cross_attention") & (df.head_index == 0)
               & (df.key_segment == "cam")]
    np.testing.assert_allclose(head0["mass"], 1.0, atol=1e-3)
    assert set(df.query_group) == {"traj"} and set(df["stack"]) == {"decoder"}
    load_table(tmp_path / "t", "timeline", archive=path)  # identity matches
    with pytest.raises(ConfigError, match="episode"):
        timeline(_no_ids(tmp_path), tmp_path / "u")


def _no_ids(tmp_path: Path) -> Path:
    path = tmp_path / "noids.zarr"
    with ArchiveWriter.create(path, _layout()) as wr:
        wr.append(_weights(np.random.default_rng(2)))
    return path


def test_render_overlay_and_timeline_figures(planted: tuple, tmp_path: Path) -> None:
    path, _ = planted
    timeline(path, tmp_path / "tables")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(N):
        mpimg.imsave(frames / f"{i}.png", np.full((12, 12, 3), i / N))
    files = render_archive(path, tmp_path / "figs", what=["overlay", "timeline"],
                           tables_dir=tmp_path / "tables", frames=frames, samples=[0, 1],
                           progress=False)
    names = sorted(p.relative_to(tmp_path / "figs").as_posix() for p in files)
    assert "overlay/decoder-L01-cross_attention-s0001-havg-cam.png" in names
    assert "timeline/e1-decoder-cross_attention-havg.png" in names
    assert all(p.stat().st_size > 0 for p in files)
    with open_archive(path) as a:  # default what: overlays for a layout with images
        default = render_archive(a, tmp_path / "d", what=None, progress=False)
    assert any("overlay/" in str(p) for p in default)


def test_cli_render_overlay_with_frames(planted: tuple, tmp_path: Path) -> None:
    path, _ = planted
    frames = tmp_path / "frames"
    frames.mkdir()
    mpimg.imsave(frames / "000000.png", np.zeros((8, 8, 3)))
    r = CliRunner().invoke(cli, ["render", str(path), "--out", str(tmp_path / "f"), "--what",
                                 "overlay", "--frames", str(frames), "--query", "last",
                                 "--upsampling", "nearest"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f" / "overlay" / "decoder-L01-cross_attention-s0000-havg-cam.png").exists()
    r = CliRunner().invoke(cli, ["render", str(path), "--out", str(tmp_path / "g"), "--what",
                                 "overlay", "--frames", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "frames folder" in r.output


def test_overlay_uses_the_frame_stored_with_the_sample(tmp_path: Path) -> None:
    w = _weights(np.random.default_rng(0))
    frames = np.random.default_rng(1).integers(0, 256, (N, 12, 12, 3), dtype=np.uint8)
    path = tmp_path / "framed.zarr"
    with ArchiveWriter.create(path, _layout()) as wr:
        wr.append(w, frames={"agentview": frames})
    fig = plot_overlay(path, sample=4, head=0, array="decoder/0/cross_attention")
    imgs = fig.axes[0].get_images()
    assert len(imgs) == 2  # the stored frame, then the heat over it
    np.testing.assert_allclose(imgs[0].get_array(), frames[4] / 255.0, atol=1e-6)
    assert imgs[1].get_array().shape == (12, 12)
    bare = plot_overlay(path, sample=4, head=0, array="decoder/0/cross_attention",
                        use_stored_frame=False)
    assert len(bare.axes[0].get_images()) == 1
    # render --what overlay with no --frames draws over the stored frame too
    out = render_archive(path, tmp_path / "figs", what=["overlay"], samples=[4], progress=False)
    assert out and all(p.suffix == ".png" for p in out if p.name != "manifest.json")


def test_overlay_of_an_archive_without_frames_is_a_plain_grid(planted: tuple) -> None:
    path, _ = planted
    with open_archive(path) as arc:
        assert arc.cameras() == [] and arc.frame("agentview", 0) is None
    fig = plot_overlay(path, sample=0, head=0, array="decoder/0/cross_attention")
    assert len(fig.axes[0].get_images()) == 1


def test_small_grids_are_flat_blocks_unless_bilinear_is_asked() -> None:
    g = np.arange(9, dtype=float).reshape(3, 3)
    np.testing.assert_array_equal(upsample(g, (9, 9)), upsample(g, (9, 9), "nearest"))
    big = np.arange(64, dtype=float).reshape(8, 8)
    np.testing.assert_array_equal(upsample(big, (16, 16)), upsample(big, (16, 16), "bilinear"))
    assert not np.array_equal(upsample(g, (9, 9), "bilinear"), upsample(g, (9, 9)))


def test_plot_overlay_default_on_a_3x3_grid_is_nearest(planted: tuple) -> None:
    frame = np.zeros((24, 24, 3), dtype=np.float32)
    fig = plot_overlay(planted[0], frame=frame, head=0, array="decoder/0/cross_attention")
    heat = np.ma.getdata(fig.axes[0].images[1].get_array())
    assert len(np.unique(heat)) <= 9  # one flat value per patch, nothing in between


def test_overlay_head_is_the_models_head_id(tmp_path: Path) -> None:
    """An archive keeping model heads 2 and 0 (in that order): head 0 is the planted head
    (stored second), head 2 the other; head 1 is refused naming the stored heads."""
    w = _weights(np.random.default_rng(0))
    kept = {n: x[:, [1, 0]].copy() for n, x in w.items()}  # planted head 0 stored second
    path = tmp_path / "kept.zarr"
    with ArchiveWriter.create(path, _layout(), heads={n: [2, 0] for n in kept}) as wr:
        wr.append(kept)
    ov = prepare_overlay(path, head=0, array="decoder/0/cross_attention", query="all")
    assert ov.grid[PATCH] == pytest.approx(1.0, abs=1e-3) and ov.head == 0
    other = prepare_overlay(path, head=2, array="decoder/0/cross_attention", query="all")
    assert other.grid[PATCH] < 0.9
    with pytest.raises(SelectionError, match=r"head_idx 1 is not a stored head.*\[2, 0\]"):
        prepare_overlay(path, head=1, array="decoder/0/cross_attention")
