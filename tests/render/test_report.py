"""The HTML report: self-contained, loads in a real headless Chromium without errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from attnscope.errors import ConfigError, SelectionError, StaleTableError
from attnscope.render.report import write_report
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    enc = SideLayout.from_lengths({"text": 4, "image": 5})
    dec = SideLayout.from_lengths({"action": 6})
    path = tmp_path_factory.mktemp("rep") / "a.zarr"
    causal = np.triu(np.full((6, 6), -np.inf), 1)
    with ArchiveWriter.create(path, TokenLayout(enc, dec)) as w:
        for _ in range(2):
            w.append(
                {
                    "encoder": [{"self_attention": softmax(rng.normal(size=(2, 2, 9, 9)) * 2)}],
                    "decoder": [
                        {
                            "self_attention": softmax(rng.normal(size=(2, 2, 6, 6)) + causal),
                            "cross_attention": softmax(rng.normal(size=(2, 2, 6, 9)) * 2),
                        }
                    ],
                }
            )
    return path


@pytest.fixture(scope="module")
def tables(archive) -> Path:
    from attnscope.analysis import analyze

    analyze(archive, archive.parent / "tables", progress=False)
    return archive.parent / "tables"


def test_report_is_self_contained(archive, tables, tmp_path) -> None:
    out = write_report(archive, tmp_path / "r.html", tables_dir=tables)
    page = out.read_text()
    # no network: every src/href is inline
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "http://" not in page and "https://" not in page
    # metadata, layout, entropy, mass tables, top pairs, figures
    for needle in [
        "schema version",
        "image",
        "action",
        "Entropy per layer",
        "Modality-to-modality",
        "Top attention pairs",
        "encoder/0/self_attention",
        "decoder/0/cross_attention",
    ]:
        assert needle in page
    # one map per (array, head average + each head) plus flow and table figures
    assert page.count('class="attn"') == 3 * 3
    assert page.count("data:image/png;base64,") > 9


def test_report_bad_sample(archive, tables, tmp_path) -> None:
    with pytest.raises(SelectionError, match="sample 9"):
        write_report(archive, tmp_path / "r.html", tables_dir=tables, sample=9)
    assert list(tmp_path.iterdir()) == []


def test_report_needs_tables_and_does_not_analyse(archive, tmp_path) -> None:
    with pytest.raises(ConfigError, match="needs tables_dir"):
        write_report(archive, tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_report_module_does_not_import_analysis_compute_code() -> None:
    import ast

    import attnscope.render.report as rep

    tree = ast.parse(Path(rep.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("attnscope.analysis")}


def test_report_refuses_another_archives_tables(archive, tables, tmp_path) -> None:
    other = tmp_path / "other.zarr"
    import shutil

    shutil.copytree(archive, other)  # same content, another archive
    with pytest.raises(StaleTableError, match="stale"):
        write_report(other, tmp_path / "r.html", tables_dir=tables)
    assert not (tmp_path / "r.html").exists()


def test_report_out_is_an_existing_folder(archive, tables, tmp_path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        write_report(archive, taken, tables_dir=tables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert list(taken.iterdir()) == []


def _chromium(args: list[str], url: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_console_check_catches_a_broken_page(tmp_path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    res = _chromium(["--dump-dom"], bad.as_uri(), tmp_path)
    assert any("boom" in m for m in console_messages(res.stderr))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(archive, tables, tmp_path) -> None:
    out = write_report(archive, tmp_path / "r.html", tables_dir=tables)
    res = _chromium(["--dump-dom"], out.as_uri(), tmp_path)
    assert console_messages(res.stderr) == []
    assert 'data-ready="1"' in res.stdout  # the chooser script ran to the end
    # exactly one attention map is visible after the script ran
    shown = re.findall(r'<img class="attn"[^>]*>', res.stdout)
    assert len(shown) == 9
    assert sum("display: none" not in tag for tag in shown) == 1

    shot = tmp_path / "shot.png"
    res = _chromium(["--window-size=1200,1600", f"--screenshot={shot}"], out.as_uri(), tmp_path)
    assert shot.exists(), res.stderr[-2000:]
    import matplotlib.image as mpimg

    px = mpimg.imread(shot)[..., :3]
    assert px.shape[0] == 1600 and px.shape[1] == 1200
    non_white = (px < 0.95).any(-1).mean()
    assert non_white > 0.05  # not blank: header bar, tables and figures are drawn
    assert px.std() > 0.05
