"""``attnscope demo``: the whole pipeline on the built-in default, in well under a minute.

capture (reference model, guide layout, synthetic inputs) -> archive -> Parquet tables
-> figures -> one HTML report. Each stage reads only the previous stage's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnscope.errors import ConfigError

__all__ = ["run_demo"]


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
    from attnscope.capture.job import capture
    from attnscope.capture.synthetic import demo_model, synthetic_batches
    from attnscope.render import render_archive
    from attnscope.render.report import write_report

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".h5" if format == "hdf5" else ".zarr"
    archive = out / f"attention{suffix}"
    model = demo_model(seed)
    batches = synthetic_batches(n_batches, batch_size, model.config.embed_dim, seed=seed)
    summary = capture(
        model,
        batches,
        archive,
        format=format,
        progress=progress,
        overwrite=True,
        tags={"job": "attnscope demo"},
        total=n_batches * batch_size,
    )
    echo(
        f"capture: {summary.samples} samples, {summary.bytes / 1e6:.1f} MB of attention "
        f"-> {archive} ({summary.seconds:.1f} s)"
    )
    t = time.perf_counter()
    tables_dir = out / "tables"
    tables = analyze(archive, tables_dir, progress=progress)
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
    )
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
