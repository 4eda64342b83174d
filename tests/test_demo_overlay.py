"""The demo types the guide layout, stores episode/step ids, and draws an overlay over a
synthetic camera frame and an episode timeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from attnscope.demo import EPISODE_STEPS, run_demo, synthetic_frame
from attnscope.store import open_archive


def test_demo_writes_overlay_over_frame_and_timeline(tmp_path: Path) -> None:
    r = run_demo(tmp_path / "d", n_batches=2, batch_size=4, progress=False, echo=lambda s: None)
    figs = {p.relative_to(tmp_path / "d" / "figures").as_posix() for p in r["figures"]}
    assert "overlay/decoder-L02-cross_attention-s0000-havg-agentview_image.png" in figs
    assert "timeline/e0-decoder-cross_attention-havg.png" in figs
    assert (tmp_path / "d" / "frames" / "agentview" / "episode0_step0.png").is_file()
    df = pd.read_parquet(r["tables"]["timeline"])
    assert sorted(set(df["step"])) == list(range(EPISODE_STEPS))
    with open_archive(r["archive"]) as a:
        assert a.layout.encoder.groups["agentview_image"].grid == (3, 3)
        np.testing.assert_array_equal(a.sample_ids["episode"], [0] * 8)


def test_synthetic_frame_moves_the_cube_with_the_step() -> None:
    a, b = synthetic_frame(0), synthetic_frame(5)
    assert a.shape == (96, 96, 3) and 0 <= a.min() and a.max() <= 1
    assert not np.array_equal(a, b)
    assert synthetic_frame(0, depth=True).shape == (96, 96, 3)
