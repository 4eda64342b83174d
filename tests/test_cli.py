"""The command line: every command has help, errors are one line with exit 1, jobs run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from attnscope.cli import cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("cmd", sorted(cli.commands))
def test_every_command_has_help_with_an_example(runner, cmd) -> None:
    res = runner.invoke(cli, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Example: attnscope " + cmd in res.output


def small_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "model.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "context_length": 16,
                "num_heads": 4,
                "num_encoder_layers": 1,
                "num_decoder_layers": 2,
                "enc_modalities": {"text": 4, "image": 6},
                "dec_modalities": {"action": 5},
            }
        )
    )
    return cfg


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_capture_info_verify(runner, tmp_path, suffix) -> None:
    out = tmp_path / f"run{suffix}"
    res = runner.invoke(
        cli,
        [
            "capture",
            "--config",
            str(small_config(tmp_path)),
            "--batches",
            "3",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "6 samples" in res.output
    res = runner.invoke(cli, ["info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["n_samples"] == 6
    res = runner.invoke(cli, ["info", str(out)])
    assert res.exit_code == 0 and "image" in res.output
    res = runner.invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output


def test_capture_from_npz_inputs_with_selection(runner, tmp_path) -> None:
    rng = np.random.default_rng(0)
    npz = tmp_path / "inputs.npz"
    np.savez(
        npz,
        **{
            "enc/text": rng.normal(size=(5, 4, 32)).astype(np.float32),
            "enc/image": rng.normal(size=(5, 6, 32)).astype(np.float32),
            "dec/action": rng.normal(size=(5, 5, 32)).astype(np.float32),
        },
    )
    out = tmp_path / "npz.zarr"
    res = runner.invoke(
        cli,
        [
            "capture",
            "--config",
            str(small_config(tmp_path)),
            "--inputs",
            str(npz),
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--heads",
            "1,3",
            "--kinds",
            "cross_attention",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    from attnscope.store import open_archive

    with open_archive(out) as a:
        assert a.n_samples == 5
        assert a.arrays == ["decoder/0/cross_attention", "decoder/1/cross_attention"]
        assert a["decoder/1/cross_attention"].shape == (5, 2, 5, 10)


def test_capture_hf_config(runner, tmp_path) -> None:
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "bert",
                "vocab_size": 60,
                "hidden_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 32,
            }
        )
    )
    out = tmp_path / "hf.zarr"
    res = runner.invoke(
        cli,
        [
            "capture",
            "--hf-config",
            str(cfg),
            "--batches",
            "2",
            "--batch-size",
            "3",
            "--seq-len",
            "9",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    from attnscope.store import open_archive

    with open_archive(out) as a:
        assert a.arrays == ["encoder/0/self_attention", "encoder/1/self_attention"]
        assert a["encoder/1/self_attention"].shape == (6, 2, 9, 9)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["info", "does-not-exist.zarr"], "does-not-exist.zarr"),
        (["verify", "does-not-exist.h5"], "does-not-exist.h5"),
        (
            ["capture", "--out", "x.zarr", "--layers", "7", "--batches", "1", "--no-progress"],
            "layer",
        ),
        (["capture", "--out", "x.zarr", "--dtype", "float16", "--batch-size", "0"], "batch-size"),
    ],
)
def test_errors_are_one_line_without_traceback(runner, tmp_path, monkeypatch, args, needle) -> None:
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, args)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("Error: ") and needle in lines[0]
    assert "Traceback" not in res.output


def test_console_script_exits_nonzero_on_corrupt_archive(tmp_path) -> None:
    bad = tmp_path / "foreign.h5"
    bad.write_bytes(b"not an hdf5 file at all")
    proc = subprocess.run(
        [sys.executable, "-m", "attnscope.cli", "verify", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "foreign.h5" in proc.stderr


def test_analyze_render_report_commands(runner, tmp_path) -> None:
    out = tmp_path / "run.zarr"
    res = runner.invoke(
        cli,
        [
            "capture",
            "--config",
            str(small_config(tmp_path)),
            "--batches",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    tables = tmp_path / "tables"
    res = runner.invoke(
        cli, ["analyze", str(out), "--out", str(tables), "--topk", "3", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert (tables / "head_stats.parquet").exists() and "top_pairs" in res.output
    figs = tmp_path / "figs"
    res = runner.invoke(
        cli,
        [
            "render",
            str(out),
            "--out",
            str(figs),
            "--layers",
            "1",
            "--heads",
            "2",
            "--what",
            "heatmap,flow",
            "--fmt",
            "svg",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    names = sorted(p.relative_to(figs).as_posix() for p in figs.rglob("*.svg"))
    assert "heatmap/decoder-L01-cross_attention-s0000-h02.svg" in names
    assert "flow/L01-s0000-h02.svg" not in names  # no encoder layer 1: no flow for layer 1
    res = runner.invoke(cli, ["render", str(out), "--out", str(figs), "--heads", "9"])
    assert res.exit_code == 1 and "9" in res.output
    res = runner.invoke(
        cli, ["report", str(out), "--tables", str(tables), "--out", str(tmp_path / "r.html")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


def test_capture_rows_then_analyze_render_report(runner, tmp_path) -> None:
    out = tmp_path / "last.zarr"
    res = runner.invoke(cli, ["capture", "--config", str(small_config(tmp_path)), "--batches",
                              "2", "--batch-size", "2", "--out", str(out), "--no-progress",
                              "--rows", "decoder:last", "--rows", "encoder:rows=0,9"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["info", str(out)])
    assert res.exit_code == 0 and "decoder query rows kept (1): 4" in res.output, res.output
    assert "encoder query rows kept (2): 0, 9" in res.output
    tables = tmp_path / "tables"
    res = runner.invoke(cli, ["analyze", str(out), "--out", str(tables), "--no-progress"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    rs = pd.read_parquet(tables / "row_stats.parquet")
    assert sorted(rs.loc[rs["stack"] == "decoder", "query"].unique()) == [4]
    assert sorted(rs.loc[rs["stack"] == "encoder", "query"].unique()) == [0, 9]
    figs = tmp_path / "figs"
    res = runner.invoke(cli, ["render", str(out), "--out", str(figs), "--tables", str(tables),
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert any(figs.rglob("*.png"))
    res = runner.invoke(cli, ["report", str(out), "--tables", str(tables), "--out",
                              str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["verify", str(out)])
    assert res.exit_code == 0, res.output


def test_capture_under_torchrun_environment_writes_one_archive(tmp_path) -> None:
    import os

    cfg = small_config(tmp_path)
    out = tmp_path / "mp.zarr"
    cmd = [
        sys.executable,
        "-m",
        "attnscope.cli",
        "capture",
        "--config",
        str(cfg),
        "--batches",
        "4",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    procs = [
        subprocess.Popen(
            cmd,
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (1, 0)
    ]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    from attnscope.store import open_archive, verify

    assert verify(out).ok
    with open_archive(out) as a:
        assert a.n_samples == 8


def test_render_tables_without_tables_says_tables_are_needed(runner, tmp_path) -> None:
    out = tmp_path / "run.zarr"
    runner.invoke(
        cli,
        [
            "capture",
            "--config",
            str(small_config(tmp_path)),
            "--batches",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    res = runner.invoke(
        cli, ["render", str(out), "--out", str(tmp_path / "f"), "--what", "tables", "--no-progress"]
    )
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "attnscope analyze" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_world_size_without_rank_is_a_one_line_error(runner, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    res = runner.invoke(
        cli,
        [
            "capture",
            "--config",
            str(small_config(tmp_path)),
            "--out",
            str(tmp_path / "w.zarr"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and "RANK" in res.output


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(runner, monkeypatch) -> None:
    import attnscope.store

    def boom(path):
        raise RuntimeError("CUDA error: device-side assert\ntriggered")

    monkeypatch.setattr(attnscope.store, "info", boom)
    res = runner.invoke(cli, ["info", "x.zarr"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "RuntimeError: CUDA error: device-side assert triggered" in lines[0]
    assert "--debug" in lines[0]
    res = runner.invoke(cli, ["--debug", "info", "x.zarr"])
    assert isinstance(res.exception, RuntimeError)


def test_a_missing_module_outside_the_extras_is_one_line(runner, monkeypatch) -> None:
    import attnscope.store

    def boom(path):
        raise ModuleNotFoundError("No module named 'somelib'", name="somelib")

    monkeypatch.setattr(attnscope.store, "info", boom)
    res = runner.invoke(cli, ["info", "x.zarr"])
    assert res.exit_code == 1
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "somelib" in lines[0] and "--debug" in lines[0]
