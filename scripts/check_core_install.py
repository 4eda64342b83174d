"""Check the core install (``pip install attnscope``, no extras): store, analysis, render
and the CLI work on an archive without torch, Dask or xarray; capture says which extra.

Run in a venv that has only the core install (``.ci/run`` does):
``python scripts/check_core_install.py``. Exits non-zero with a one-line reason.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["attnscope", *args], capture_output=True, text=True)
    if ok and res.returncode != 0:
        sys.exit(f"core install: attnscope {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def softmax(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    z = rng.standard_normal(shape) * 2
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def causal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    c = np.tril(softmax(rng, shape))
    return c / c.sum(axis=-1, keepdims=True)


def main() -> None:
    for extra in ("torch", "dask", "distributed", "xarray"):
        if importlib.util.find_spec(extra) is not None:
            sys.exit(f"core install: {extra} is installed; run this in a core-only venv")
    from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

    rng = np.random.default_rng(0)
    layout = TokenLayout(
        encoder=SideLayout.from_lengths({"text": 6, "agentview_image": 4}),
        decoder=SideLayout.from_lengths({"action": 5}),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("run.zarr", "run.h5"):
            arc = Path(tmp) / name
            with ArchiveWriter.create(arc, layout) as w:
                for _ in range(2):
                    w.append(
                        {
                            "encoder": [{"self_attention": softmax(rng, (3, 4, 10, 10))}],
                            "decoder": [
                                {
                                    "self_attention": causal(rng, (3, 4, 5, 5)),
                                    "cross_attention": softmax(rng, (3, 4, 5, 10)),
                                }
                            ],
                        }
                    )
            tables, figs = Path(tmp) / f"{name}.tables", Path(tmp) / f"{name}.figs"
            run("verify", str(arc))
            run("info", str(arc))
            run("analyze", str(arc), "--out", str(tables), "--no-progress")
            run("render", str(arc), "--out", str(figs), "--tables", str(tables),
                "--workers", "1", "--no-progress")
            run("report", str(arc), "--tables", str(tables), "--out", str(Path(tmp) / "r.html"))
            if not any(figs.rglob("*.png")):
                sys.exit(f"core install: render wrote no PNG for {name}")
        rich = subprocess.run(  # notebooks' rich display needs neither torch nor IPython
            [sys.executable, "-c", "import sys, attnscope\n"
             f"a = attnscope.open_archive({str(Path(tmp) / 'run.zarr')!r})\n"
             "assert 'samples committed' in a._repr_html_()\n"
             "assert 'attnscope-data' in a['encoder/0/self_attention']._repr_html_()\n"
             "attnscope.show(a, sample=1)\n"
             "assert 'torch' not in sys.modules and 'IPython' not in sys.modules"],
            capture_output=True, text=True)
        if rich.returncode != 0 or "not in a notebook" not in rich.stdout:
            sys.exit(f"core install: rich display / attnscope.show failed: {rich.stderr.strip()}")
        res = run("capture", "--out", str(Path(tmp) / "c.zarr"), ok=False)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        if res.returncode != 1 or len(lines) != 1 or "attnscope[capture]" not in lines[0]:
            sys.exit(f"core install: capture without torch should name the extra, got "
                     f"exit {res.returncode}: {res.stderr.strip()!r}")
    print("core install: verify, info, analyze, render, report, notebook display ok without "
          "torch/dask; capture names attnscope[capture]")


if __name__ == "__main__":
    main()
