"""Provenance: what the archive records about its capture, and the archive fingerprint in
every table and figure manifest made from it."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from attnscope.capture import capture
from attnscope.capture.provenance import git_state, input_digest, mark_weights
from attnscope.contracts import EPISODE_ID, STEP_ID, TABLE_COLUMNS
from attnscope.store import open_archive
from attnscope.store.meta import input_hashes
from attnscope.store.verify import format_info, info


def test_archive_records_model_code_and_inputs(tmp_path, small_model, make_batches, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git work tree
    batches = make_batches(3, 2)
    capture(small_model, batches, tmp_path / "a.zarr", layers=[0], progress=False)
    with open_archive(tmp_path / "a.zarr") as a:
        cap, prov = a.metadata["capture"], a.metadata["provenance"]
        per_sample = input_hashes(a.sample_ids)
    p = cap["provenance"]
    assert p["model_class"] == "attnscope.capture.model.Transformer"
    assert p["training"] is False and p["device"] == "cpu"
    assert p["compute_dtype"] == "float32" and p["storage_dtype"] == "float16"
    assert p["attention_implementation"]["encoder/0/self_attention"].startswith("explicit softmax")
    assert p["attention_implementation"]["encoder/1/self_attention"].startswith("sdpa")
    assert p["git"] is None
    assert cap["param_hash"].startswith("sha256:")
    for lib in ("torch", "transformers", "numpy", "zarr", "h5py"):
        assert lib in prov["libraries"]
    # one digest per batch, on every sample of it, equal to hashing the inputs again
    want = ["sha256:" + input_digest(b).hex() for b in batches]
    assert per_sample == [want[0]] * 2 + [want[1]] * 2 + [want[2]] * 2
    assert len(set(want)) == 3
    text = format_info(info(str(tmp_path / "a.zarr")))
    assert "in eval() on cpu" in text and "not in a git work tree" in text
    assert "input hashes (3 batches)" in text and want[1][:19] in text
    assert "attention explicit softmax; over one block: sdpa output, weights recomputed in " \
        "query blocks: encoder/0/self_attention" in text
    assert p["weights"] is None  # a model given to capture() is not marked
    assert "weights: not recorded" in text


@pytest.mark.parametrize(
    ("record", "line"),
    [
        ({"source": "pretrained", "from": "/m/minilm", "dtype": "bfloat16"},
         "weights: pretrained from /m/minilm, loaded as bfloat16"),
        ({"source": "pretrained", "from": "/c/snap", "hub_id": "acme/m"},
         "weights: pretrained from /c/snap (hub id acme/m, local cache)"),
        ({"source": "random", "seed": 3}, "weights: random, seed 3"),
    ],
)
def test_marked_weights_are_in_the_archive_and_info(tmp_path, small_model, make_batches,
                                                    record, line) -> None:  # fmt: skip
    mark_weights(small_model, record)
    capture(small_model, make_batches(1, 2), tmp_path / "w.zarr", layers=[0], progress=False)
    with open_archive(tmp_path / "w.zarr") as a:
        assert a.metadata["capture"]["provenance"]["weights"] == record
    assert f"  {line}" in format_info(info(str(tmp_path / "w.zarr"))).splitlines()
    with pytest.raises(ValueError, match="pretrained/random"):
        mark_weights(small_model, {"source": "guessed"})


def test_input_digest_sees_every_byte_and_key():
    x = {"a": torch.zeros(2, 3), "b": np.arange(4)}
    base = input_digest(x)
    y = {"a": torch.zeros(2, 3), "b": np.arange(4)}
    y["a"][1, 2] = 1e-7
    assert input_digest(y) != base
    assert input_digest({"a": torch.zeros(3, 2), "b": np.arange(4)}) != base  # shape
    assert input_digest({"c": torch.zeros(2, 3), "b": np.arange(4)}) != base  # key
    assert input_digest({"b": np.arange(4), "a": torch.zeros(2, 3)}) == base  # key order
    assert len(base) == 32


def test_git_state_records_commit_and_dirty(tmp_path):
    def git(*a: str) -> None:
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git not available")
    (tmp_path / "run.py").write_text("print(1)\n")
    git("add", "run.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    st = git_state(tmp_path)
    assert st is not None and len(st["commit"]) == 40 and st["dirty"] is False
    (tmp_path / "run.py").write_text("print(2)\n")
    assert git_state(tmp_path)["dirty"] is True


def test_resume_of_an_archive_without_input_hashes_continues_without(
    tmp_path, small_model, make_batches, monkeypatch
):
    import attnscope.capture.job as job

    batches = make_batches(3, 2)
    monkeypatch.setattr(job, "input_digest", lambda b: None)
    monkeypatch.setattr(job, "input_hash_ids", lambda d, n: {})
    with pytest.raises(RuntimeError):
        capture(small_model, _stop_after(batches, 1), tmp_path / "a.zarr", progress=False)
    monkeypatch.undo()
    s = capture(small_model, batches, tmp_path / "a.zarr", resume=True, progress=False)
    assert s.committed == 6
    with open_archive(tmp_path / "a.zarr") as a:
        assert input_hashes(a.sample_ids) is None


def _stop_after(batches, n):
    yield from batches[:n]
    raise RuntimeError("stopped")


def test_every_table_and_figure_manifest_carries_the_archive_fingerprint(
    tmp_path, small_model, make_batches
):
    from attnscope.analysis import analyze, diff_archives, rollout_archive, timeline
    from attnscope.render import render_archive, render_diff, render_rollout

    batches = make_batches(2, 2)
    ids = {EPISODE_ID: np.array([0, 0, 1, 1]), STEP_ID: np.array([0, 1, 0, 1])}
    capture(small_model, batches, tmp_path / "a.zarr", sample_ids=ids, progress=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in small_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    capture(small_model, batches, tmp_path / "b.zarr", sample_ids=ids, progress=False)
    fps = {}
    for name in ("a", "b"):
        with open_archive(tmp_path / f"{name}.zarr") as a:
            fps[name] = a.identity()["fingerprint"]
    assert fps["a"] and fps["a"] != fps["b"]

    tables = tmp_path / "tables"
    analyze(tmp_path / "a.zarr", tables, progress=False)
    timeline(tmp_path / "a.zarr", tables)
    rollout_archive(tmp_path / "a.zarr", tables)
    diff_archives(tmp_path / "a.zarr", tmp_path / "b.zarr", tables)
    for table in TABLE_COLUMNS:  # every table kind the contracts know
        path = tables / f"{table}.parquet"
        assert path.exists(), f"{table} was not written"
        t = pq.read_table(path)
        assert set(t.column("archive_fingerprint").to_pylist()) == {fps["a"]}, table
        ident = json.loads(t.schema.metadata[b"attnscope.identity"])
        assert ident["fingerprint"] == fps["a"], table
    d = pq.read_table(tables / "diff.parquet")
    assert set(d.column("archive_fingerprint_b").to_pylist()) == {fps["b"]}

    figs = tmp_path / "figs"
    render_archive(tmp_path / "a.zarr", figs / "all", layers=[0], samples=[0], progress=False)
    render_rollout(tables, figs)
    render_diff(tmp_path / "a.zarr", tmp_path / "b.zarr", figs, diff_table=tables)
    manifests = {
        "render_archive": (figs / "all" / "manifest.json", "archive"),
        "rollout": (figs / "rollout" / "manifest.json", "archive"),
        "diff": (figs / "diff" / "manifest.json", "archive"),
    }
    for what, (path, key) in manifests.items():
        doc = json.loads(path.read_text())
        assert doc[key]["fingerprint"] == fps["a"], what
        assert doc["files"], what
    assert json.loads((figs / "diff" / "manifest.json").read_text())["archive_b"][
        "fingerprint"
    ] == fps["b"]
