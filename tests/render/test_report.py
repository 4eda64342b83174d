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
        "Normalised entropy",
        "Modality-to-modality",
        "Top pairs",
        "encoder/0/self_attention",
        "decoder/0/cross_attention",
    ]:
        assert needle in page
    # the data itself, not pictures of it: no PNG at all, one JSON document for the viewer
    assert "data:image/png" not in page
    data = viewer_data(page)
    assert [a["name"] for a in data["arrays"]] == [
        "encoder/0/self_attention", "decoder/0/self_attention", "decoder/0/cross_attention"]
    assert data["samples"] == [0, 1, 2, 3]  # all of this small archive fits the budget


def viewer_data(page: str) -> dict:
    import json

    m = re.search(r"<script type='application/json' id='attnscope-data'>(.*?)</script>", page,
                  re.S)
    assert m
    return json.loads(m.group(1))


def test_report_embeds_each_head_exactly_as_stored(archive, tables, tmp_path) -> None:
    import base64

    from attnscope.store import open_archive

    page = write_report(archive, tmp_path / "r.html", tables_dir=tables).read_text()
    data = viewer_data(page)
    with open_archive(archive) as arc:
        for a in data["arrays"]:
            d = a["data"]["1"]
            raw = np.frombuffer(base64.b64decode(d["b64"]), dtype="<f2")
            want = np.asarray(arc[a["name"]][1], dtype=np.float32).astype("<f2")
            np.testing.assert_array_equal(raw.reshape(want.shape), want)
            assert (d["t"], d["s"], d["fr"], d["fc"]) == (d["T"], d["S"], 1, 1)
            assert (d["T"], d["S"]) == want.shape[1:]  # every token real: nothing cropped
        assert data["tokens"]["encoder"]["1"]["pos"] is None


def test_report_samples_and_downsampling(archive, tables, tmp_path) -> None:
    page = write_report(archive, tmp_path / "r.html", tables_dir=tables, samples=[3], sample=1,
                        max_cells=4).read_text()
    data = viewer_data(page)
    assert data["samples"] == [1, 3] and data["initial"]["sample"] == 1
    enc = data["arrays"][0]["data"]["3"]
    assert (enc["T"], enc["t"], enc["fr"]) == (9, 3, 3)  # 9 tokens in blocks of 3
    with pytest.raises(SelectionError, match="sample 7"):
        write_report(archive, tmp_path / "x.html", tables_dir=tables, samples=[7])
    # a budget of nothing still embeds the sample shown
    page = write_report(archive, tmp_path / "r.html", tables_dir=tables, max_bytes=0).read_text()
    assert viewer_data(page)["samples"] == [0]


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


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)"
)


def dump(out: Path, fragment: str, tmp: Path) -> str:
    """The page's DOM after its script ran, opened at ``#fragment``; no console messages."""
    res = _chromium(["--dump-dom"], out.as_uri() + "#" + fragment, tmp)
    assert console_messages(res.stderr) == []
    assert 'data-ready="1"' in res.stdout, res.stderr[-2000:]  # the viewer ran to the end
    return res.stdout


def hover(dom: str) -> tuple[str, float, str]:
    m = re.search(r'<div id="hover"[^>]*data-weight="([^"]+)"[^>]*data-cell="([^"]+)"[^>]*>'
                  r"(.*?)</div>", dom, re.S)
    assert m, "no hover text"
    return m.group(3), float(m.group(1)), m.group(2)


@needs_chromium
def test_viewer_hover_shows_the_archives_value(archive, tables, tmp_path) -> None:
    from attnscope.store import open_archive

    out = write_report(archive, tmp_path / "r.html", tables_dir=tables)
    dom = dump(out, "array=decoder/0/cross_attention&sample=1&head=1&cell=4,7", tmp_path)
    text, weight, cell = hover(dom)
    with open_archive(archive) as arc:
        want = float(np.float16(arc["decoder/0/cross_attention"][1, 1][4, 7]))
        q_label = arc.layout.decoder.labels[4]
        k_label = arc.layout.encoder.labels[7]
    assert cell == "4,7" and weight == pytest.approx(want, rel=1e-6)
    assert f'query "{q_label}" (#4)' in text and f'key "{k_label}" (#7)' in text
    assert f"{want:.4g}" in text


