"""The report's overlays and timeline: embedded data, and in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from attnscope.analysis import analyze
from attnscope.analysis.timeline import timeline
from attnscope.render.overlay import prepare_overlay
from attnscope.render.report import write_report
from attnscope.store import ArchiveWriter
from attnscope.store.layout import SideLayout, TokenLayout

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed")
GROUPS = {"cam": {"kind": "image", "grid": [3, 3], "camera": "agentview"}, "pos": "state"}
PATCH = (1, 2)  # head 0 of decoder/0/cross_attention always looks here
N, H = 6, 3


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def soft(t: int, s: int) -> np.ndarray:
        x = rng.random((N, H, t, s)).astype(np.float32) ** 4
        return x / x.sum(-1, keepdims=True)

    cross = soft(5, 12)
    cross[:, 0] = 0.0
    cross[:, 0, :, 3 + PATCH[0] * 3 + PATCH[1]] = 1.0
    return {"encoder/0/self_attention": soft(12, 12), "decoder/0/cross_attention": cross}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    root = tmp_path_factory.mktemp("rep_ov")
    lay = TokenLayout(SideLayout.from_lengths({"text": 2, "pos": 1, "cam": 9}),
                      SideLayout.from_lengths({"act": 2, "traj": 3})).with_groups(GROUPS)
    frames = np.random.default_rng(1).integers(0, 256, (N, 20, 20, 3), dtype=np.uint8)
    path = root / "planted.zarr"
    with ArchiveWriter.create(path, lay) as w:
        w.append(_weights(np.random.default_rng(0)), frames={"agentview": frames},
                 sample_ids={"episode": np.array([0, 0, 0, 1, 1, 1]),
                             "step": np.array([0, 1, 2] * 2)})
    analyze(path, root / "tables", progress=False)
    timeline(path, root / "tables", query="traj")
    return path, root / "tables", frames


def viewer_data(page: str) -> dict:
    m = re.search(r"<script type='application/json' id='attnscope-data'>(.*?)</script>", page,
                  re.S)
    assert m
    return json.loads(m.group(1))


def test_report_embeds_image_groups_frames_and_timeline(planted, tmp_path) -> None:
    path, tables, frames = planted
    data = viewer_data(write_report(path, tmp_path / "r.html", tables_dir=tables).read_text())
    assert data["images"] == {
        "decoder/0/cross_attention": [["cam", 3, 12, 3, 3, "agentview"]],
        "encoder/0/self_attention": [["cam", 3, 12, 3, 3, "agentview"]],
    }
    import base64

    fr = data["frames"]["agentview"]["2"]
    got = np.frombuffer(base64.b64decode(fr["b64"]), np.uint8).reshape(fr["h"], fr["w"], 3)
    np.testing.assert_array_equal(got, frames[2])  # 20 px: small enough to embed as is
    tl = data["timeline"]
    assert tl["query"] == "traj"
    lines = tl["series"]["decoder|cross_attention"]["0"]["0"]["0"]
    assert [ln[0] for ln in lines] == ["text", "pos", "cam"]
    assert lines[2][1] == [0, 1, 2] and lines[2][2] == pytest.approx([1.0] * 3, abs=1e-3)


def test_report_without_timeline_or_images(planted, tmp_path) -> None:
    path, tables, _ = planted
    other = tmp_path / "tables"
    shutil.copytree(tables, other)
    (other / "timeline.parquet").unlink()
    data = viewer_data(write_report(path, tmp_path / "r.html", tables_dir=other).read_text())
    assert data["timeline"] is None


def _dump(out: Path, fragment: str, tmp: Path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--dump-dom", out.as_uri() + "#" + fragment]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln] == []
    assert 'data-ready="1"' in res.stdout, res.stderr[-2000:]
    return res.stdout


def _overlay(dom: str) -> tuple[list, str, str]:
    m = re.search(r'<canvas[^>]*class="overlay"[^>]*>', dom)
    assert m, "no overlay canvas"
    tag = m.group(0)
    grid = json.loads(re.search(r'data-grid="([^"]*)"', tag).group(1).replace("&quot;", '"'))
    return (grid, re.search(r'data-argmax="([^"]*)"', tag).group(1),
            re.search(r'data-frame="([^"]*)"', tag).group(1))


@needs_chromium
def test_clicking_a_query_lights_exactly_the_planted_patch(planted, tmp_path) -> None:
    path, tables, _ = planted
    out = write_report(path, tmp_path / "r.html", tables_dir=tables)
    dom = _dump(out, "array=decoder/0/cross_attention&sample=2&head=0&click=3,1", tmp_path)
    grid, argmax, frame = _overlay(dom)
    want = np.zeros(9)
    want[PATCH[0] * 3 + PATCH[1]] = 1.0
    np.testing.assert_allclose(grid, want, atol=1e-3)
    assert argmax == "1,2" and frame == "1"
    # another head, a segment's mean row: the numbers of prepare_overlay
    dom = _dump(out, "array=decoder/0/cross_attention&sample=4&head=1&qseg=traj", tmp_path)
    grid, _, _ = _overlay(dom)
    ov = prepare_overlay(path, sample=4, head=1, query="traj", array="decoder/0/cross_attention")
    np.testing.assert_allclose(grid, ov.grid.ravel(), rtol=2e-3, atol=1e-4)
    # the timeline is drawn: one line per key modality
    assert re.search(r'<canvas id="timeline"[^>]*data-lines="3"', dom)


@needs_chromium
def test_no_timeline_table_no_plot(planted, tmp_path) -> None:
    path, tables, _ = planted
    other = tmp_path / "tables"
    shutil.copytree(tables, other)
    (other / "timeline.parquet").unlink()
    out = write_report(path, tmp_path / "r.html", tables_dir=other)
    dom = _dump(out, "array=decoder/0/cross_attention&sample=0&head=avg", tmp_path)
    assert not re.search(r'<canvas id="timeline"[^>]*data-lines', dom)
