"""store.backends.location: a path or URL is resolved once at the door, and the rest of the
store asks the location (local path or URL), never the string."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from attnscope.errors import ConfigError
from attnscope.store import ArchiveWriter, info, open_archive, verify
from attnscope.store.backends import location
from attnscope.store.backends.location import LocalLocation, RemoteLocation, locate

from ..store_testlib import make_batch


def test_locate_resolves_paths_and_urls(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = locate("run.zarr")
    assert isinstance(loc, LocalLocation) and not loc.remote
    assert loc == os.path.join(str(tmp_path), "run.zarr") and loc.name == "run.zarr"
    assert locate(Path("run.zarr")) == loc
    assert locate(f"file://{tmp_path}/run.zarr") == loc  # file:// is a local path
    url = locate("S3://bucket/run.zarr/")
    assert isinstance(url, RemoteLocation) and url.remote
    assert url == "s3://bucket/run.zarr" and url.name == "run.zarr"  # scheme folded, no slash
    assert locate(url) is url and locate(loc) is loc  # resolved once: returned as is
    assert repr(url) == "'s3://bucket/run.zarr'"  # messages read as before
    assert pickle.loads(pickle.dumps(url)) == url  # to Dask workers and spawned ranks
    assert isinstance(pickle.loads(pickle.dumps(url)), RemoteLocation)


@pytest.mark.parametrize("bad, needle", [
    (3, "not a path or URL"),
    (b"run.zarr", "not a path or URL"),
    ("simplecache::s3://b/run.zarr", "chained fsspec URL"),
])  # fmt: skip
def test_locate_refuses_what_is_not_a_location(bad, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        locate(bad)


def test_hdf5_at_a_url_is_refused_before_any_request() -> None:
    with pytest.raises(ConfigError, match="HDF5 archives are local files only"):
        locate("s3://bucket/run.h5").refuse_hdf5("hdf5")
    locate("/tmp/run.h5").refuse_hdf5("hdf5")  # local: fine


def test_a_write_and_read_walk_resolves_the_path_once(path, layout, rng, monkeypatch) -> None:
    calls: list[object] = []
    real = location._resolve
    monkeypatch.setattr(location, "_resolve", lambda w: calls.append(w) or real(w))
    with ArchiveWriter.create(str(path), layout) as w:
        assert len(calls) == 1, calls
        w.append(make_batch(rng, 3))
    w = ArchiveWriter.open(str(path))
    w.append(make_batch(rng, 2))
    w.close()
    assert len(calls) == 2, calls
    with open_archive(str(path)) as a:
        assert a.n_samples == 5
    assert verify(str(path)).ok
    assert info(str(path))["n_samples"] == 5
    assert len(calls) == 5, calls  # one per entry point, whatever each does inside