@needs_chromium
def test_viewer_switching_head_changes_the_drawn_data(archive, tables, tmp_path) -> None:
    out = write_report(archive, tmp_path / "r.html", tables_dir=tables)
    doms = [dump(out, f"array=encoder/0/self_attention&sample=0&head={h}&cell=2,3", tmp_path)
            for h in ("0", "1", "avg")]
    drawn = [re.search(r'data-drawn="([0-9a-f]+)"', d).group(1) for d in doms]
    assert len(set(drawn)) == 3
    w0, w1, avg = (hover(d)[1] for d in doms)
    assert w0 != w1 and avg == pytest.approx((w0 + w1) / 2, rel=1e-9)  # mean of the 2 heads


@needs_chromium
def test_viewer_click_query_shows_its_row(archive, tables, tmp_path) -> None:
    out = write_report(archive, tmp_path / "r.html", tables_dir=tables)
    dom = dump(out, "array=decoder/0/self_attention&sample=0&head=0&q=2", tmp_path)
    assert re.search(r'<canvas id="row"[^>]*data-query="2"', dom)
    assert 'query "action[2]" (#2): attention over the keys' in dom
    # the tables follow the choice: entropy of this (stack, kind), mass, top pairs
    for table in ("entropy", "mass", "pairs"):
        assert re.search(rf'<div id="{table}"><table>', dom), table


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(archive, tables, tmp_path) -> None:
    out = write_report(archive, tmp_path / "r.html", tables_dir=tables)
    dump(out, "", tmp_path)

    shot = tmp_path / "shot.png"
    res = _chromium(["--window-size=1200,1600", f"--screenshot={shot}"], out.as_uri(), tmp_path)
    assert shot.exists(), res.stderr[-2000:]
    import matplotlib.image as mpimg

    px = mpimg.imread(shot)[..., :3]
    assert px.shape[0] == 1600 and px.shape[1] == 1200
    non_white = (px < 0.95).any(-1).mean()
    assert non_white > 0.05  # not blank: header bar, tables and figures are drawn
    assert px.std() > 0.05


EVIL = ["</script><script>window.pwned=1</script>", "\"q'", "<b>&amp;", "a\u2028b", "$x$",
        "é→漢", "<!--", "}};"]


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[Path, Path]:
    from attnscope.analysis import analyze
    from attnscope.store.layout import Segment

    rng = np.random.default_rng(1)
    n = len(EVIL)
    enc = SideLayout((Segment("<i>seg</i>", 0, 4), Segment("\"img'", 4, n)), tuple(EVIL))
    path = tmp_path_factory.mktemp("evil") / "e.zarr"
    with ArchiveWriter.create(path, TokenLayout(enc, None)) as w:
        w.append({"encoder": [{"self_attention": softmax(rng.normal(size=(1, 2, n, n)))}]})
    analyze(path, path.parent / "tables", progress=False)
    return path, path.parent / "tables"


def test_hostile_labels_are_escaped_in_html_and_json(evil, tmp_path) -> None:
    path, tables = evil
    page = write_report(path, tmp_path / "r.html", tables_dir=tables).read_text()
    assert page.count("<script") == 2 and page.count("</script>") == 2  # data + viewer only
    assert "<b>" not in page and "<i>seg" not in page and "<!--" not in page
    data = viewer_data(page)
    assert data["tokens"]["encoder"]["0"]["labels"] == EVIL  # exact, after JSON decoding
    assert "&lt;i&gt;seg&lt;/i&gt;" in page  # the layout table, HTML-escaped


@needs_chromium
def test_hostile_labels_reach_the_viewer_as_text(evil, tmp_path) -> None:
    path, tables = evil
    out = write_report(path, tmp_path / "r.html", tables_dir=tables)
    dom = dump(out, "array=encoder/0/self_attention&head=0&cell=0,1&q=0", tmp_path)
    text, _, _ = hover(dom)
    import html as _html

    shown = _html.unescape(text)
    assert f'query "{EVIL[0]}" (#0)' in shown and f'key "{EVIL[1]}" (#1)' in shown
    assert "pwned" not in dom.split('id="hover"')[0].split("<main>")[-1]  # no injected node
    assert "<b>" not in dom.replace("<b>&amp;", "")  # never parsed as HTML


