"""Episode timelines (analysis/timeline.py): heads are the model's head numbers."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.analysis import load_table, timeline
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout


def test_timeline_names_kept_heads_by_their_model_numbers(tmp_path) -> None:
    rng = np.random.default_rng(5)
    lay = TokenLayout(encoder=SideLayout.from_lengths({"text": 3, "img": 2}))
    x = rng.random((4, 2, 5, 5)).astype(np.float32)
    x /= x.sum(-1, keepdims=True)
    path = tmp_path / "a.zarr"
    with ArchiveWriter.create(path, lay, dtype="float32",
                              heads={"encoder/0/self_attention": [1, 3]}) as w:
        w.append({"encoder/0/self_attention": x},
                 sample_ids={"episode": np.zeros(4, np.int64), "step": np.arange(4)})
    timeline(path, tmp_path / "t", query="text")
    df = load_table(tmp_path / "t", "timeline", archive=path)
    assert set(df["head_index"]) == {1, 3}  # not the stored positions 0, 1
    got = df[(df.head_index == 3) & (df.key_segment == "img")].sort_values("step")
    want = x[:, 1, :3, 3:].sum(-1).mean(-1)  # model head 3 is stored at position 1
    np.testing.assert_allclose(got["mass"], want, rtol=1e-5)
    mean = load_table(tmp_path / "t", "mean_head_timeline", archive=path)
    got = mean[mean.key_segment == "img"].sort_values("step")
    assert got["mass"].to_numpy() == pytest.approx(x[:, :, :3, 3:].sum(-1).mean((1, 2)),
                                                   rel=1e-5)
