"""The CLI against a table of bad inputs: every command refuses in one line.

Each case runs one command on hostile input and checks the promise the README makes:
exit status 1 (or click's 2 for usage errors), exactly one line on stderr, no traceback,
and no change to any file that existed before the command ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from attnscope.cli import cli

MODEL = {
    "embed_dim": 32,
    "context_length": 32,
    "num_heads": 4,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "enc_modalities": {"text": 4, "image": 6},
    "dec_modalities": {"act": 5},
}
HF_BERT = {
    "model_type": "bert",
    "vocab_size": 60,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
}


def _ok(args: list[str]) -> None:
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good inputs the bad cases start from: a config, two archives and their tables."""
    root = tmp_path_factory.mktemp("world")
    (root / "model.json").write_text(json.dumps(MODEL))
    for name, seed in (("x", "0"), ("y", "1")):
        _ok(["capture", "--config", str(root / "model.json"), "--batches", "2",
             "--batch-size", "2", "--seed", seed, "--out", str(root / f"{name}.zarr"),
             "--no-progress"])
        _ok(["analyze", str(root / f"{name}.zarr"), "--out", str(root / f"t{name}"),
             "--no-progress"])
    _ok(["capture", "--config", str(root / "model.json"), "--batches", "2", "--batch-size", "2",
         "--out", str(root / "x.h5"), "--no-progress"])
    _ok(["capture", "--config", str(root / "model.json"), "--batches", "2", "--batch-size", "2",
         "--out", str(root / "xl.zarr"), "--no-progress", "--rows", "decoder:last"])
    return root


# --- builders of bad inputs: each gets a fresh copy of the world and returns argv -------------


def _json(path: Path, obj: object) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _cfg(w: Path, **change: object) -> str:
    return _json(w / "bad.json", {**MODEL, **change})


def _capture(w: Path, *extra: str, config: str | None = None) -> list[str]:
    return ["capture", "--config", config or str(w / "model.json"), "--batches", "1",
            "--batch-size", "2", "--out", str(w / "new.zarr"), "--no-progress", *extra]


def _resume(w: Path, *extra: str) -> list[str]:
    return ["capture", "--config", str(w / "model.json"), "--batches", "3", "--batch-size", "2",
            "--out", str(w / "x.zarr"), "--resume", "--no-progress", *extra]


def _rank_rejoin(w: Path, *change: str) -> list[str]:
    """Rank 0 of two writes its half of a sharded archive; it is then rerun with ``change``."""
    args = ["capture", "--config", str(w / "model.json"), "--batches", "2", "--batch-size",
            "2", "--out", str(w / "mp.zarr"), "--rank", "0", "--world-size", "2",
            "--no-progress"]  # fmt: skip
    _ok(args)
    return [*args, *change]


def _npz_strings(w: Path) -> list[str]:
    np.savez(w / "s.npz", **{"enc/text": np.array([["a", "b"]]), "dec/act": np.zeros((1, 5, 32))})
    return _capture(w, "--inputs", str(w / "s.npz"))


def _npz_object(w: Path) -> list[str]:
    arr = np.empty((1,), dtype=object)
    arr[0] = {"x": 1}
    np.savez(w / "o.npz", **{"enc/text": arr})
    return _capture(w, "--inputs", str(w / "o.npz"))


def _npz_not_zip(w: Path) -> list[str]:
    (w / "junk.npz").write_bytes(b"this is not a zip file at all")
    return _capture(w, "--inputs", str(w / "junk.npz"))


def _pt_pickle(w: Path) -> list[str]:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    (w / "evil.pt").write_bytes(pickle.dumps({"enc/text": Evil()}))
    return _capture(w, "--inputs", str(w / "evil.pt"))


def _pt_junk(w: Path) -> list[str]:
    (w / "junk.pt").write_bytes(os.urandom(256))
    return _capture(w, "--inputs", str(w / "junk.pt"))


def _hf(w: Path, **change: object) -> list[str]:
    path = _json(w / "hf.json", {**HF_BERT, **change})
    return ["capture", "--model", "hf", "--hf-config", path, "--batches", "1", "--batch-size",
            "2", "--seq-len", "8", "--out", str(w / "hf.zarr"), "--no-progress"]


def _hf_too_long(w: Path) -> list[str]:
    args = _hf(w)
    args[args.index("--seq-len") + 1] = "100"  # > max_position_embeddings
    return args


