"""`attnscope render` / `attnscope report` through click: refusals are one line, exit 1."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from attnscope.cli import cli
from attnscope.errors import StaleTableError
from attnscope.store.layout import TokenLayout

from .conftest import SMALL_LAYOUT, small_weights, write_archive


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Archives x and y (same content, two archives) and the tables of x."""
    import numpy as np

    from attnscope.analysis import analyze

    w = tmp_path_factory.mktemp("cli")
    write_archive(w / "x.zarr", small_weights(np.random.default_rng(0)), SMALL_LAYOUT)
    shutil.copytree(w / "x.zarr", w / "y.zarr")
    analyze(w / "x.zarr", w / "tx", topk=3, progress=False)
    enc_only = {"encoder": small_weights(np.random.default_rng(1))["encoder"]}
    write_archive(w / "enc.zarr", enc_only, TokenLayout(SMALL_LAYOUT.encoder, None))
    return w


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(res, *needles):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert res.output.count("\n") == 1, res.output
    for needle in needles:
        assert needle in res.output


def test_render_and_report_refuse_another_archives_tables(work, tmp_path):
    res = run("render", work / "y.zarr", "--out", tmp_path / "f", "--what", "tables",
              "--tables", work / "tx", "--no-progress")
    assert_one_line_error(res, "StaleTableError", "re-run attnscope analyze")
    res = run("report", work / "y.zarr", "--tables", work / "tx", "--out", tmp_path / "r.html")
    assert_one_line_error(res, "StaleTableError")
    assert list(tmp_path.iterdir()) == []


def test_library_refuses_another_archives_tables(work, tmp_path):
    from attnscope.render import render_archive
    from attnscope.render.report import write_report

    with pytest.raises(StaleTableError):
        render_archive(work / "y.zarr", tmp_path / "f", what=["tables"],
                       tables_dir=work / "tx", progress=False)
    with pytest.raises(StaleTableError):
        write_report(work / "y.zarr", tmp_path / "r.html", tables_dir=work / "tx")
    # the archive the tables were computed from is accepted
    assert write_report(work / "x.zarr", tmp_path / "r.html", tables_dir=work / "tx").exists()


@pytest.mark.parametrize("opt", ["--layers", "--heads", "--samples"])
def test_render_reversed_range_is_refused(work, tmp_path, opt):
    res = run("render", work / "x.zarr", "--out", tmp_path / "f", opt, "0,3-1", "--no-progress")
    assert_one_line_error(res, "'0,3-1'", "'3-1' is reversed", "expected integers like")
    assert not (tmp_path / "f").exists()


def test_render_forward_range_still_selects(work, tmp_path):
    res = run("render", work / "x.zarr", "--out", tmp_path / "f", "--layers", "1-2",
              "--what", "grid", "--no-progress")
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "f" / "grid").iterdir())
    assert len(names) == 6 and all("-L01-" in n or "-L02-" in n for n in names)


def test_render_selection_without_figures_is_an_error(work, tmp_path):
    res = run("render", work / "x.zarr", "--out", tmp_path / "f", "--heads", "", "--no-progress")
    assert_one_line_error(res, "heads selects nothing")
    # flow needs encoder self, decoder self and cross attention of one layer
    res = run("render", work / "enc.zarr", "--out", tmp_path / "f", "--what", "flow",
              "--no-progress")
    assert_one_line_error(res, "the selection gives no figures")
    assert not (tmp_path / "f").exists()


def test_render_tables_without_tables_says_so(work, tmp_path):
    res = run("render", work / "x.zarr", "--out", tmp_path / "f", "--what", "tables",
              "--no-progress")
    assert_one_line_error(res, "needs the analysis tables", "--tables", "attnscope analyze")
    assert not (tmp_path / "f").exists()


def test_render_default_draws_tables_only_with_tables(work, tmp_path):
    res = run("render", work / "x.zarr", "--out", tmp_path / "a", "--layers", "0",
              "--no-progress")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "a" / "tables").exists()
    res = run("render", work / "x.zarr", "--out", tmp_path / "b", "--layers", "0",
              "--tables", work / "tx", "--no-progress")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "b" / "tables").iterdir())) == 3 + 2 * 3


def test_render_out_is_an_existing_file(work, tmp_path):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"keep")
    res = run("render", work / "x.zarr", "--out", taken, "--no-progress")
    assert_one_line_error(res, "exists and is a file")
    assert taken.read_bytes() == b"keep" and sorted(tmp_path.iterdir()) == [taken]


@pytest.mark.parametrize("tables", [True, False])
def test_report_out_is_an_existing_folder(work, tmp_path, tables):
    taken = tmp_path / "existing_dir"
    taken.mkdir()
    args = ["--tables", work / "tx"] if tables else []
    res = run("report", work / "x.zarr", *args, "--out", taken)
    assert_one_line_error(res, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_dir"]  # no .partial
    assert list(taken.iterdir()) == []


def test_report_without_tables_analyses_into_a_temporary_folder(work, tmp_path):
    res = run("report", work / "x.zarr", "--out", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_render_heads_are_the_models_ids(kept_heads_archive, tmp_path):
    """Captured with heads 0 and 3: `--heads 3` draws model head 3 as h03 titled 'head 3';
    `--heads 1` (a position, not a head id) is refused in one line."""
    res = run("render", kept_heads_archive, "--out", tmp_path / "f", "--heads", "3",
              "--layers", "0", "--what", "heatmap", "--workers", "1")
    assert res.exit_code == 0, res.output
    made = sorted(p.name for p in (tmp_path / "f" / "heatmap").iterdir())
    assert made and all(n.endswith("-h03.png") for n in made)
    res = run("render", kept_heads_archive, "--out", tmp_path / "g", "--heads", "1")
    assert_one_line_error(res, "head 1 is not a stored head", "[0, 3]")
    assert not (tmp_path / "g").exists()


def test_report_opens_on_the_first_requested_sample(work, tmp_path):
    import json
    import re

    res = run("report", work / "x.zarr", "--out", tmp_path / "r.html", "--samples", "1")
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text()
    data = json.loads(re.search(r"id='attnscope-data'>(.*?)</script>", page, re.S).group(1))
    assert data["initial"]["sample"] == 1 and data["samples"] == [1]


def test_render_scale_is_checked(work, tmp_path):
    res = run("render", work / "x.zarr", "--out", tmp_path / "f", "--scale", "p200")
    assert_one_line_error(res, "scale must be 'max', 'row' or a percentile", "'p200'")
