"""store.writer: creating over existing paths, the chunk policy, recorded array list."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.errors import ConfigError
from attnscope.store import ArchiveSpec, ArchiveWriter, open_archive

from .store_testlib import DEC, ENC, H, make_batch


def test_overwrite_refuses_a_directory_that_is_not_an_archive(tmp_path, layout) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("important")
    with pytest.raises(ConfigError, match="not an attnscope archive"):
        ArchiveWriter.create(precious, layout, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "important"


def test_overwrite_refuses_a_foreign_h5_file(tmp_path, layout) -> None:
    foreign = tmp_path / "notes.h5"
    foreign.write_bytes(b"not hdf5")
    with pytest.raises(ConfigError, match="not an attnscope archive"):
        ArchiveWriter.create(foreign, layout, overwrite=True)
    assert foreign.read_bytes() == b"not hdf5"


def test_overwrite_replaces_an_archive(path, layout, rng) -> None:
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 3))
    with ArchiveWriter.create(path, layout, overwrite=True) as w:
        w.append(make_batch(rng, 2))
    with open_archive(path) as a:
        assert a.n_samples == 2


def test_already_exists_error_is_neutral_not_python_advice(path, layout) -> None:
    ArchiveWriter.create(path, layout).close()
    with pytest.raises(ConfigError) as e:
        ArchiveWriter.create(path, layout)
    msg = str(e.value)
    assert "already exists" in msg and "--overwrite" in msg and "--resume" in msg
    assert "overwrite=True" not in msg and "ArchiveWriter.open" not in msg
    assert "\n" not in msg


def test_hdf5_keeps_one_sample_per_chunk(tmp_path, layout, rng) -> None:
    path = tmp_path / "c.h5"
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 3))
    with open_archive(path) as a:
        assert all(a[n].chunks[0] == 1 for n in a.arrays)
    with pytest.warns(UserWarning, match="chunk_samples=4 ignored"):
        ArchiveWriter.create(tmp_path / "d.h5", layout, chunk_samples=4).close()


def test_batch_size_chunks_divide_the_batch_for_arrays_created_up_front(tmp_path, layout, rng):
    arrays = {"encoder/0/self_attention": (H, ENC, ENC)}
    spec = ArchiveSpec(batch_size=6, arrays=arrays)
    with ArchiveWriter.create(tmp_path / "a.zarr", layout, spec) as w:
        w.append({"encoder/0/self_attention": make_batch(rng, 6)["encoder/0/self_attention"]})
    with open_archive(tmp_path / "a.zarr") as a:
        cs = a["encoder/0/self_attention"].chunks[0]
    assert 6 % cs == 0 and cs > 1


def test_batch_size_chunks_also_for_arrays_created_on_first_append(tmp_path, layout, rng):
    # Without batch_size these tiny arrays get 256 samples per chunk.
    with ArchiveWriter.create(tmp_path / "plain.zarr", layout) as w:
        w.append(make_batch(rng, 6, layers=1))
    with ArchiveWriter.create(tmp_path / "b.zarr", layout, batch_size=6) as w:
        w.append(make_batch(rng, 6, layers=1))
    with open_archive(tmp_path / "plain.zarr") as a:
        assert a["decoder/0/cross_attention"].chunks[0] == 256
    with open_archive(tmp_path / "b.zarr") as a:
        assert a.metadata["batch_size"] == 6
        for name in a.arrays:
            assert 6 % a[name].chunks[0] == 0, name


def test_first_power_of_two_batch_sets_the_chunk_when_batch_size_is_unset(tmp_path, layout, rng):
    # A first batch of 4 stands in for batch_size: no chunk straddles two appends.
    with ArchiveWriter.create(tmp_path / "p.zarr", layout) as w:
        for _ in range(3):
            w.append(make_batch(rng, 4, layers=1))
    with open_archive(tmp_path / "p.zarr") as a:
        assert a.metadata["batch_size"] is None and a.n_samples == 12
        for name in a.arrays:
            assert a[name].chunks[0] == 4, name


def test_array_list_recorded_in_root_metadata(path, layout, rng) -> None:
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 2, layers=1))
    with open_archive(path) as a:
        assert a.metadata["arrays"] == a.arrays and len(a.arrays) == 3
        assert a.missing_arrays() == []


def test_unknown_option_lists_the_valid_ones(tmp_path, layout) -> None:
    with pytest.raises(ConfigError, match=r"unknown archive option\(s\) \['dtyp'\].*'dtype'"):
        ArchiveWriter.create(tmp_path / "x.zarr", layout, dtyp="float16")
    assert not (tmp_path / "x.zarr").exists()


def test_decoder_only_values_roundtrip(path, layout, rng) -> None:
    w = make_batch(rng, 3, layers=1)["decoder/0/self_attention"]
    with ArchiveWriter.create(path, layout) as wr:
        wr.append({"decoder/0/self_attention": w})
    with open_archive(path) as a:
        got = a["decoder/0/self_attention"][:]
    assert got.shape == (3, H, DEC, DEC)
    np.testing.assert_allclose(got, w, atol=2e-3)
