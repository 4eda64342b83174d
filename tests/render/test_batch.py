import json

import pytest

from attnscope.errors import ConfigError, SelectionError
from attnscope.render import render_archive


def names(paths, root):
    return sorted(str(p.relative_to(root)) for p in paths)


def test_batch_writes_documented_files(small_archive, tmp_path):
    out = tmp_path / "figs"
    paths = render_archive(small_archive, out, layers=[0], heads=[None, 3], samples=[1],
                           progress=False)
    assert names(paths, out) == [
        "flow/L00-s0001-h03.png",
        "flow/L00-s0001-havg.png",
        "grid/decoder-L00-cross_attention-s0001.png",
        "grid/decoder-L00-self_attention-s0001.png",
        "grid/encoder-L00-self_attention-s0001.png",
        "heatmap/decoder-L00-cross_attention-s0001-h03.png",
        "heatmap/decoder-L00-cross_attention-s0001-havg.png",
        "heatmap/decoder-L00-self_attention-s0001-h03.png",
        "heatmap/decoder-L00-self_attention-s0001-havg.png",
        "heatmap/encoder-L00-self_attention-s0001-h03.png",
        "heatmap/encoder-L00-self_attention-s0001-havg.png",
        "layers/decoder-cross_attention-s0001-h03.png",
        "layers/decoder-cross_attention-s0001-havg.png",
        "layers/decoder-self_attention-s0001-h03.png",
        "layers/decoder-self_attention-s0001-havg.png",
        "layers/encoder-self_attention-s0001-h03.png",
        "layers/encoder-self_attention-s0001-havg.png",
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    manifest = json.loads((out / "manifest.json").read_text())
    name = "heatmap/encoder-L00-self_attention-s0001-h03.png"
    entry = next(f for f in manifest["files"] if f["file"] == name)
    assert entry == {"file": entry["file"], "what": "heatmap", "stack": "encoder", "layer": 0,
                     "kind": "self_attention", "sample": 1, "head": 3}
    assert manifest["archive"]["archive"] == "fake.zarr"


def test_batch_is_byte_identical_across_runs(small_archive, tmp_path):
    kw = dict(layers=[1], kinds=["cross_attention"], what=["heatmap", "grid"], progress=False)
    a = render_archive(small_archive, tmp_path / "a", **kw)
    b = render_archive(small_archive, tmp_path / "b", **kw)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    manifests = [(tmp_path / d / "manifest.json").read_bytes() for d in "ab"]
    assert manifests[0] == manifests[1]


def test_batch_svg(small_archive, tmp_path):
    paths = render_archive(small_archive, tmp_path, layers=[2], stacks=["encoder"],
                           what=["heatmap"], fmt="svg", progress=False)
    assert names(paths, tmp_path) == ["heatmap/encoder-L02-self_attention-s0000-havg.svg"]


@pytest.mark.parametrize(
    "kw, err, needle",
    [
        (dict(heads=[9]), SelectionError, r"head 9 out of range.*0\.\.3"),
        (dict(kinds=["bogus"]), SelectionError, "kind 'bogus' does not exist"),
        (dict(samples=[2]), SelectionError, r"sample 2 out of range.*0\.\.1"),
        (dict(layers=[5]), SelectionError, "layer 5 does not exist"),
        (dict(what=["pie"]), ConfigError, "unknown figure type 'pie'"),
        (dict(fmt="jpg"), ConfigError, "unsupported figure format 'jpg'"),
    ],
)
def test_batch_bad_selection(small_archive, tmp_path, kw, err, needle):
    with pytest.raises(err, match=needle):
        render_archive(small_archive, tmp_path, progress=False, **kw)
    assert not list(tmp_path.rglob("*.png"))


def test_batch_tables(small_archive, tmp_path, rng):
    import pandas as pd

    tdir = tmp_path / "tables_in"
    tdir.mkdir()
    pd.DataFrame([dict(stack="encoder", layer=lyr, kind="self_attention", sample=0, head=h,
                       entropy_mean=float(rng.random())) for lyr in range(3) for h in range(8)]
                 ).to_parquet(tdir / "head_stats.parquet")
    paths = render_archive(small_archive, tmp_path / "out", stacks=["encoder"], what=["tables"],
                           tables_dir=tdir, progress=False)
    assert names(paths, tmp_path / "out") == ["tables/entropy-encoder-self_attention.png"]
