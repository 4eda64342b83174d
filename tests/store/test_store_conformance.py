"""Conformance suite: every behaviour of the archive, run for Zarr and HDF5 alike."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from attnscope.errors import (
    ArchiveError,
    ArchiveLockedError,
    AttnscopeError,
    ConfigError,
    InputError,
    SelectionError,
    ShapeError,
    ValidationError,
)
from attnscope.store import (
    ArchiveWriter,
    array_name,
    format_info,
    info,
    open_archive,
    parse_array_name,
    verify,
)

from .store_testlib import DEC, ENC, H, concat, make_batch, nested, softmax

ATOL = {"float16": 1e-3, "float32": 1e-7, "bfloat16": 4e-3}


def write(path, layout, batches, **kw):
    with ArchiveWriter.create(path, layout, **kw) as w:
        for b in batches:
            w.append(b)
    flat = all(isinstance(v, np.ndarray) for b in batches for v in b.values())
    return concat(batches) if flat else None


# -- round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_roundtrip_equals_input_within_stored_precision(path, layout, rng, dtype, fmt):
    batches = [make_batch(rng, 3), make_batch(rng, 2)]
    write(path, layout, [nested(batches[0]), batches[1]], dtype=dtype)
    ref = concat(batches)
    with open_archive(path) as a:
        assert a.format == fmt
        assert a.n_samples == 5 and a.dtype == dtype and a.schema_version == 1  # not ragged: v1
        assert a.arrays == [
            f"{s}/{i}/{k}"
            for s, kinds in (
                ("encoder", ["self_attention"]),
                ("decoder", ["self_attention", "cross_attention"]),
            )
            for i in range(2)
            for k in kinds
        ]
        for name, want in ref.items():
            got = a[name][:]
            assert got.shape == want.shape == a[name].shape
            assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
            np.testing.assert_allclose(got.astype(np.float32), want, atol=ATOL[dtype], rtol=0)


def test_roundtrip_metadata_layout_and_heads(path, layout, rng):
    b = make_batch(rng, 2, layers=1)
    heads = {"encoder/0/self_attention": [0, 2, 5, 7]}
    write(
        path,
        layout,
        [b],
        model_config={"d_model": 32},
        capture={"every": 1},
        heads=heads,
        tags={"run": "x"},
        seed=7,
    )
    with open_archive(path) as a:
        assert a.layout == layout
        assert a.metadata["model_config"] == {"d_model": 32}
        assert a.metadata["capture"] == {"every": 1}
        assert a.metadata["provenance"]["seed"] == 7
        assert a.metadata["provenance"]["tags"] == {"run": "x"}
        assert a.metadata["n_samples"] == 2
        assert a.heads["encoder", 0, "self_attention"] == (0, 2, 5, 7)
        assert a.heads["decoder/0/cross_attention"] == tuple(range(H))
        assert a.layers["decoder"] == (0,)
        assert a.kinds["decoder", 0] == ("self_attention", "cross_attention")
        json.dumps(a.metadata)  # JSON-able throughout
        ident = a.identity()
        assert ident["n_samples"] == 2 and len(ident["fingerprint"]) == 16


def test_torch_tensors_accepted_including_bfloat16(path, layout, rng):
    torch = pytest.importorskip("torch")
    b = make_batch(rng, 2, layers=1)
    tb = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in b.items()}
    with ArchiveWriter.create(path, layout) as w:
        w.append(tb)
    with open_archive(path) as a:
        for k, v in b.items():
            np.testing.assert_allclose(a[k][:].astype(np.float32), v, atol=1e-2)


def test_append_across_reopen_keeps_earlier_samples(path, layout, rng):
    b1, b2, b3 = make_batch(rng, 2), make_batch(rng, 3), make_batch(rng, 1)
    with ArchiveWriter.create(path, layout) as w:
        assert w.append(b1, sample_ids={"episode": np.array([0, 0]), "step": np.array([0, 1])}) == 2
    for b, ep in ((b2, 1), (b3, 2)):
        with ArchiveWriter.open(path, mode="a") as w:
            before = w.committed
            n = len(b["encoder/0/self_attention"])
            ids = {"episode": np.full(n, ep), "step": np.arange(n)}
            assert w.append(b, sample_ids=ids) == before + n
    ref = concat([b1, b2, b3])
    with open_archive(path) as a:
        assert a.n_samples == 6
        for k, v in ref.items():
            np.testing.assert_allclose(a[k][:].astype(np.float32), v, atol=1e-3)
        np.testing.assert_array_equal(a.sample_ids["episode"], [0, 0, 1, 1, 1, 2])
        np.testing.assert_array_equal(a.sample_ids["step"], [0, 1, 0, 1, 2, 0])


def test_fingerprint_changes_when_samples_are_committed(path, layout, rng):
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 1))
    with open_archive(path) as a:
        f1 = a.identity()["fingerprint"]
    with ArchiveWriter.open(path) as w:
        w.append(make_batch(rng, 1))
    with open_archive(path) as a:
        assert a.identity()["fingerprint"] != f1


# -- lazy selection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        (1, 2),
        (slice(None), 0),
        (-1,),
        (slice(1, 4), slice(0, 4, 2), slice(2, 7)),
        (Ellipsis, 3),
        (0, 1, slice(None, None, -1)),
        (slice(3, 3),),
        (2, 3, 4, 5),
    ],
)
def test_basic_indexing_matches_numpy(path, layout, rng, key):
    ref = write(path, layout, [make_batch(rng, 5, layers=1)], dtype="float32")
    with open_archive(path) as a:
        want = ref["encoder/0/self_attention"][key]
        got = a.attention("encoder", 0, "self_attention")[key]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-7)


def test_selection_errors_name_the_dimension(path, layout, rng):
    write(path, layout, [make_batch(rng, 2, layers=1)])
    with open_archive(path) as a:
        arr = a["encoder/0/self_attention"]
        with pytest.raises(SelectionError, match="sample index 2 out of range"):
            arr[2]
        with pytest.raises(SelectionError, match="head index"):
            arr[0, 9]
        with pytest.raises(SelectionError, match="basic indexing"):
            arr[[0, 1]]
        with pytest.raises(SelectionError, match="no array 'encoder/5/self_attention'"):
            a.attention("encoder", 5, "self_attention")


def test_iter_blocks_covers_all_samples_chunk_aligned(path, fmt, layout, rng):
    cs = 2 if fmt == "zarr" else 1  # HDF5 keeps one sample per chunk
    ref = write(path, layout, [make_batch(rng, 7, layers=1)], chunk_samples=cs)
    with open_archive(path) as a:
        arr = a["decoder/0/cross_attention"]
        assert arr.chunks[0] == cs
        seen = []
        for sl, block in arr.iter_blocks(max_bytes=1):
            assert sl.start % cs == 0 and block.shape == (sl.stop - sl.start, H, DEC, ENC)
            seen.append(block)
        np.testing.assert_allclose(
            np.concatenate(seen).astype(np.float32), ref["decoder/0/cross_attention"], atol=1e-3
        )


def test_to_dask_and_to_xarray(path, layout, rng):
    ref = write(path, layout, [make_batch(rng, 3, layers=2)], dtype="float32")
    with open_archive(path) as a:
        d = a.to_dask("decoder/0/cross_attention")
        np.testing.assert_allclose(d.compute(), ref["decoder/0/cross_attention"])
        np.testing.assert_allclose(a.to_dask(("decoder", 1, "cross")).compute(),
                                   ref["decoder/1/cross_attention"])
        ds = a.to_xarray("decoder", "cross_attention")
        assert ds.attention.dims == ("layer", "sample", "head", "query", "key")
        assert ds.attrs["query_side"] == "decoder" and ds.attrs["key_side"] == "encoder"
        assert ds["key_token"].values.tolist() == [list(layout.encoder.labels)] * 3
        assert list(ds.coords["query_segment"].values) == ["action"] * DEC
        for layer in (0, 1):
            np.testing.assert_allclose(ds.attention.sel(layer=layer).isel(head=1).values,
                                       ref[f"decoder/{layer}/cross_attention"][:, 1])


# -- sparse ------------------------------------------------------------------------------


def test_sparse_topk_keeps_largest_weights(path, layout, rng):
    b = make_batch(rng, 3, layers=1)
    write(path, layout, [b], sparse_topk=3, dtype="float32")
    with open_archive(path) as a:
        assert a.mode == "sparse" and a.topk == 3
        for name, w in b.items():
            s = w.shape[-1]
            k = min(3, s)
            got = a[name][:]
            thresh = np.sort(w, axis=-1)[..., s - k][..., None]
            want = np.where(w >= thresh, w, 0)
            np.testing.assert_allclose(got, want, atol=1e-6)
            v, i, r = a[name].topk_arrays(slice(None))
            assert v.shape == (3, H, w.shape[2], 3)
            assert i.dtype == np.int16
            np.testing.assert_allclose(r, 1 - want.sum(-1), atol=1e-5)
            np.testing.assert_allclose(a[name][1, 2, :, 1:3], want[1, 2, :, 1:3], atol=1e-6)
        assert verify(path).ok


def test_sparse_accepts_precomputed_topk(path, layout, rng):
    w = softmax(rng, (2, H, ENC, ENC))
    idx = np.argsort(w, axis=-1)[..., -2:]
    vals = np.take_along_axis(w, idx, -1)
    write(
        path,
        layout,
        [{"encoder/0/self_attention": {"values": vals, "indices": idx}}],
        sparse_topk=2,
        dtype="float32",
    )
    with open_archive(path) as a:
        got = a["encoder/0/self_attention"][:]
        want = np.zeros_like(w)
        np.put_along_axis(want, idx, vals, -1)
        np.testing.assert_allclose(got, want, atol=1e-7)


# -- writer lifecycle and locking --------------------------------------------------------


def test_close_is_idempotent_and_append_after_close_fails(path, layout, rng):
    w = ArchiveWriter.create(path, layout)
    w.append(make_batch(rng, 1))
    w.close()
    w.close()
    with pytest.raises(ArchiveError, match="closed"):
        w.append(make_batch(rng, 1))


def test_create_refuses_existing_without_overwrite(path, layout, rng):
    write(path, layout, [make_batch(rng, 1)])
    with pytest.raises(ConfigError, match="already exists"):
        ArchiveWriter.create(path, layout)
    write(path, layout, [make_batch(rng, 2)], overwrite=True)
    with open_archive(path) as a:
        assert a.n_samples == 2


def test_second_writer_is_refused_until_first_closes(path, layout, rng):
    w = ArchiveWriter.create(path, layout)
    w.append(make_batch(rng, 1))
    with pytest.raises(ArchiveLockedError, match=f"pid {os.getpid()}"):
        ArchiveWriter.open(path)
    with pytest.raises(ArchiveLockedError):
        ArchiveWriter.create(path, layout, overwrite=True)
    with open_archive(path) as a:  # readers are never blocked
        assert a.n_samples == 1
    w.close()
    with ArchiveWriter.open(path) as w2:
        assert w2.committed == 1


def test_stale_lock_of_dead_process_is_broken(path, layout, rng, fmt):
    import subprocess
    import sys

    write(path, layout, [make_batch(rng, 1)])
    code = (
        "import sys; from attnscope.store import ArchiveWriter; "
        "w = ArchiveWriter.open(sys.argv[1]); import os; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, path], check=True)
    with ArchiveWriter.open(path) as w:  # the dead writer's lock does not block us
        assert w.committed == 1


# -- bad input ---------------------------------------------------------------------------


def _bad_cases(rng):
    good = make_batch(rng, 2, layers=1)

    def with_(name, w):
        b = dict(good)
        b[name] = w
        return b

    nan = good["encoder/0/self_attention"].copy()
    nan[1, 2, 3, 4] = np.nan
    inf = good["encoder/0/self_attention"].copy()
    inf[0, 1, 2, 3] = np.inf
    neg = good["decoder/0/cross_attention"].copy()
    neg[1, 0, 1, 0] = -0.1
    off = good["decoder/0/self_attention"].copy()
    off[0, 3, 2] *= 1.5
    return [
        (
            with_("encoder/0/self_attention", softmax(rng, (2, H + 1, ENC, ENC))),
            ShapeError,
            r"encoder/0/self_attention.*\(\*, 5, 9, 9\).*\(\*, 4, 9, 9\)",
        ),
        (
            with_("decoder/0/cross_attention", softmax(rng, (2, H, DEC, ENC + 1))),
            ShapeError,
            r"decoder/0/cross_attention.*\(\*, 4, 4, 10\).*\(\*, 4, 4, 9\)",
        ),
        (
            with_("decoder/0/self_attention", softmax(rng, (3, H, DEC, DEC))),
            ShapeError,
            "batch size",
        ),
        (
            {**good, "encoder/1/self_attention": good["encoder/0/self_attention"]},
            ShapeError,
            r"unexpected: \['encoder/1/self_attention'\]",
        ),
        (
            {k: v for k, v in good.items() if k != "decoder/0/cross_attention"},
            ShapeError,
            r"missing: \['decoder/0/cross_attention'\]",
        ),
        (
            with_("encoder/0/self_attention", np.ones((2, H, ENC, ENC), np.int64)),
            InputError,
            "floating-point",
        ),
        (
            with_("encoder/0/self_attention", nan),
            ValidationError,
            "encoder/0/self_attention: NaN weight at sample 3, head 2, query row 3",
        ),
        (
            with_("encoder/0/self_attention", inf),
            ValidationError,
            "encoder/0/self_attention: Inf weight at sample 2, head 1, query row 2",
        ),
        (
            with_("decoder/0/cross_attention", neg),
            ValidationError,
            "decoder/0/cross_attention: negative weight at sample 3, head 0, query row 1",
        ),
        (
            with_("decoder/0/self_attention", off),
            ValidationError,
            "decoder/0/self_attention: row at sample 2, head 3, query row 2 sums to 1.5",
        ),
        (with_("encoder/0/self_attention", [[0.5]]), InputError, "numpy array or torch"),
        ({"encoder/0/bogus": good["encoder/0/self_attention"]}, SelectionError, "bad array name"),
        ({"encoder/0/self_attention": good["encoder/0/self_attention"][0]}, ShapeError, "4-d"),
    ]


def test_bad_inputs_raise_clearly_and_keep_committed(path, layout, rng):
    first = make_batch(rng, 2, layers=1)
    with ArchiveWriter.create(path, layout) as w:
        w.append(first)
        for batch, exc, pattern in _bad_cases(rng):
            with pytest.raises(exc, match=pattern):
                w.append(batch)
            assert w.committed == 2
    with open_archive(path) as a:
        assert a.n_samples == 2
        for k, v in first.items():
            np.testing.assert_allclose(a[k][:].astype(np.float32), v, atol=1e-3)
    assert verify(path).ok


def test_first_append_must_match_layout(path, layout, rng):
    with ArchiveWriter.create(path, layout) as w:
        with pytest.raises(ShapeError, match=r"cross_attention: S \(key\) length 10.*9 tokens"):
            w.append({"decoder/0/cross_attention": softmax(rng, (1, H, DEC, ENC + 1))})
        assert w.committed == 0


def test_validate_false_stores_unnormalised_rows(path, layout, rng):
    w = np.full((1, H, ENC, ENC), 0.5, np.float32)
    write(path, layout, [{"encoder/0/self_attention": w}], validate=False)
    with open_archive(path) as a:
        np.testing.assert_array_equal(a["encoder/0/self_attention"][:], w)
    rep = verify(path)
    assert rep.ok and "validate=False" in rep.notes[0]


def test_bad_create_options_list_valid_choices(path, layout):
    with pytest.raises(ConfigError, match="expected one of"):
        ArchiveWriter.create(path, layout, dtype="int8")
    with pytest.raises(ConfigError, match="expected one of"):
        ArchiveWriter.create(path, layout, compressor="gzip9")
    with pytest.raises(InputError, match="JSON"):
        ArchiveWriter.create(path, layout, model_config={"f": object()})
    assert not os.path.exists(path) or os.path.isdir(path)


def test_array_names_roundtrip():
    assert array_name("decoder", 2, "cross_attention") == "decoder/2/cross_attention"
    assert parse_array_name("decoder/2/cross_attention") == ("decoder", 2, "cross_attention")
    with pytest.raises(SelectionError, match="expected one of"):
        array_name("encoder", 0, "cross_attention")
    with pytest.raises(SelectionError, match="bad array name"):
        parse_array_name("encoder/x/self_attention")


# -- info --------------------------------------------------------------------------------


def test_info_is_json_and_formats(path, layout, rng, fmt):
    write(path, layout, [make_batch(rng, 2)], tags={"who": "me"})
    d = info(path)
    json.dumps(d)
    assert d["format"] == fmt and d["n_samples"] == 2 and len(d["arrays"]) == 6
    assert d["arrays"][0]["shape"] == [2, H, ENC, ENC]
    text = format_info(d)
    assert "encoder/0/self_attention" in text and "2 committed" in text


def test_errors_are_attnscope_errors():
    assert issubclass(ArchiveLockedError, AttnscopeError)
