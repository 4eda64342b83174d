"""Archive views and keys (store/catalog.py): ``archive.arrays/layers/kinds/heads`` and
``archive[stack, layer[, kind]]``, the deprecated call forms, and the errors of bad keys."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.errors import AttnscopeError, SelectionError
from attnscope.store import ArchiveWriter, open_archive

from .store_testlib import H, make_batch

HEADS = {"decoder/1/cross_attention": [1, 3]}


@pytest.fixture
def arc(tmp_path, layout, rng):
    """Encoder-decoder archive, 2 layers; decoder layer 1's cross-attention keeps heads 1, 3."""
    b = make_batch(rng, 2, layers=2)
    b["decoder/1/cross_attention"] = b["decoder/1/cross_attention"][:, [1, 3]]
    del b["encoder/1/self_attention"]  # encoder: layer 0 only
    path = tmp_path / "run.zarr"
    with ArchiveWriter.create(path, layout, dtype="float32", heads=HEADS) as w:
        w.append(b)
    with open_archive(path) as a:
        yield a, b


def test_views_read_as_a_user_guesses(arc):
    a, ref = arc
    assert a.arrays[0] == "encoder/0/self_attention" and len(a.arrays) == 5
    assert list(a.arrays) == a.arrays == [
        "encoder/0/self_attention",
        "decoder/0/self_attention",
        "decoder/0/cross_attention",
        "decoder/1/self_attention",
        "decoder/1/cross_attention",
    ]
    assert set(a.arrays) == set(ref)
    assert a.layers["encoder"] == (0,) and a.layers["decoder"] == (0, 1)
    assert dict(a.layers) == {"encoder": (0,), "decoder": (0, 1)}
    assert a.layers.get("nope", ()) == () and "decoder" in a.layers
    assert a.kinds["decoder", 1] == ("self_attention", "cross_attention")
    assert a.heads["decoder/1/cross_attention"] == (1, 3) == a.heads["decoder", 1, "cross"]
    assert a.heads["encoder", 0] == tuple(range(H))
    assert dict(a.heads) == {n: (1, 3) if n in HEADS else tuple(range(H)) for n in a.arrays}
    assert list(a) == list(a.arrays)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("decoder/1/self_attention", "decoder/1/self_attention"),
        (("encoder", 0), "encoder/0/self_attention"),  # one kind: it defaults
        (("decoder", 1, "cross"), "decoder/1/cross_attention"),
        (("decoder", np.int64(0), "self_attention"), "decoder/0/self_attention"),
        ("encoder", "encoder/0/self_attention"),  # a stack of one array
    ],
)
def test_archive_keys(arc, key, name):
    a, ref = arc
    got = a[key]
    assert got.name == name and key in a
    np.testing.assert_array_equal(got[...], ref[name])
    if isinstance(key, tuple):  # attention() takes the same key, spread out
        assert a.attention(*key).name == name


@pytest.mark.parametrize(
    ("key", "match"),
    [
        (("decoder", 1), r"ambiguous: it matches \['decoder/1/self_attention', "
                         r"'decoder/1/cross_attention'\]"),
        ("decoder", "ambiguous"),
        (("encoder", 1), r"no encoder layer 1 .* encoder layers stored: \[0\]"),
        (("decoder", -1), r"not positions: the last is archive.layers\['decoder'\]\[-1\]"),
        (("encoder", 0, "cross"), r"no 'cross_attention' .* holds \['self_attention'\]"),
        (("middle", 0), r"unknown stack 'middle'; expected one of \('encoder', 'decoder'\)"),
        (("encoder", "0"), "layer must be an int layer number, got '0'"),
        ("encoder/7/self_attention", r"no array 'encoder/7/self_attention'; the archive holds"),
        (0, r"bad archive key 0; expected an array name"),
        (("encoder", 0, "self", 1), "bad archive key"),
    ],
)
def test_bad_keys_name_the_key_and_the_choices(arc, key, match):
    a, _ = arc
    with pytest.raises(SelectionError, match=match):
        a[key]
    assert key not in a


def test_bad_view_keys_are_attnscope_errors(arc):
    a, _ = arc
    for view, key, match in [
        (a.heads, 0, r"keyed by array, not by position .* archive.heads\['encoder/0/"),
        (a.layers, 0, r"keyed by stack; no stack 0 .* holds \['encoder', 'decoder'\]"),
        (a.kinds, "decoder", r"keyed by \(stack, layer\)"),
        (a.arrays, "encoder/0/self_attention", r"index the archive itself"),
    ]:
        with pytest.raises(SelectionError, match=match) as e:
            view[key]
        assert isinstance(e.value, AttnscopeError) and "\n" not in str(e.value)


def test_call_forms_still_work_and_warn(arc):
    a, _ = arc
    with pytest.warns(DeprecationWarning, match=r"archive.arrays\(\) is deprecated"):
        assert a.arrays() == list(a.arrays)
    with pytest.warns(DeprecationWarning, match=r"use archive.layers\['decoder'\]"):
        assert a.layers("decoder") == [0, 1]
    with pytest.warns(DeprecationWarning):
        assert a.kinds("decoder", 0) == ["self_attention", "cross_attention"]
    with pytest.warns(DeprecationWarning):
        assert a.heads("decoder", 1, "cross_attention") == [1, 3]
    with pytest.warns(DeprecationWarning):
        assert a.heads("decoder/1/cross_attention") == [1, 3]
    with pytest.warns(DeprecationWarning), pytest.raises(SelectionError, match="unknown stack"):
        a.layers("middle")


def test_a_foreign_node_leaves_the_views_readable(arc):
    """A node that is no attnscope array (damage) is listed, refused when opened, and
    leaves the other views and keys working."""
    import zarr

    a, _ = arc
    zarr.open_group(a.path, mode="r+").create_group("encoder/extra").create_array(
        "foo", shape=(1,), dtype="f4")
    with open_archive(a.path) as b:
        assert "encoder/extra/foo" in b.arrays
        assert b.layers["encoder"] == (0,) and b["encoder", 0].name == "encoder/0/self_attention"
        assert ("encoder", 0, "self") in b and dict(b.kinds)[("encoder", 0)] == ("self_attention",)
        with pytest.raises(SelectionError, match="bad array name"):
            b["encoder/extra/foo"]
