"""The README's Python snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_api_snippet_runs(tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    first, guide = python_blocks()[:2]
    ns: dict = {}
    exec(compile(first, "README-api", "exec"), ns)
    assert ns["summary"].committed == 32
    assert ns["head"].shape == (10, 19)
    assert set(ns["stats"]["head"]) == {-1, 0, 3}
    assert (tmp_path / "flow.png").exists()
    # the guide block continues with the model and inputs of the first one
    ns["enc"], ns["dec"] = ns["batches"][0]
    exec(compile(guide, "README-guide", "exec"), ns)
    assert ns["weights"]["decoder"][2]["cross_attention"].shape == (4, 8, 10, 19)
    assert (tmp_path / "attention_stats.json").exists()
