"""The reference model and `attnscope capture --config` accept typed token groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from attnscope.capture.model import Transformer
from attnscope.capture.synthetic import GUIDE_DEC, GUIDE_ENC, GUIDE_GROUPS, synthetic_batches
from attnscope.cli import cli
from attnscope.errors import ConfigError
from attnscope.store import open_archive

TINY = dict(embed_dim=16, context_length=40, num_heads=2, num_encoder_layers=1,
            num_decoder_layers=1)


def test_model_types_its_layout_and_keeps_the_guide_signature() -> None:
    plain = Transformer(16, 40, 2, 1, 1)  # the guide's positional constructor still works
    model = Transformer(**TINY, token_groups=GUIDE_GROUPS)
    enc, dec = next(synthetic_batches(1, 2, 16))
    assert plain.token_layout(enc, dec).encoder.groups == {}
    lay = model.token_layout(enc, dec)
    assert lay.encoder.groups["agentview_image"].grid == (3, 3)
    with torch.no_grad():
        model(enc, dec)
    assert model.last_layout == lay
    other = plain.token_layout(enc, dec, groups={"robot0_eef_pos": "state"})
    assert other.encoder.groups["robot0_eef_pos"].kind == "state"


def test_model_refuses_bad_groups() -> None:
    with pytest.raises(ConfigError, match="unknown token group kind"):
        Transformer(**TINY, token_groups={"agentview_image": "picture"})
    model = Transformer(**TINY, token_groups={"agentview_image": {"kind": "image", "grid": [2, 2]}})
    enc, dec = next(synthetic_batches(1, 1, 16))
    with pytest.raises(ConfigError, match="rows \\* cols == tokens"):
        model.token_layout(enc, dec)


def test_cli_capture_config_token_groups(tmp_path: Path) -> None:
    cfg = {**TINY, "enc_modalities": GUIDE_ENC, "dec_modalities": GUIDE_DEC,
           "token_groups": GUIDE_GROUPS}
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    out = tmp_path / "run.zarr"
    r = CliRunner().invoke(cli, ["capture", "--config", str(tmp_path / "model.json"), "--batches",
                                 "1", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    with open_archive(out) as a:
        assert a.layout.encoder.groups["agentview_depth"].camera == "agentview_depth"
        assert a.layout.decoder.groups["robot0_eef_pos_past_traj"].kind == "trajectory"
