"""Analysis tables on object storage (``analysis/tables.py`` through ``analysis/_folder.py``):
``analyze(out="s3://…")`` on a local moto S3 server equals the local tables, the stale-table
checks hold for tables at a URL, a failed run leaves no partial object, and a missing
bucket or credentials are one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from analysis_helpers import build_archive, make_layout, make_weights

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3_testlib import moto_s3  # noqa: E402

from attnscope.analysis import analyze, load_table  # noqa: E402
from attnscope.analysis.tables import TABLES, table_exists  # noqa: E402
from attnscope.errors import (  # noqa: E402
    ArchiveNotFoundError,
    ConfigError,
    StaleTableError,
)
from attnscope.store.backends import remote  # noqa: E402


@pytest.fixture(scope="module")
def s3() -> Any:
    with moto_s3() as s:
        yield s


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "a.zarr"
    build_archive(path, make_weights(seed=1), make_layout()).close()
    return path


def test_tables_at_an_s3_url_equal_local_and_are_checked_against_their_archive(
    s3, archive, tmp_path
) -> None:
    local = analyze(archive, tmp_path / "t", progress=False)
    url = s3.url("tables")
    got = analyze(archive, url, progress=False)
    assert {k: str(v) for k, v in got.items()} == {
        k: f"{url}/{Path(v).name}" for k, v in local.items()
    }
    # final names only: no partial object left behind
    assert sorted(remote.keys(url)) == sorted(Path(v).name for v in local.values())
    for name in TABLES:
        want = pd.read_parquet(local[name])
        pd.testing.assert_frame_equal(load_table(url, name, archive=archive), want)
        assert table_exists(url, f"{name}.parquet")
    fs, root = remote.filesystem(url)
    for doc in ("manifest", "statistics"):
        assert json.loads(fs.cat_file(f"{root}/{Path(local[doc]).name}")) == json.loads(
            Path(local[doc]).read_text()
        )
    # the same stale check as local tables: another archive's tables are refused
    other = tmp_path / "b.zarr"
    build_archive(other, make_weights(seed=2), make_layout()).close()
    with pytest.raises(StaleTableError, match="is stale") as e:
        load_table(url, "head_stats", archive=other)
    assert "\n" not in str(e.value) and url in str(e.value)
    # an S3 archive's tables at an S3 URL: the archive URL is their identity
    arc_url = s3.url("a.zarr")
    build_archive(arc_url, make_weights(seed=1), make_layout()).close()
    tabs = s3.url("tables-of-s3")
    analyze(arc_url, tabs, progress=False)
    df = load_table(tabs, "head_stats", archive=arc_url)
    pd.testing.assert_frame_equal(
        df.drop(columns=["archive_fingerprint"]),
        pd.read_parquet(local["head_stats"]).drop(columns=["archive_fingerprint"]),
    )
    with pytest.raises(StaleTableError):
        load_table(tabs, "head_stats", archive=archive)  # a local archive is another one


def test_failed_analyze_to_s3_leaves_no_partial_object(s3, archive, monkeypatch) -> None:
    url = s3.url("tables")
    real_close = pq.ParquetWriter.close

    def close(self: Any) -> None:  # the store fails while the tables are finished
        real_close(self)
        raise OSError("connection reset")

    monkeypatch.setattr(pq.ParquetWriter, "close", close)
    with pytest.raises(OSError, match="connection reset"):
        analyze(archive, url, progress=False)
    assert remote.keys(url) == []


def test_tables_url_errors_are_one_line(s3, archive, monkeypatch) -> None:
    with pytest.raises(ArchiveNotFoundError, match="bucket 'attnscope-no-bucket'") as e:
        analyze(archive, "s3://attnscope-no-bucket/tables", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no table"):
        load_table(s3.url("none"), "head_stats")
    with pytest.raises(ConfigError, match="chained fsspec URL"):
        analyze(archive, "simplecache::s3://attnscope-test/tables", progress=False)
    # a folder that is an object
    url = s3.url("file")
    s3.fs().pipe_file(url, b"x")
    with pytest.raises(ConfigError, match="is an object; expected a folder"):
        analyze(archive, url, progress=False)


def _moto_auth(s3, value: bytes) -> None:
    """Turn moto's credential checks on (``b"0"``: from the next request, and the test's
    keys are unknown to it, as keys that expired) or off (``b"inf"``)."""
    import urllib.request

    req = urllib.request.Request(f"{s3.endpoint}/moto-api/reset-auth", data=value,
                                 method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).close()


def test_credentials_refused_mid_analysis_are_one_line_and_a_rerun_completes(
    s3, archive, tmp_path, monkeypatch
) -> None:
    from attnscope.analysis.tables import TableWriter

    url = s3.url("tables")
    real_write = TableWriter.write

    def write(self: Any, *a: Any, **k: Any) -> None:
        real_write(self, *a, **k)
        _moto_auth(s3, b"0")  # the credentials stop working after the first block

    monkeypatch.setattr(TableWriter, "write", write)
    try:
        with pytest.raises(ConfigError, match=f"access to '{url}' denied") as e:
            analyze(archive, url, progress=False, block_bytes=1)
    finally:
        _moto_auth(s3, b"inf")
    assert "\n" not in str(e.value)
    assert not [k for k in remote.keys(url) if k.endswith(".parquet")]  # no table looks done
    monkeypatch.setattr(TableWriter, "write", real_write)
    got = analyze(archive, url, progress=False)  # once renewed, a rerun writes every table
    local = analyze(archive, tmp_path / "t", progress=False)
    for name in TABLES:
        pd.testing.assert_frame_equal(load_table(url, name, archive=archive),
                                      pd.read_parquet(local[name]))  # fmt: skip
    assert str(got["manifest"]) == f"{url}/manifest.json"
