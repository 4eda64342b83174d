import numpy as np
import pytest

from attnscope.errors import SelectionError, ShapeError
from attnscope.render._prepare import block_reduce, prepare_matrix, select_matrix
from attnscope.store.layout import SideLayout


def test_select_one_head_and_mean(rng):
    x = rng.random((3, 4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(select_matrix(x, head_idx=2, batch_idx=1), x[1, 2])
    np.testing.assert_allclose(select_matrix(x, head_idx=None, batch_idx=2), x[2].mean(0),
                               rtol=1e-6)


def test_select_accepts_3d_and_2d(rng):
    x = rng.random((4, 5, 5))
    np.testing.assert_allclose(select_matrix(x, head_idx=1), x[1])
    np.testing.assert_allclose(select_matrix(x[0]), x[0])


def test_torch_like_objects_are_duck_typed(rng):
    x = rng.random((1, 2, 3, 3)).astype(np.float32)

    class Tensor:  # the .detach().cpu().float().numpy() chain, without torch
        shape = x.shape

        def detach(self):
            return self

        def cpu(self):
            return self

        def float(self):
            return self

        def numpy(self):
            return x

    np.testing.assert_array_equal(select_matrix(Tensor(), head_idx=1), x[0, 1])


@pytest.mark.parametrize(
    "kw, needle",
    [({"head_idx": 8}, "head_idx 8 out of range"), ({"batch_idx": 2}, "batch_idx 2 out of range"),
     ({"head_idx": -1}, "0..7")],
)
def test_bad_selection_names_value_and_range(kw, needle):
    with pytest.raises(SelectionError, match=needle):
        select_matrix(np.zeros((2, 8, 3, 3)), **kw)


def test_wrong_rank_is_a_shape_error():
    with pytest.raises(ShapeError, match=r"got shape \(2, 3, 4, 5, 6\)"):
        select_matrix(np.zeros((2, 3, 4, 5, 6)))


def test_block_max_and_mean():
    m = np.arange(36, dtype=np.float32).reshape(6, 6)
    out, fr, fc = block_reduce(m, max_pixels=3, how="max")
    assert (fr, fc) == (2, 2)
    np.testing.assert_array_equal(out, m.reshape(3, 2, 3, 2).max(axis=(1, 3)))
    out, _, _ = block_reduce(m, max_pixels=3, how="mean")
    np.testing.assert_allclose(out, m.reshape(3, 2, 3, 2).mean(axis=(1, 3)))


def test_block_reduce_ragged_last_block_keeps_sharp_key():
    m = np.zeros((5, 7), dtype=np.float32)
    m[4, 6] = 1.0
    out, fr, fc = block_reduce(m, max_pixels=2, how="max")
    assert out.shape == (2, 2) and (fr, fc) == (3, 4)
    assert out[1, 1] == 1.0 and out.sum() == 1.0


def test_small_matrix_not_reduced():
    m = np.ones((4, 4), dtype=np.float32)
    out, fr, fc = block_reduce(m, max_pixels=4)
    assert out is m and fr == fc == 1


def test_layout_length_must_match():
    lay = SideLayout.from_lengths({"a": 2, "b": 2})
    with pytest.raises(ShapeError, match="covers 4 tokens but the matrix has 5"):
        prepare_matrix(np.zeros((5, 5)), query_layout=lay)


def test_axis_spec_labels_short_and_segments_long():
    short = SideLayout.from_lengths({"text": 3, "img": 2})
    p = prepare_matrix(np.zeros((5, 5)), query_layout=short, key_layout=short)
    assert p.cols.labels == ("text[0]", "text[1]", "text[2]", "img[0]", "img[1]")
    assert p.cols.boundaries == (3,)
    long = SideLayout.from_lengths({"text": 30, "img": 20})
    p = prepare_matrix(np.zeros((50, 50)), query_layout=long, key_layout=long)
    assert p.rows.label_step == 2  # every 2nd of 50 tokens, at most 40 labels
    assert p.rows.ticks() == (list(range(0, 50, 2)), [long.labels[i] for i in range(0, 50, 2)])
    assert p.rows.segment_names == (("text", 14.5), ("img", 39.5))
    assert p.cols.ticks()[1][:2] == ["text[0]", "text[2]"]


def test_head_idx_is_the_models_head_id(kept_heads_archive):
    """Head 3 of an archive keeping heads 0 and 3 is its second stored head, the one the
    xarray view calls head 3; position 1 is no head id of it."""
    from attnscope.render._prepare import head_ids, head_position
    from attnscope.store import open_archive

    with open_archive(kept_heads_archive) as arc:
        arr = arc.attention("encoder", 1, "self_attention")
        assert head_ids(arr) == [0, 3] and head_position(arr, 3) == 1
        p = prepare_matrix(arr, head_idx=3, batch_idx=1)
        np.testing.assert_array_equal(p.data, arr[1, 1])
        view = arc.to_xarray("encoder").attention.sel(layer=1)
        assert view["head"].values.tolist() == [0, 3]
        np.testing.assert_array_equal(p.data, view.sel(head=3, sample=1).values)
        with pytest.raises(SelectionError, match=r"head_idx 1 is not a stored head.*\[0, 3\]"):
            prepare_matrix(arr, head_idx=1)
    assert head_ids(np.zeros((1, 4, 2, 2))) == [0, 1, 2, 3]  # in-memory: positions are ids
