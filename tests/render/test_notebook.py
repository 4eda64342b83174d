"""Notebooks: the viewer inline (``attnscope.show``, an array's rich display), an archive's
summary, figures shown once, one-line refusals.

The example notebook ``examples/notebook.ipynb`` is executed by a real kernel (nbclient),
its outputs checked, and its HTML (nbconvert's lab template) opened in headless Chromium.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnscope.errors import ConfigError, SelectionError
from attnscope.render.notebook import array_html, show, viewer
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

from .test_report import _chromium, console_messages, needs_chromium, softmax

EXAMPLE = Path(__file__).parents[2] / "examples" / "notebook.ipynb"
DATA = re.compile(r"<script type=.application/json. id=.(attnscope-[0-9a-f]+-)attnscope-data.>"
                  r"(.*?)</script>", re.S)


#: the fixture's arrays, in the archive's order (stack, layer, kind)
ARRAYS = ["encoder/0/self_attention", "decoder/0/self_attention", "decoder/0/cross_attention"]


def viewers(page: str) -> dict[str, dict]:
    """``{id prefix: embedded JSON}`` of every viewer in an HTML page or fragment."""
    return {p: json.loads(d) for p, d in DATA.findall(page)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """3 arrays (encoder self, decoder self and cross), 5 samples, 2 heads."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("nb") / "a.zarr"
    lay = TokenLayout(SideLayout.from_lengths({"text": 4, "image": 5}),
                      SideLayout.from_lengths({"action": 6}))
    with ArchiveWriter.create(path, lay) as w:
        for n in (2, 3):
            w.append({
                "encoder": [{"self_attention": softmax(rng.normal(size=(n, 2, 9, 9)))}],
                "decoder": [{"self_attention": softmax(rng.normal(size=(n, 2, 6, 6))),
                             "cross_attention": softmax(rng.normal(size=(n, 2, 6, 9)))}],
            })
    return path


