"""``attnscope capture --max-new-tokens / --do-sample``: generation from the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from attnscope.cli import cli
from attnscope.store import open_archive

pytest.importorskip("transformers")

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 60,
        "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32, "bos_token_id": 0,
        "eos_token_id": 0}  # fmt: skip
BART = {"model_type": "bart", "vocab_size": 60, "d_model": 16, "encoder_layers": 1,
        "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 32}  # fmt: skip
BERT = {"model_type": "bert", "vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32}  # fmt: skip


def _run(tmp_path, cfg: dict, *args: str):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    base = ["capture", "--hf-config", str(path), "--batches", "1", "--batch-size", "2",
            "--seq-len", "4", "--no-progress", "--device", "cpu"]  # fmt: skip
    return CliRunner().invoke(cli, [*base, *args])


@pytest.mark.parametrize("sample", [[], ["--do-sample"]], ids=["greedy", "sampled"])
def test_cli_generates_and_stores_the_whole_sequence(tmp_path, sample) -> None:
    res = _run(tmp_path, GPT2, "--max-new-tokens", "3", "--out", str(tmp_path / "g.zarr"), *sample)
    assert res.exit_code == 0, res.output
    with open_archive(tmp_path / "g.zarr") as a:
        assert a["decoder/1/self_attention"].shape == (2, 2, 7, 7)


def test_cli_generates_with_an_encoder_decoder(tmp_path) -> None:
    res = _run(tmp_path, BART, "--max-new-tokens", "2", "--out", str(tmp_path / "b.zarr"))
    assert res.exit_code == 0, res.output
    with open_archive(tmp_path / "b.zarr") as a:
        assert a["decoder/0/cross_attention"].shape == (2, 2, 3, 4)  # start token + 2


@pytest.mark.parametrize(
    ("cfg", "args", "needle"),
    [
        (GPT2, ["--max-new-tokens", "0"], "got 0 (model GPT2LMHeadModel)"),
        (BERT, ["--max-new-tokens", "2"], "BertModel is an encoder-only model"),
        (GPT2, ["--do-sample"], "--do-sample needs --max-new-tokens"),
    ],
)
def test_cli_bad_generation_is_one_line(tmp_path, cfg, args, needle) -> None:
    res = _run(tmp_path, cfg, *args, "--out", str(tmp_path / "x.zarr"))
    assert res.exit_code == 1
    assert needle in res.output
    assert res.output.strip().count("\n") == 0
    assert "Traceback" not in res.output


def test_cli_reference_model_cannot_generate(tmp_path) -> None:
    res = CliRunner().invoke(cli, ["capture", "--max-new-tokens", "2", "--batches", "1",
                                   "--out", str(tmp_path / "r.zarr"), "--no-progress"])  # fmt: skip
    assert res.exit_code == 1
    assert "not supported for Transformer" in res.output