@needs_chromium
def test_viewer_masks_the_causal_triangle_and_scales_without_row_0(archive, tables,
                                                                    tmp_path) -> None:
    """Decoder self-attention (causal, 6 x 6): 15 cells masked, hovering one says so, and
    the colour scale's top is the largest weight of rows 1-5 (row 0 is forced: 1.0)."""
    from attnscope.store import open_archive

    out = write_report(archive, tmp_path / "r.html", tables_dir=tables)
    dom = dump(out, "array=decoder/0/self_attention&sample=0&head=0&cell=1,4", tmp_path)
    canvas = re.search(r'<canvas id="map"[^>]*>', dom).group(0)
    assert 'data-masked="15"' in canvas
    vmax = float(re.search(r'data-vmax="([^"]+)"', canvas).group(1))
    with open_archive(archive) as arc:
        m = np.float16(arc["decoder/0/self_attention"][0, 0]).astype(np.float64)
    assert m[0, 0] == 1.0 and vmax == pytest.approx(m[1:].max(), rel=1e-9) and vmax < 1.0
    assert "masked: not attended" in hover(dom)[0]
    assert 'id="row" width="10" height="10" style="display: none;"' in dom  # no stray square
    cross = dump(out, "array=decoder/0/cross_attention&sample=0&head=0", tmp_path)
    assert 'data-masked="0"' in re.search(r'<canvas id="map"[^>]*>', cross).group(0)


def test_report_speaks_model_head_ids(kept_heads_archive, tmp_path) -> None:
    """Heads 0 and 3 kept: the page's heads, entropy columns, mass and top pairs are keyed
    by 0 and 3 (never 1), and the maps of head 3 are the second stored head."""
    import base64

    from attnscope.analysis import analyze
    from attnscope.store import open_archive

    analyze(kept_heads_archive, tmp_path / "t", progress=False)
    page = write_report(kept_heads_archive, tmp_path / "r.html", tables_dir=tmp_path / "t",
                        samples=[1]).read_text()
    data = viewer_data(page)
    assert data["initial"]["sample"] == 1  # opens on the first requested sample
    assert {tuple(a["heads"]) for a in data["arrays"]} == {(0, 3)}
    assert all(e["heads"] == [0, 3, -1] for e in data["entropy"].values())
    name = "decoder/0/self_attention"
    assert sorted(data["mass"][name]) == ["-1", "0", "3"]
    assert sorted(data["pairs"][name]) == ["1|-1", "1|0", "1|3"]
    # forced cells (causal row 0 -> key 0) are not among the top pairs
    assert all([q, k] != [0, 0] for q, k, *_ in data["pairs"][name]["1|3"])
    d = next(a for a in data["arrays"] if a["name"] == name)["data"]["1"]
    maps = np.frombuffer(base64.b64decode(d["b64"]), "<f2").reshape(2, d["t"], d["s"])
    with open_archive(kept_heads_archive) as arc:
        np.testing.assert_array_equal(maps[1], np.float16(arc[name][1, 1]))
    assert d["causal"] is True and data["mass_shown"] is True


def test_report_of_a_text_only_model_has_no_mass_table(tmp_path) -> None:
    from attnscope.analysis import analyze

    rng = np.random.default_rng(3)
    lay = TokenLayout(SideLayout.from_lengths({"tokens": 5}), None)
    path = tmp_path / "t.zarr"
    with ArchiveWriter.create(path, lay) as w:
        w.append({"encoder": [{"self_attention": softmax(rng.normal(size=(2, 2, 5, 5)))}]})
    analyze(path, tmp_path / "tab", progress=False)
    data = viewer_data(write_report(path, tmp_path / "r.html", tables_dir=tmp_path / "tab")
                       .read_text())
    assert data["mass_shown"] is False
