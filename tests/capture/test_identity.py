"""Resume refuses any option that changes what the archive means, naming both values."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from attnscope.capture import Transformer
from attnscope.capture.identity import param_hash
from attnscope.capture.job import capture
from attnscope.cli import cli
from attnscope.errors import ConfigError
from attnscope.store import open_archive


@pytest.fixture
def archive(small_model, make_batches, tmp_path):
    """Two committed batches captured with heads [0, 1]."""
    path = tmp_path / "r.zarr"
    capture(small_model, make_batches(2), path, heads=[0, 1], progress=False)
    return path


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"heads": [2, 3]}, "heads differ: archive has [0, 1], this run asks for [2, 3]"),
        ({"heads": None}, "heads differ: archive has [0, 1], this run asks for all"),
        ({"layers": [0]}, "layers differ: archive has [0, 1], this run asks for [0]"),
        ({"kinds": ["self_attention"]}, "kinds differ: archive has ['decoder/cross_attention'"),
        ({"dtype": "float32"}, "dtype differs: archive has float16, this run asks for float32"),
        ({"topk": 2}, "topk differs: archive has None, this run asks for 2"),
    ],
)
def test_resume_with_other_options_is_refused(
    archive, small_model, make_batches, change, needle
) -> None:
    opts = {"heads": [0, 1], **change}
    with pytest.raises(ConfigError) as info:
        capture(small_model, make_batches(4), archive, resume=True, progress=False, **opts)
    assert needle in str(info.value)
    assert str(info.value).startswith("resume: ")
    with open_archive(archive) as a:
        assert a.n_samples == 4  # nothing appended


def test_resume_with_other_weights_is_refused(archive, make_batches) -> None:
    torch.manual_seed(7)
    other = Transformer(32, 16, 4, 2, 2).eval()
    with pytest.raises(ConfigError, match="model weights differ: archive has parameter hash"):
        capture(other, make_batches(4), archive, heads=[0, 1], resume=True, progress=False)


def test_resume_with_another_model_config_is_refused(archive, make_batches) -> None:
    torch.manual_seed(0)
    other = Transformer(32, 16, 4, 2, 2, mlp_ratio=2).eval()
    with pytest.raises(ConfigError, match="model config differs at 'mlp_ratio': archive has 4"):
        capture(other, make_batches(4), archive, heads=[0, 1], resume=True, progress=False)


def test_resume_with_renamed_modalities_is_refused(archive, small_model, make_batches) -> None:
    # the committed batches are the same inputs; the new ones rename a modality
    renamed = make_batches(4, enc={"words": 5, "robot0_eef_pos": 1, "agentview_image": 4})
    renamed = make_batches(2) + renamed[2:]
    with pytest.raises(ConfigError, match="token layout differs") as info:
        capture(small_model, renamed, archive, heads=[0, 1], resume=True, progress=False)
    assert "words" in str(info.value) and "'text', 5" in str(info.value)
    with open_archive(archive) as a:
        assert a.n_samples == 4


def test_resume_with_the_same_options_appends(archive, small_model, make_batches) -> None:
    s = capture(small_model, make_batches(4), archive, heads=[0, 1], resume=True, progress=False)
    assert s.samples == 4 and s.committed == 8


def test_shard_writer_checks_the_archive_it_joins(small_model, make_batches, tmp_path) -> None:
    path = tmp_path / "mp.zarr"
    kw = {"rank": 0, "world_size": 1, "progress": False}
    capture(small_model, make_batches(2), path, heads=[0, 1], **kw)
    with pytest.raises(ConfigError, match=r"heads differ: archive has \[0, 1\]"):
        capture(small_model, make_batches(2), path, heads=[2, 3], **kw)


def test_param_hash_is_stored_and_tracks_every_weight(archive, small_model) -> None:
    digest, n = param_hash(small_model)
    assert digest.startswith("sha256:") and n == sum(p.numel() for p in small_model.parameters())
    with open_archive(archive) as a:
        assert a.metadata["capture"]["param_hash"] == digest
        assert a.metadata["capture"]["n_params"] == n
    torch.manual_seed(0)
    same = Transformer(32, 16, 4, 2, 2)
    assert param_hash(same)[0] == digest
    with torch.no_grad():
        next(same.parameters()).view(-1)[3] += 1e-3  # one weight of one tensor
    assert param_hash(same)[0] != digest


MODEL_JSON = {
    "embed_dim": 64,
    "context_length": 64,
    "num_heads": 4,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "enc_modalities": {"text": 8, "image": 16},
    "dec_modalities": {"act": 8},
}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--heads", "2,3"], "resume: heads differ: archive has [0, 1], this run asks for [2, 3]"),
        (["--heads", "0,1", "--seed", "1"], "resume: model weights differ"),
        (["--heads", "0,1", "--dtype", "bfloat16"], "resume: dtype differs"),
    ],
)
def test_cli_resume_refuses_other_options_in_one_line(tmp_path, extra, needle) -> None:
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(MODEL_JSON))
    out = tmp_path / "rh.zarr"
    base = ["capture", "--config", str(cfg), "--batch-size", "8", "--out", str(out),
            "--no-progress"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(cli, [*base, "--batches", "2", "--heads", "0,1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*base, "--batches", "4", "--resume", *extra])
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ConfigError: "), res.stderr
    assert needle in lines[0]
    with open_archive(out) as a:
        assert a.n_samples == 16
