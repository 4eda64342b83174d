"""``attnscope capture --inputs`` with ragged inputs: sentences with --tokenizer, masks, lengths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from attnscope.cli import cli
from attnscope.store import open_archive

transformers = pytest.importorskip("transformers")

BERT = {
    "model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32,
}  # fmt: skip
WORDS = "the a cat dog sat on mat attention is all you need hi there".split()
SENTENCES = ["the cat sat on the mat", "hi", "attention is all you need", "a dog",
             "hi there the cat", "you need a mat"]  # fmt: skip


def _invoke(*args: str):
    return CliRunner().invoke(cli, [*args], catch_exceptions=False)


@pytest.fixture
def files(tmp_path) -> Path:
    """A tiny BERT config and a WordPiece tokenizer folder that fits its vocabulary."""
    (tmp_path / "bert.json").write_text(json.dumps(BERT))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
    )
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n\n")
    return tmp_path


def _base(files: Path, inputs: str, out: str, *extra: str) -> list[str]:
    return ["capture", "--hf-config", str(files / "bert.json"), "--inputs", str(files / inputs),
            "--batch-size", "2", "--out", str(files / out), "--no-progress", "--device", "cpu",
            "--dtype", "float32", *extra]  # fmt: skip


@pytest.mark.parametrize("inputs", ["s.jsonl", "s.txt"])
def test_sentences_with_a_tokenizer_end_to_end(files, inputs) -> None:
    from transformers import AutoTokenizer

    res = _invoke(*_base(files, inputs, "s.zarr", "--tokenizer", str(files / "tok")))
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(str(files / "tok"), local_files_only=True)
    with open_archive(files / "s.zarr") as a:
        assert a.ragged and a.n_samples == len(SENTENCES)
        assert a.metadata["max_lengths"] == {"encoder": 8}  # the longest batch
        for i, sentence in enumerate(SENTENCES):
            alone = tok(sentence)["input_ids"]
            labels, ids = a.tokens("encoder", i)
            real = a.masks("encoder", i)
            assert ids[real].tolist() == alone
            assert [x for x, r in zip(labels, real) if r] == tok.convert_ids_to_tokens(alone)
    for cmd in (["analyze", str(files / "s.zarr"), "--out", str(files / "t"), "--no-progress"],
                ["render", str(files / "s.zarr"), "--out", str(files / "f"), "--no-progress"],
                ["verify", str(files / "s.zarr")]):  # fmt: skip
        res = _invoke(*cmd)
        assert res.exit_code == 0, (cmd[0], res.output)


def test_max_length_truncates_sentences_and_sets_the_maximum(files) -> None:
    res = _invoke(*_base(files, "s.jsonl", "m.zarr", "--tokenizer", str(files / "tok"),
                         "--max-length", "5"))  # fmt: skip
    assert res.exit_code == 0, res.output
    with open_archive(files / "m.zarr") as a:
        assert a.layout.encoder.length == 5
        assert a.lengths("encoder").max() == 5


@pytest.mark.parametrize("how", ["attention_mask", "lengths"])
def test_npz_with_a_mask_or_lengths_is_ragged(files, how) -> None:
    g = np.random.default_rng(0)
    ids = g.integers(5, 40, size=(5, 9))
    lengths = np.array([3, 9, 4, 2, 6])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
    arrays = {"input_ids": ids, how: mask if how == "attention_mask" else lengths}
    np.savez(files / "in.npz", **arrays)
    res = _invoke(*_base(files, "in.npz", "n.zarr"))
    assert res.exit_code == 0, res.output
    with open_archive(files / "n.zarr") as a:
        assert a.ragged and a.metadata["max_lengths"] == {"encoder": 9}
        assert a.lengths("encoder").tolist() == lengths.tolist()
        np.testing.assert_array_equal(a.masks("encoder"), mask.astype(bool))
        x = a["encoder/0/self_attention"][:]
        assert (x[0, :, 3:] == 0).all() and (x[0, :, :, 3:] == 0).all()


def _lines(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_resume_with_other_inputs_is_refused(files) -> None:
    tok = ("--tokenizer", str(files / "tok"))
    _lines(files / "p2.jsonl", SENTENCES[:2])
    res = _invoke(*_base(files, "p2.jsonl", "p.zarr", *tok))
    assert res.exit_code == 0, res.output
    _lines(files / "other.jsonl", ["a dog", "you need a mat", "hi there"])
    res = CliRunner().invoke(cli, _base(files, "other.jsonl", "p.zarr", *tok, "--resume"))
    assert res.exit_code != 0
    msg = res.output.strip().splitlines()[-1]
    assert "batch 0's inputs differ from the committed ones (sample 0)" in msg, res.output
    # another batch size hashes other batches: refused by name
    res = CliRunner().invoke(
        cli, [*_base(files, "s.jsonl", "p.zarr", *tok, "--resume"), "--batch-size", "3"]
    )
    assert res.exit_code != 0 and "batch size differs: archive has 2" in res.output, res.output
    with open_archive(files / "p.zarr") as a:
        assert a.n_samples == 2
    # the same inputs (and more) resume
    res = _invoke(*_base(files, "s.jsonl", "p.zarr", *tok, "--resume"))
    assert res.exit_code == 0, res.output
    with open_archive(files / "p.zarr") as a:
        assert a.n_samples == len(SENTENCES)


def test_longer_batch_then_max_length_resume_as_advised(files) -> None:
    tok = ("--tokenizer", str(files / "tok"))
    short = ["hi", "a dog", "hi there", "a mat"]
    long = ["the cat sat on the mat", "attention is all you need"]
    _lines(files / "short.jsonl", short)
    _lines(files / "all.jsonl", short + long)
    res = _invoke(*_base(files, "short.jsonl", "r.zarr", *tok))
    assert res.exit_code == 0, res.output
    with open_archive(files / "r.zarr") as a:
        cap = a.metadata["max_lengths"]["encoder"]
        assert a.metadata["capture"]["max_length"] is None
    res = CliRunner().invoke(cli, _base(files, "all.jsonl", "r.zarr", *tok, "--resume"))
    assert res.exit_code != 0
    assert f"truncate the inputs to {cap} tokens" in res.output, res.output
    assert f"--max-length {cap}" in res.output
    # the advice: truncate with --max-length <archive maximum> and resume
    res = _invoke(*_base(files, "all.jsonl", "r.zarr", *tok, "--max-length", str(cap),
                         "--resume"))  # fmt: skip
    assert res.exit_code == 0, res.output
    with open_archive(files / "r.zarr") as a:
        assert a.n_samples == 6 and a.metadata["max_lengths"] == {"encoder": cap}
        assert a.lengths("encoder").max() == cap
    # another maximum still changes the archive's meaning
    res = CliRunner().invoke(cli, _base(files, "all.jsonl", "r.zarr", *tok, "--max-length",
                                        str(cap + 1), "--resume"))  # fmt: skip
    assert res.exit_code != 0 and "max_length differs" in res.output, res.output