def _drop_chunk(w: Path) -> list[str]:
    arr = w / "x.zarr" / "encoder" / "0" / "self_attention" / "c"
    victim = sorted(p for p in arr.rglob("*") if p.is_file())[0]
    victim.unlink()
    return ["analyze", str(w / "x.zarr"), "--out", str(w / "tz"), "--no-progress"]


def _flip_byte(w: Path) -> list[str]:
    arr = w / "x.zarr" / "encoder" / "0" / "self_attention" / "c"
    victim = sorted(p for p in arr.rglob("*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    return ["analyze", str(w / "x.zarr"), "--out", str(w / "tz"), "--no-progress"]


def _junk_array_meta(cmd: str) -> Callable[[Path], list[str]]:
    def build(w: Path) -> list[str]:
        (w / "x.zarr" / "encoder" / "0" / "self_attention" / "zarr.json").write_text("{not json")
        extra = {
            "info": [],
            "verify": [],
            "analyze": ["--out", str(w / "tz"), "--no-progress"],
            "render": ["--out", str(w / "figs"), "--no-progress"],
            "report": ["--tables", str(w / "tx"), "--out", str(w / "r.html")],
        }[cmd]
        return [cmd, str(w / "x.zarr"), *extra]

    return build


def _delete_array(w: Path) -> list[str]:
    shutil.rmtree(w / "x.zarr" / "decoder" / "1" / "cross_attention")
    return ["verify", str(w / "x.zarr")]


def _set_commit(arc: Path, **rec: int) -> None:
    p = arc / "_commits" / "main" / "zarr.json"
    doc = json.loads(p.read_text())
    doc["attributes"]["attnscope"].update(rec)
    p.write_text(json.dumps(doc))


def _drop_last_chunk(arc: Path) -> None:
    arr = arc / "encoder" / "0" / "self_attention" / "c"
    sorted(p for p in arr.rglob("*") if p.is_file())[-1].unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "deleted array": lambda arc: shutil.rmtree(arc / "decoder" / "1" / "cross_attention"),
    "negative commit count": lambda arc: _set_commit(arc, committed=-1),
    "commit raised past the data": lambda arc: _set_commit(arc, committed=6, stop=6),
    "missing last chunk": _drop_last_chunk,
}


def _damaged(damage: str, cmd: str) -> Callable[[Path], list[str]]:
    """A data command on x.zarr damaged in a way verify rejects (refused before computing)."""

    def build(w: Path) -> list[str]:
        arc = w / "x.zarr"
        DAMAGE[damage](arc)
        return {
            "analyze": ["analyze", str(arc), "--out", str(w / "tz"), "--no-progress"],
            "render": ["render", str(arc), "--out", str(w / "figs"), "--no-progress"],
            "report": ["report", str(arc), "--tables", str(w / "tx"), "--out", str(w / "r.html")],
            "rollout": ["rollout", str(arc), "--out", str(w / "r")],
            "diff": ["diff", str(w / "y.zarr"), str(arc), "--out", str(w / "d")],
        }[cmd]

    return build


def _h5_resume_other_batch_size(w: Path) -> list[str]:
    # A writer killed while the file was open leaves the superblock's write flag set; a
    # refused resume must not clear it (nor change any other byte).
    with open(w / "x.h5", "r+b") as fh:
        fh.seek(20)
        fh.write(b"\x01")
    return ["capture", "--config", str(w / "model.json"), "--batches", "3", "--batch-size", "3",
            "--out", str(w / "x.h5"), "--resume", "--no-progress"]


def _empty(w: Path) -> str:
    (w / "empty").mkdir()
    return str(w / "empty")


def _symlink_loop(w: Path) -> list[str]:
    (w / "loop").symlink_to(w / "loop")
    return _capture(w, "--out", str(w / "loop" / "x.zarr"))


def _truncated_h5(cmd: str) -> Callable[[Path], list[str]]:
    def build(w: Path) -> list[str]:
        data = (w / "x.h5").read_bytes()
        (w / "x.h5").write_bytes(data[: len(data) // 3])
        if cmd == "resume":
            return ["capture", "--config", str(w / "model.json"), "--batches", "3",
                    "--batch-size", "2", "--out", str(w / "x.h5"), "--resume", "--no-progress"]
        return [cmd, str(w / "x.h5")]

    return build


def _tok_dir(w: Path, n_extra: int = 0) -> str:
    """A WordPiece tokenizer folder (9 tokens + ``n_extra``; HF_BERT has 60 ids)."""
    d = w / f"tok{n_extra}"
    d.mkdir(exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "hi"]
    (d / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(n_extra)]))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    return str(d)


def _hf_inputs(w: Path, name: str, *extra: str, text: str | None = None,
               arrays: dict | None = None) -> list[str]:
    """``capture --hf-config`` on an inputs file written here (text, or .npz arrays)."""
    if arrays is not None:
        np.savez(w / name, **arrays)
    else:
        (w / name).write_text(text if text is not None else '{"text": "the cat sat"}\n')
    return ["capture", "--hf-config", _json(w / "hf.json", HF_BERT), "--inputs", str(w / name),
            "--batch-size", "2", "--out", str(w / "hf.zarr"), "--no-progress", *extra]


def _ckpt(w: Path, weights: str = "all", tok_extra: int = 0) -> str:
    """A random HF_BERT saved with save_pretrained (``weights``: "all", "none" (config
    only), "partial" (layer 1 left out)), with the WordPiece tokenizer of ``_tok_dir``."""
    import shutil

    import transformers

    d = w / f"ckpt-{weights}-{tok_extra}"
    transformers.BertModel(transformers.BertConfig(**HF_BERT)).save_pretrained(d)
    for f in Path(_tok_dir(w, tok_extra)).iterdir():
        shutil.copy(f, d / f.name)
    if weights == "none":
        (d / "model.safetensors").unlink()
    elif weights == "partial":
        from safetensors.torch import load_file, save_file

        state = load_file(d / "model.safetensors")
        save_file({k: v for k, v in state.items() if ".layer.1." not in k and "pooler" not in k},
                  d / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    return str(d)


def _rows(w: Path, name: str, *extra: str, text: str = '{"text": "the cat sat"}\n',
          ckpt: str | None = None) -> list[str]:
    """``capture --hf-model`` on a rows-of-text file written here."""
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [1, 2], "body": ["the cat", "sat"]}), w / name)
    else:
        (w / name).write_text(text)
    return ["capture", "--hf-model", ckpt or _ckpt(w), "--inputs", str(w / name),
            "--batch-size", "2", "--out", str(w / "hf.zarr"), "--no-progress", *extra]


