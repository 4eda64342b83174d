"""``attnscope demo``: the whole pipeline on the built-in default, in well under a minute.

capture (reference model, guide layout, synthetic inputs) -> archive -> Parquet tables
-> figures -> one HTML report. Each stage reads only the previous stage's files.

The guide's modalities are typed (``GUIDE_GROUPS``: the camera and depth tokens are 3 x 3
patch grids) and the samples are steps of episodes (``episode``/``step`` ids, 8 steps an
episode), so the demo also draws image-patch overlays over procedurally drawn camera
frames (stored with the samples in the archive, ``_frames/<camera>``; sample 0's also as
PNGs in ``frames/``) and episode timelines. To keep the demo quick it draws the overlays of
the last decoder layer and the timeline of the first episode only (``attnscope render
--what overlay,timeline`` draws them all).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from attnscope.errors import ConfigError

__all__ = ["run_demo", "synthetic_frame", "EPISODE_STEPS"]

#: samples per synthetic episode
EPISODE_STEPS = 8


def synthetic_frame(step: int, *, size: int = 96, depth: bool = False) -> np.ndarray:
    """A procedurally drawn camera frame ``(size, size, 3)`` in [0, 1] (no downloads): a
    wall, a table and a red cube that slides across the table with ``step``; ``depth``
    gives the matching grey depth image."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    table = y > 0.55
    cx = 0.2 + 0.6 * ((step % EPISODE_STEPS) / max(1, EPISODE_STEPS - 1))
    cube = (np.abs(x - cx) < 0.1) & (np.abs(y - 0.62) < 0.1)
    if depth:
        d = np.where(table, 0.3 + 0.6 * (y - 0.55), 0.95 - 0.2 * y)
        d = np.where(cube, 0.35, d)
        return np.repeat(d[..., None], 3, axis=2)
    img = np.empty((size, size, 3))
    img[:] = (0.78, 0.8, 0.86)
    img[table] = (0.55, 0.4, 0.26)
    img[cube] = (0.85, 0.15, 0.12)
    return img * (0.9 + 0.1 * x[..., None])


def run_demo(
    out: str | Path = "attnscope-demo",
    *,
    format: str | None = None,
    n_batches: int = 8,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run capture -> analyse -> render -> report into ``out``; return where everything is.

    Examples
    --------
    >>> result = run_demo("demo", format="hdf5", progress=False)
    >>> result["report"]
    PosixPath('demo/report.html')
    """
    for name, value in (("n_batches", n_batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"demo output {str(out)!r} is a file; expected a folder")
    import matplotlib

    matplotlib.use("Agg")
    from attnscope.analysis import analyze
    from attnscope.analysis.timeline import timeline
    from attnscope.capture.job import capture
    from attnscope.capture.synthetic import GUIDE_GROUPS, demo_model, synthetic_batches
    from attnscope.render import render_archive
    from attnscope.render.batch import WHAT
    from attnscope.render.report import write_report

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".h5" if format == "hdf5" else ".zarr"
    archive = out / f"attention{suffix}"
    model = demo_model(seed, token_groups=GUIDE_GROUPS)
    batches = synthetic_batches(n_batches, batch_size, model.config.embed_dim, seed=seed)
    n = n_batches * batch_size
    ids = {"episode": np.arange(n) // EPISODE_STEPS, "step": np.arange(n) % EPISODE_STEPS}
    summary = capture(
        model,
        batches,
        archive,
        format=format,
        progress=progress,
        overwrite=True,
        tags={"job": "attnscope demo"},
        total=n,
        sample_ids=ids,
    )
    echo(
        f"capture: {summary.samples} samples, {summary.bytes / 1e6:.1f} MB of attention "
        f"-> {archive} ({summary.seconds:.1f} s)"
    )
    t = time.perf_counter()
    tables_dir = out / "tables"
    tables = analyze(archive, tables_dir, progress=progress)
    # the past trajectory's look at each modality over every episode (cross-attention)
    cross = [f"decoder/{i}/cross_attention" for i in range(model.config.num_decoder_layers)]
    tables["timeline"] = timeline(
        archive, tables_dir, query=QUERY, arrays=cross
    )
    _write_frames(out / "frames", ids, samples=[0])
    _store_frames(archive, ids)
    echo(f"analysis: {len(tables)} files -> {tables_dir} ({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    figures_dir = out / "figures"
    figures = render_archive(
        archive,
        figures_dir,
        tables_dir=tables_dir,
        samples=[0],
        progress=progress,
        workers=None,  # one process per core: matplotlib is single-threaded
        what=[w for w in WHAT if w not in ("overlay", "timeline")],
    )
    figures += _overlays_and_timeline(archive, figures_dir, tables["timeline"])
    echo(f"render: {len(figures)} figures -> {figures_dir} ({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    report = write_report(archive, out / "report.html", tables_dir=tables_dir)
    echo(f"report: {report} ({time.perf_counter() - t:.1f} s)")
    return {
        "archive": archive,
        "tables": tables,
        "figures": figures,
        "report": report,
        "capture": summary,
        "seconds": time.perf_counter() - t0,
    }


CAMERAS = (("agentview", False), ("agentview_depth", True))
QUERY = "robot0_eef_pos_past_traj"


def _store_frames(archive: Path, ids: dict[str, np.ndarray]) -> None:
    """Every sample's camera and depth frames, stored with it (``_frames/<camera>``)."""
    from attnscope.store.attach import attach_frames

    for cam, depth in CAMERAS:
        frames = np.stack([synthetic_frame(int(s), depth=depth) for s in ids["step"]])
        attach_frames(archive, cam, np.round(frames * 255).astype(np.uint8))


def _overlays_and_timeline(archive: Path, figures_dir: Path, timeline_table: Any) -> list[Path]:
    """Sample 0's overlays (last decoder layer, over the stored frames) and episode 0's
    timeline, under the names ``render_archive`` gives them."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from attnscope.render._save import save_figure
    from attnscope.render.overlay import image_groups, plot_overlay
    from attnscope.render.timeline import plot_timeline
    from attnscope.store import open_archive

    out = []
    with open_archive(archive) as arc:
        layer = arc.layers["decoder"][-1]
        for name in image_groups(arc.layout.encoder):
            fig = plot_overlay(arc, sample=0, image=name, query=QUERY,
                               array=f"decoder/{layer}/cross_attention")
            path = figures_dir / "overlay" / (
                f"decoder-L{layer:02d}-cross_attention-s0000-havg-{name}.png")
            out.append(save_figure(fig, path))
            plt.close(fig)
    fig = plot_timeline(pd.read_parquet(timeline_table), episode=0)
    out.append(save_figure(fig, figures_dir / "timeline" / "e0-decoder-cross_attention-havg.png"))
    plt.close(fig)
    return out


def _write_frames(folder: Path, ids: dict[str, np.ndarray], samples: list[int]) -> Path:
    """Camera and depth frames of ``samples`` as ``frames/<camera>/episode{E}_step{S}.png``."""
    import matplotlib.image as mpimg

    for cam, depth in CAMERAS:
        (folder / cam).mkdir(parents=True, exist_ok=True)
        for i in samples:
            e, s = int(ids["episode"][i]), int(ids["step"][i])
            mpimg.imsave(folder / cam / f"episode{e}_step{s}.png", synthetic_frame(s, depth=depth))
    return folder