# -- the viewer, without a kernel ---------------------------------------------------------
def test_viewer_embeds_a_bounded_default_and_says_how_to_choose(archive) -> None:
    with open_archive(archive) as arc:
        every = viewer(arc)
        d = next(iter(viewers(every.html()).values()))
        assert [a["name"] for a in d["arrays"]] == ARRAYS and d["samples"] == [0, 1, 2, 3, 4]
        assert not d["tables"] and d["initial"] == {
            "array": "encoder/0/self_attention", "sample": 0, "head": None}
        # base64 bytes of one sample of an array: 4 * ceil(H * T * S * 2 bytes / 3)
        cost = [4 * -(-int(np.prod(arc[n].shape[1:])) * 2 // 3) for n in ARRAYS]
        small = viewer(arc, max_bytes=cost[0] + cost[1])  # two arrays of one sample
        d = next(iter(viewers(small.html()).values()))
        assert [a["name"] for a in d["arrays"]] == ARRAYS[:2] and d["samples"] == [0]
        assert small.nbytes == cost[0] + cost[1] and "2 of 3 arrays, samples 0 of 5" in small.text
        assert "attnscope.show(archive, arrays=[...], samples=[...])" in small.html()
        # the sample shown first, then the first others that fit
        mid = viewer(arc, sample=3, max_bytes=3 * sum(cost))
        d = next(iter(viewers(mid.html()).values()))
        assert d["samples"] == [0, 1, 3] and mid.nbytes == 3 * sum(cost)
        # at least one array of one sample, whatever the budget
        d = next(iter(viewers(viewer(arc, max_bytes=0, sample=3).html()).values()))
        assert len(d["arrays"]) == 1 and d["samples"] == [3]


def test_viewer_refuses_an_explicit_choice_over_the_budget(archive) -> None:
    # 5 samples x 4 * ceil(2 * 9 * 9 * 2 / 3) base64 bytes = 2160
    with pytest.raises(ConfigError, match=r"embeds 2\.2 kB .* over max_bytes=1000"):
        viewer(archive, samples=[0, 1, 2, 3, 4], arrays=["encoder/0/self_attention"],
               max_bytes=1000)
    v = viewer(archive, samples=[1, 2], arrays="decoder/0/cross_attention", head=1)
    d = next(iter(viewers(v.html()).values()))
    assert d["samples"] == [1, 2] and d["initial"]["head"] == 1


@pytest.mark.parametrize(("kwargs", "error", "needle"), [
    ({"sample": 5}, SelectionError, r"sample 5 out of range \[0, 5\)"),
    ({"samples": [-1]}, SelectionError, r"sample -1 out of range"),
    ({"arrays": ["encoder/3/self_attention"]}, SelectionError, "unknown array"),
    ({"arrays": []}, SelectionError, "arrays selects nothing"),
    ({"samples": []}, SelectionError, "samples selects nothing"),
    ({"head": 7}, SelectionError, "head 7 is in none of"),
    ({"max_cells": 0}, ConfigError, "max_cells must be >= 1"),
])
def test_viewer_bad_input_is_one_clear_error(archive, kwargs, error, needle) -> None:
    with pytest.raises(error, match=needle) as info:
        viewer(archive, **kwargs)
    # IPython / Jupyter show an attnscope error as this one line, not a traceback
    assert info.value._render_traceback_() == [f"{error.__name__}: {info.value}"]


def test_each_display_has_its_own_ids_and_embeds_the_stored_values(archive) -> None:
    import base64

    v = viewer(archive, arrays=["decoder/0/cross_attention"], samples=[2])
    a, b = v.html(), v._repr_html_()
    (pa, da), (pb, db) = *viewers(a).items(), *viewers(b).items()
    assert pa != pb and da == db  # one viewer shown twice: two sets of ids, same data
    assert f"id='{pa}root'" in a and f"#{pa}root " in a  # the stylesheet is scoped to it
    assert not re.search(r"(src|href)=", a) and "http" not in a  # nothing fetched
    with open_archive(archive) as arc:
        want = np.asarray(arc["decoder/0/cross_attention"][2], dtype=np.float32).astype("<f2")
    raw = np.frombuffer(base64.b64decode(da["arrays"][0]["data"]["2"]["b64"]), dtype="<f2")
    np.testing.assert_array_equal(raw.reshape(want.shape), want)


def test_viewer_with_tables_shows_them(archive, tmp_path) -> None:
    from attnscope.analysis import analyze

    analyze(archive, tmp_path / "tables", progress=False)
    d = next(iter(viewers(viewer(archive, tables_dir=tmp_path / "tables").html()).values()))
    assert d["tables"] and d["entropy"] and d["pairs"]["encoder/0/self_attention"]


def test_show_is_attnscope_show(archive) -> None:
    import attnscope
    import attnscope.render

    assert attnscope.show is attnscope.render.show is show
    with open_archive(archive) as arc:
        assert arc.arrays == ARRAYS  # the one call of the archive's listing in this file


def test_show_outside_a_notebook_prints_plain_text(archive, capsys) -> None:
    assert show(archive, sample=1) is None
    out = capsys.readouterr().out
    assert "3 of 3 arrays, samples 0-4 of 5 embedded" in out and "not in a notebook" in out
    assert "<" not in out  # plain text, no HTML
    assert repr(viewer(archive)).startswith("attnscope viewer of")


def test_viewer_save_writes_a_page(archive, tmp_path) -> None:
    page = viewer(archive).save(tmp_path / "v.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and len(viewers(page)) == 1
    with pytest.raises(ConfigError, match="is a folder"):
        viewer(archive).save(tmp_path)


def test_figures_outside_notebooks_are_left_alone(archive) -> None:
    """No kernel: no display hook on the figure, pyplot keeps it (as before)."""
    import matplotlib.pyplot as plt

    from attnscope.render.plots import plot_heatmap

    with open_archive(archive) as arc:
        fig = plot_heatmap(arc["encoder/0/self_attention"], head_idx=0, show=True)
    assert "_ipython_display_" not in fig.__dict__ and plt.fignum_exists(fig.number)


# -- the store's rich display -------------------------------------------------------------
def test_archive_displays_a_summary_table(archive) -> None:
    with open_archive(archive) as arc:
        page = arc._repr_html_()
        for needle in ["samples committed</td><td style='text-align:left'>5<", "zstd",
                       "text [0:4]; image [4:9]", "action[0], action[1]", "5x2x6x9",
                       *ARRAYS]:
            assert needle in page, needle
        assert "attnscope-data" not in page  # a summary, no embedded attention


def test_summary_escapes_labels(tmp_path) -> None:
    from attnscope.store.layout import Segment

    labels = ("<b>x</b>", "a&b", "</table>")
    enc = SideLayout((Segment("<i>s</i>", 0, 3),), labels)
    with ArchiveWriter.create(tmp_path / "e.zarr", TokenLayout(enc, None)) as w:
        w.append({"encoder": [{"self_attention": softmax(np.zeros((1, 1, 3, 3)))}]})
    with open_archive(tmp_path / "e.zarr") as arc:
        page = arc._repr_html_()
    assert "<b>x" not in page and "<i>" not in page and page.count("</table>") == 3
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "a&amp;b" in page


def test_an_array_displays_its_viewer_or_one_line_why_not(archive, tmp_path) -> None:
    with open_archive(archive) as arc:
        arr = arc["decoder/0/self_attention"]
        d = next(iter(viewers(arr._repr_html_()).values()))
        assert [a["name"] for a in d["arrays"]] == ["decoder/0/self_attention"]
    # an array created up front, before any commit: nothing to show, said in one line
    lay = TokenLayout(SideLayout.from_lengths({"t": 3}), None)
    ArchiveWriter.create(tmp_path / "empty.zarr", lay,
                         arrays={"encoder/0/self_attention": (2, 3, 3)}).close()
    with open_archive(tmp_path / "empty.zarr") as arc:
        html = arc["encoder/0/self_attention"]._repr_html_()
    assert html.startswith("<pre>attnscope: SelectionError") and "no committed" in html
    assert html == array_html(arc["encoder/0/self_attention"])


def test_store_imports_render_only_to_display_an_array(archive) -> None:
    code = (
        "import sys\nfrom attnscope.store import open_archive\n"
        f"arc = open_archive({str(archive)!r})\n"
        "render = lambda: sorted(m for m in sys.modules if m.startswith('attnscope.render'))\n"
        "assert render() == [], render()\narc._repr_html_()\nassert render() == [], render()\n"
        "assert 'IPython' not in sys.modules\n"
        "arc['encoder/0/self_attention']._repr_html_()\n"
        "assert 'attnscope.render.notebook' in sys.modules\nassert 'IPython' not in sys.modules\n"
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


# -- a real notebook ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """``examples/notebook.ipynb`` executed by a python3 kernel in a fresh folder."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("torch")  # the notebook captures a small model
    folder = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(EXAMPLE, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(folder)}}).execute()
    return nb, folder


def _outputs(nb, first_line: str) -> list:
    """Outputs of the one code cell whose first line is ``first_line``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.split("\n")[0] == first_line]
    assert len(cells) == 1, first_line
    return cells[0].outputs


def _count(outputs: list, mime: str) -> int:
    return sum(mime in o.get("data", {}) for o in outputs)


def test_notebook_shows_each_figure_once(executed) -> None:
    nb, _ = executed
    last = _outputs(nb, "viz = attnscope.AttentionVisualizer()")  # the call ends the cell
    assert _count(last, "image/png") == 1
    inner = _outputs(nb, 'fig = viz.plot_attention_heatmap(arc, stack="decoder", layer=0, '
                              'kind="cross_attention")')  # the call does not
    assert _count(inner, "image/png") == 1
    assert any(o.output_type == "stream" and "sample 0" in o.text for o in inner)
    grid = _outputs(nb, "from attnscope.render import plot_head_grid")  # show=False, last
    assert _count(grid, "image/png") == 1


def test_notebook_displays_archive_summary_and_viewers(executed) -> None:
    nb, _ = executed
    summary = _outputs(nb, "arc")
    assert [o.output_type for o in summary] == ["execute_result"]
    assert "samples committed" in summary[0].data["text/html"]
    assert summary[0].data["text/plain"].startswith("AttentionArchive(")
    arr = _outputs(nb, 'arc["encoder/0/self_attention"]')
    shown = _outputs(
        nb, 'attnscope.show(arc, arrays=["decoder/0/cross_attention"], sample=1, head=1)')
    assert [o.output_type for o in arr] == ["execute_result"]
    assert [o.output_type for o in shown] == ["display_data"]  # show() returns None
    (pa, da), = viewers(arr[0].data["text/html"]).items()
    (pb, db), = viewers(shown[0].data["text/html"]).items()
    assert pa != pb
    assert [a["name"] for a in da["arrays"]] == ["encoder/0/self_attention"]
    assert [a["name"] for a in db["arrays"]] == ["decoder/0/cross_attention"]
    assert db["initial"] == {"array": "decoder/0/cross_attention", "sample": 1, "head": 1}


def test_notebook_bad_input_is_one_line(executed) -> None:
    nb, _ = executed
    (err,) = _outputs(nb, "attnscope.show(arc, sample=99)")
    assert err.output_type == "error" and err.ename == "SelectionError"
    assert err.traceback == ["SelectionError: sample 99 out of range [0, 4)"]


HOVER = """<script>
document.querySelectorAll('.attnscope-viewer').forEach(function(root){
  var p=root.id.slice(0,-4),cv=document.getElementById(p+'map'),
    g=cv.dataset.geom.split(',').map(Number),r=cv.getBoundingClientRect(),
    k=cv.width/cv.clientWidth;
  cv.dispatchEvent(new MouseEvent('mousemove',{clientX:r.left+cv.clientLeft+(g[0]+(COL+0.5)*g[2])/k,
    clientY:r.top+cv.clientTop+(g[1]+(ROW+0.5)*g[2])/k}));});
</script>"""


@needs_chromium
def test_notebook_html_in_chromium_hover_shows_the_stored_value(executed, tmp_path) -> None:
    """The executed notebook as nbconvert exports it: both viewers run without console
    errors, and hovering cell (1, 2) of each shows that viewer's own stored weight."""
    nbconvert = pytest.importorskip("nbconvert")
    nb, folder = executed
    page, _ = nbconvert.HTMLExporter(template_name="lab").from_notebook_node(nb)
    i, j = 1, 2
    page = page.replace("</body>", HOVER.replace("ROW", str(i)).replace("COL", str(j)) + "</body>")
    out = tmp_path / "notebook.html"
    out.write_text(page, encoding="utf-8")
    res = _chromium(["--dump-dom"], out.as_uri(), tmp_path)
    assert console_messages(res.stderr) == [], res.stderr[-2000:]
    roots = re.findall(r'<div[^>]*id="(attnscope-[0-9a-f]+-)root"[^>]*data-ready="1"', res.stdout)
    assert len(roots) == 2, "both viewers ran to the end"
    assert page.count("viewer did not run") == 2 and "viewer did not run" not in res.stdout
    got = {}
    for p in roots:
        m = re.search(rf'<div[^>]*id="{p}hover"[^>]*>(.*?)</div>', res.stdout, re.S)
        weight = float(re.search(r'data-weight="([^"]+)"', m.group(0)).group(1))
        got[p] = (weight, re.search(r'data-cell="([^"]+)"', m.group(0)).group(1), m.group(1))
    with open_archive(folder / "notebook_run.zarr") as arc:
        enc = np.float16(arc["encoder/0/self_attention"][0]).astype(np.float64)  # (H, T, S)
        cross = np.float16(arc["decoder/0/cross_attention"][1, 1]).astype(np.float64)
    (w0, c0, t0), (w1, c1, t1) = got.values()  # page order: the array, then show()
    assert c0 == c1 == f"{i},{j}"
    assert w0 == pytest.approx(enc[:, i, j].mean(), rel=1e-9)  # mean of the heads
    assert w1 == pytest.approx(cross[i, j], rel=1e-9)  # sample 1, head 1
    assert 'query "text[1]" (#1)' in t0 and 'query "action[1]" (#1)' in t1