def _ids(n: int = 2, length: int = 6) -> np.ndarray:
    return np.arange(n * length).reshape(n, length) % 50 + 5


def _resume_other_max_length(w: Path) -> list[str]:
    args = _hf_inputs(w, "m.npz", "--max-length", "8",
                      arrays={"input_ids": _ids(), "lengths": np.array([6, 3])})
    _ok(args)
    args[args.index("--max-length") + 1] = "9"
    return [*args, "--resume"]


def _file(w: Path, name: str = "existing.txt") -> str:
    (w / name).write_text("user data\n")
    return str(w / name)


def _dir(w: Path, name: str = "existing_dir") -> str:
    (w / name).mkdir(exist_ok=True)
    (w / name / "keep.txt").write_text("user data\n")
    return str(w / name)


CASES: dict[str, Callable[[Path], list[str]]] = {
    # capture: configs
    "config modality count is a string": lambda w: _capture(
        w, config=_cfg(w, enc_modalities={"text": "x"})),
    "config modalities is a list": lambda w: _capture(w, config=_cfg(w, enc_modalities=[4, 6])),
    "config negative modality count": lambda w: _capture(
        w, config=_cfg(w, enc_modalities={"text": -4})),
    "config top-level list": lambda w: _capture(w, config=_json(w / "l.json", [1, 2])),
    "config embed_dim a string": lambda w: _capture(w, config=_cfg(w, embed_dim="64")),
    "config not json": lambda w: _capture(w, config=_file(w, "n.json")),
    "hf config hidden_size a string": lambda w: _hf(w, hidden_size="x"),
    "hf config unknown model_type": lambda w: _hf(w, model_type="no-such-model"),
    "hf model error (seq-len > positions)": _hf_too_long,
    # capture: selections, devices, inputs
    "capture duplicate heads": lambda w: _capture(w, "--heads", "0,0"),
    # capture: codec and write pipeline (refused before anything is created)
    "capture level out of range": lambda w: _capture(w, "--level", "30"),
    "capture level for no compressor": lambda w: _capture(w, "--compressor", "none",
                                                         "--level", "3"),
    "capture unknown compressor": lambda w: _capture(w, "--compressor", "lz5"),
    "capture workers zero": lambda w: _capture(w, "--workers", "0"),
    "capture workers negative": lambda w: _capture(w, "--workers", "-2"),
    "capture inflight-mb zero": lambda w: _capture(w, "--inflight-mb", "0"),
    "capture resume with another level": lambda w: _resume(w, "--level", "5"),
    "capture resume with another compressor": lambda w: _resume(w, "--compressor", "blosc-lz4"),
    "capture head out of range": lambda w: _capture(w, "--heads", "9"),
    "capture reversed layer range": lambda w: _capture(w, "--layers", "1-0"),
    "capture unknown kind": lambda w: _capture(w, "--kinds", "bogus"),
    # capture: row policies (docs/capture.md)
    "capture rows unknown side": lambda w: _capture(w, "--rows", "middle:last"),
    "capture rows unknown rule": lambda w: _capture(w, "--rows", "decoder:first"),
    "capture rows every=0": lambda w: _capture(w, "--rows", "decoder:every=0"),
    "capture rows not parsable": lambda w: _capture(w, "--rows", "decoder"),
    "capture rows missing segment": lambda w: _capture(w, "--rows", "decoder:segment=traj"),
    "capture rows out of range": lambda w: _capture(w, "--rows", "encoder:rows=3,10"),
    "capture rows side given twice": lambda w: _capture(
        w, "--rows", "decoder:last", "--rows", "decoder:every=2"),
    "capture rows resume with another policy": lambda w: [
        "capture", "--config", str(w / "model.json"), "--batches", "2", "--batch-size", "2",
        "--out", str(w / "xl.zarr"), "--no-progress", "--rows", "decoder:last=2", "--resume"],
    "capture rows resume of a full archive": lambda w: [
        "capture", "--config", str(w / "model.json"), "--batches", "2", "--batch-size", "2",
        "--out", str(w / "x.zarr"), "--no-progress", "--rows", "decoder:last", "--resume"],
    "rollout of kept rows": lambda w: ["rollout", str(w / "xl.zarr"), "--out", str(w / "r")],
    "diff of other kept rows": lambda w: ["diff", str(w / "x.zarr"), str(w / "xl.zarr"),
                                          "--out", str(w / "d")],
    "capture device bogus": lambda w: _capture(w, "--device", "bogus"),
    "capture query block 0": lambda w: _capture(w, "--query-block", "0"),
    "capture device cuda without a GPU": lambda w: _capture(w, "--device", "cuda"),
    "capture npz with strings": _npz_strings,
    "capture npz with objects": _npz_object,
    "capture npz not a zip": _npz_not_zip,
    "capture pt with a pickle": _pt_pickle,
    "capture pt junk": _pt_junk,
    "capture out exists": lambda w: _capture(w)[:-4] + ["--out", str(w / "x.zarr"),
                                                         "--no-progress"],
    "capture out is a user folder": lambda w: _capture(w)[:-4] + ["--out", _dir(w),
                                                                   "--overwrite",
                                                                   "--no-progress"],
    "capture batch size 0": lambda w: _capture(w)[:5] + ["--batch-size", "0", "--out",
                                                           str(w / "new.zarr")],
    # capture: ragged inputs (sentences with --tokenizer, masks, lengths, --max-length)
    "capture sentences without --tokenizer": lambda w: _hf_inputs(w, "s.jsonl"),
    "capture sentences file of blank lines": lambda w: _hf_inputs(
        w, "s.txt", "--tokenizer", _tok_dir(w), text="\n  \n\n"),
    "capture jsonl line not an object": lambda w: _hf_inputs(
        w, "s.jsonl", "--tokenizer", _tok_dir(w), text='["the cat"]\n'),
    "capture jsonl line not json": lambda w: _hf_inputs(
        w, "s.jsonl", "--tokenizer", _tok_dir(w), text="the cat sat\n"),
    "capture sentences with the reference model": lambda w: _capture(
        w, "--inputs", _file(w, "s.txt")),
    "capture tokenizer with the reference model": lambda w: _capture(
        w, "--tokenizer", _tok_dir(w)),
    "capture tokenizer folder holds no tokenizer": lambda w: _hf_inputs(
        w, "s.jsonl", "--tokenizer", _dir(w)),
    "capture tokenizer larger than the model vocab": lambda w: _hf_inputs(
        w, "s.jsonl", "--tokenizer", _tok_dir(w, 80)),
    # capture --hf-model (a checkpoint, offline) on rows of a dataset file: nothing written
    "capture checkpoint folder without weights": lambda w: _rows(
        w, "s.jsonl", ckpt=_ckpt(w, "none")),
    "capture checkpoint folder without config": lambda w: _rows(w, "s.jsonl", ckpt=_dir(w)),
    "capture checkpoint weights partly missing": lambda w: _rows(
        w, "s.jsonl", ckpt=_ckpt(w, "partial")),
    "capture checkpoint hub id not cached": lambda w: _rows(
        w, "s.jsonl", ckpt="attnscope-no-such-org/no-such-model"),
    "capture checkpoint tokenizer larger than its vocab": lambda w: _rows(
        w, "s.jsonl", ckpt=_ckpt(w, tok_extra=80)),
    "capture checkpoint and --hf-config both": lambda w: _rows(
        w, "s.jsonl", "--hf-config", _json(w / "hf.json", HF_BERT)),
    "capture checkpoint --torch-dtype without it": lambda w: _hf_inputs(
        w, "s.jsonl", "--torch-dtype", "float16"),
    "capture checkpoint --target-field on an encoder": lambda w: _rows(
        w, "s.jsonl", "--target-field", "text"),
    "capture dataset unknown text field": lambda w: _rows(w, "s.jsonl", "--text-field", "body"),
    "capture dataset empty jsonl": lambda w: _rows(w, "s.jsonl", text=""),
    "capture dataset jsonl line not json": lambda w: _rows(
        w, "s.jsonl", text='{"text": "the cat"}\nthe cat sat\n'),
    "capture dataset field not text": lambda w: _rows(
        w, "s.jsonl", text='{"text": "the cat"}\n{"text": 5}\n'),
    "capture dataset csv unknown field": lambda w: _rows(
        w, "s.csv", "--text-field", "body", text="text,label\nthe cat,1\n"),
    "capture dataset parquet column not text": lambda w: _rows(w, "s.parquet"),
    "capture dataset unknown suffix": lambda w: _rows(w, "s.tsv", text="the cat\n"),
    "capture npz mask shape unlike input_ids": lambda w: _hf_inputs(
        w, "m.npz", arrays={"input_ids": _ids(), "attention_mask": np.ones((2, 5), int)}),
    "capture npz mask not 0/1": lambda w: _hf_inputs(
        w, "m.npz", arrays={"input_ids": _ids(), "attention_mask": np.full((2, 6), 2)}),
    "capture npz lengths out of range": lambda w: _hf_inputs(
        w, "m.npz", arrays={"input_ids": _ids(), "lengths": np.array([0, 3])}),
    "capture npz lengths and mask both": lambda w: _hf_inputs(
        w, "m.npz", arrays={"input_ids": _ids(), "lengths": np.array([6, 3]),
                            "attention_mask": np.ones((2, 6), int)}),
    "capture npz longer than --max-length": lambda w: _hf_inputs(
        w, "m.npz", "--max-length", "4", arrays={"input_ids": _ids(),
                                                 "attention_mask": np.ones((2, 6), int)}),
    "capture max-length 0": lambda w: _hf_inputs(
        w, "m.npz", "--max-length", "0", arrays={"input_ids": _ids()}),
    "resume other max-length": _resume_other_max_length,
    # capture: resume must refuse what changes the archive's meaning
    "resume other heads": lambda w: _resume(w, "--heads", "2,3"),
    "resume other dtype": lambda w: _resume(w, "--dtype", "float32"),
    "resume other seed (weights)": lambda w: _resume(w, "--seed", "7"),
    "resume other layers": lambda w: _resume(w, "--layers", "0"),
    "resume other kinds": lambda w: _resume(w, "--kinds", "self_attention"),
    "resume other topk": lambda w: _resume(w, "--topk", "2"),
    "resume with --overwrite": lambda w: _resume(w, "--overwrite"),
    "resume with another --format": lambda w: _resume(w, "--format", "hdf5"),
    "resume hdf5 refused after opening": _h5_resume_other_batch_size,
    "capture heads empty": lambda w: _capture(w, "--heads", ""),
    "capture heads reversed": lambda w: _capture(w, "--heads", "3-1"),
    "capture rows last beyond the axis": lambda w: _capture(w, "--rows", "decoder:last=999"),
    "capture max-length negative": lambda w: _hf_inputs(
        w, "m.npz", "--max-length", "-3", arrays={"input_ids": _ids()}),
    "capture out through a symlink loop": _symlink_loop,
    "capture out under a file": lambda w: _capture(w, "--out", str(Path(_file(w)) / "x.zarr")),
    "capture multi-process to hdf5": lambda w: _capture(
        w, "--rank", "0", "--world-size", "2", "--out", str(w / "s.h5")),
    "analyze an empty folder": lambda w: ["analyze", _empty(w), "--out", str(w / "t")],
    "resume renamed modality": lambda w: [
        "capture", "--config", _cfg(w, enc_modalities={"words": 4, "image": 6}),
        *_resume(w)[3:]],
    # info / verify
    "info missing path": lambda w: ["info", str(w / "nope.zarr")],
    "info plain folder": lambda w: ["info", _dir(w)],
    "info random bytes": lambda w: ["info", _file(w, "r.h5")],
    "verify empty zip": lambda w: ["verify", _file(w, "e.zarr.zip")],
    "verify tolerance nan": lambda w: ["verify", str(w / "x.zarr"), "--tolerance", "nan"],
    "verify tolerance negative": lambda w: ["verify", str(w / "x.zarr"), "--tolerance", "-1"],
    "verify deleted array folder": _delete_array,
    "info truncated hdf5": _truncated_h5("info"),
    "verify truncated hdf5": _truncated_h5("verify"),
    "resume truncated hdf5": _truncated_h5("resume"),
    # analyze
    "analyze out is a file": lambda w: ["analyze", str(w / "x.zarr"), "--out", _file(w)],
    "analyze scheduler refused": lambda w: ["analyze", str(w / "x.zarr"), "--out",
                                            str(w / "tz"), "--scheduler", "tcp://127.0.0.1:1"],
    "analyze scheduler not an address": lambda w: ["analyze", str(w / "x.zarr"), "--out",
                                                   str(w / "tz"), "--scheduler", "notanaddress"],
    "analyze topk 0": lambda w: ["analyze", str(w / "x.zarr"), "--out", str(w / "tz"),
                                 "--topk", "0"],
    "analyze workers 0": lambda w: ["analyze", str(w / "x.zarr"), "--out", str(w / "tz"),
                                    "--workers", "0"],
    "analyze missing chunk": _drop_chunk,
    "analyze flipped byte": _flip_byte,
    # render / report
    "render out is a file": lambda w: ["render", str(w / "x.zarr"), "--out", _file(w)],
    "render reversed layer range": lambda w: ["render", str(w / "x.zarr"), "--out",
                                              str(w / "figs"), "--layers", "3-1"],
    "render layer out of range": lambda w: ["render", str(w / "x.zarr"), "--out",
                                            str(w / "figs"), "--layers", "7"],
    "render head out of range": lambda w: ["render", str(w / "x.zarr"), "--out",
                                           str(w / "figs"), "--heads", "9"],
    "render unknown figure kind": lambda w: ["render", str(w / "x.zarr"), "--out",
                                             str(w / "figs"), "--what", "bogus"],
    "render bad colour scale": lambda w: ["render", str(w / "x.zarr"), "--out",
                                          str(w / "figs"), "--scale", "p200"],
    "render another archive's tables": lambda w: [
        "render", str(w / "x.zarr"), "--out", str(w / "figs"), "--what", "tables",
        "--tables", str(w / "ty")],
    "report another archive's tables": lambda w: [
        "report", str(w / "x.zarr"), "--tables", str(w / "ty"), "--out", str(w / "r.html")],
    "report out is an existing folder": lambda w: [
        "report", str(w / "x.zarr"), "--tables", str(w / "tx"), "--out", _dir(w)],
    "report sample out of range": lambda w: [
        "report", str(w / "x.zarr"), "--tables", str(w / "tx"), "--out", str(w / "r.html"),
        "--sample", "99"],
    # demo
    "demo batch size -1": lambda w: ["demo", "--out", str(w / "demo"), "--batch-size", "-1"],
    "demo batches 0": lambda w: ["demo", "--out", str(w / "demo"), "--batches", "0"],
    "demo out is a file": lambda w: ["demo", "--out", _file(w)],
    # archive URLs refused before any request (no server needed)
    "capture to an HDF5 URL": lambda w: _capture(w, "--out", "s3://bucket/run.h5"),
    "info of an HDF5 URL": lambda w: ["info", "s3://bucket/run.h5"],
    "verify of a zip URL": lambda w: ["verify", "memory://attnscope-cli/run.zarr.zip"],
    "analyze tables out to a chained fsspec URL": lambda w: [
        "analyze", str(w / "x.zarr"), "--out", "simplecache::memory://attnscope-cli/tables"],
    "render tables from a chained fsspec URL": lambda w: [
        "render", str(w / "x.zarr"), "--out", str(w / "figs"), "--what", "tables",
        "--tables", "simplecache::memory://attnscope-cli/tables"],
    "report tables from a memory URL holding none": lambda w: [
        "report", str(w / "x.zarr"), "--tables", "memory://attnscope-cli-none/tables",
        "--out", str(w / "r.html")],
    "render figures out to a URL": lambda w: [
        "render", str(w / "x.zarr"), "--out", "s3://bucket/figs"],
    "info of an S3 URL without a bucket": lambda w: ["info", "s3:///run.zarr"],
    "info of an unknown URL protocol": lambda w: ["info", "nosuchproto://bucket/run.zarr"],
    "analyze a memory URL holding nothing": lambda w: [
        "analyze", "memory://attnscope-cli-none/run.zarr", "--out", str(w / "t")],
    "info of a chained fsspec URL": lambda w: ["info", "simplecache::s3://bucket/run.zarr"],
    "capture to a chained fsspec URL": lambda w: _capture(
        w, "--out", "simplecache::memory://attnscope-cli/run.zarr"),
    # every data command on an archive whose structure verify rejects
    **{f"{cmd} {damage}": _damaged(damage, cmd)
       for cmd in ("analyze", "render", "report", "rollout", "diff") for damage in DAMAGE},
    # a rank rejoining its archive runs the checks of a resume (docs/capture.md)
    "capture rank rejoin with other weights": lambda w: _rank_rejoin(w, "--seed", "1"),
    "capture rank rejoin with another batch size": lambda w: _rank_rejoin(
        w, "--batch-size", "1", "--batches", "4"),
    "capture rank rejoin with another world size": lambda w: _rank_rejoin(
        w, "--world-size", "1"),
    # every reading command on an array whose metadata is junk
    **{f"{cmd} junk array zarr.json": _junk_array_meta(cmd)
       for cmd in ("info", "verify", "analyze", "render", "report")},
}


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".attnscope-lock" not in str(p)
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_in_one_line(world: Path, tmp_path: Path, case: str) -> None:
    w = tmp_path / "w"
    shutil.copytree(world, w)
    args = CASES[case](w)
    before = _snapshot(w)
    res = CliRunner().invoke(cli, args)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        pytest.fail(f"{case}: raised {type(res.exception).__name__}: {res.exception}"[:500])
    assert res.exit_code in (1, 2), f"{case}: exit {res.exit_code}\n{res.output}\n{err}"
    assert "Traceback" not in res.output + err, f"{case}:\n{res.output}{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if res.exit_code == 1:
        assert len(lines) == 1, f"{case}: stderr is not one line:\n{err}"
        assert lines[0].startswith("Error: "), lines
    after = _snapshot(w)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"{case}: changed or removed files that existed before: {changed}"


@pytest.mark.parametrize("case", sorted(c for c in CASES if c.startswith(
    ("capture checkpoint", "capture dataset", "capture level", "capture workers",
     "capture inflight"))))  # fmt: skip
def test_refused_checkpoint_and_dataset_captures_write_nothing(
    world: Path, tmp_path: Path, case: str
) -> None:
    w = tmp_path / "w"
    shutil.copytree(world, w)
    args = CASES[case](w)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    assert not (w / "hf.zarr").exists() and not (w / "new.zarr").exists(), case


def test_the_table_is_large() -> None:
    assert len(CASES) >= 50
