"""Models and inputs from CLI options: every bad config or input file is one line."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from attnscope.capture.cli_support import build_job, hf_model_from_config, load_inputs, row_ids
from attnscope.capture.hf_inputs import RowBatches
from attnscope.contracts import ROW_ID
from attnscope.errors import ConfigError, InputError

MODEL = {
    "embed_dim": 32,
    "context_length": 32,
    "num_heads": 4,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "enc_modalities": {"text": 4, "image": 6},
    "dec_modalities": {"act": 5},
}


def _config(tmp_path, obj) -> str:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({**MODEL, "enc_modalities": {"text": "x"}}, "enc_modalities['text'] is 'x'; expected"),
        ({**MODEL, "enc_modalities": [4, 6]}, "'enc_modalities' is [4, 6]; expected a non-empty"),
        ({**MODEL, "dec_modalities": {"act": -4}}, "dec_modalities['act'] is -4; expected"),
        ({**MODEL, "dec_modalities": {"act": True}}, "dec_modalities['act'] is True"),
        ([1, 2], "holds a JSON list; expected an object"),
        ({**MODEL, "embed_dim": "64"}, "embed_dim is '64'; expected an integer"),
        ({**MODEL, "dropout": "x"}, "dropout is 'x'; expected a number"),
        ({**MODEL, "embed_dimm": 64}, "unknown model config key(s) ['embed_dimm']"),
    ],
)
def test_bad_reference_config_is_one_line(tmp_path, obj, needle) -> None:
    with pytest.raises(ConfigError) as info:
        build_job("reference", config=_config(tmp_path, obj))
    assert needle in str(info.value) and "\n" not in str(info.value)


HF_BERT = {
    "model_type": "bert",
    "vocab_size": 60,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"hidden_size": "x"}, "'hidden_size' is 'x'; expected an integer (default 768)"),
        ({"hidden_dropout_prob": "x"}, "'hidden_dropout_prob' is 'x'; expected a number"),
        ({"model_type": "no-such-model"}, "model_type 'no-such-model' is not a model type"),
        ({"model_type": 3}, "model_type 3 is not a model type"),
        ({"hidden_size": 15}, "cannot build a bert model from"),  # not divisible by the heads
    ],
)
def test_bad_hf_config_is_one_line(tmp_path, change, needle) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError) as info:
        hf_model_from_config(_config(tmp_path, {**HF_BERT, **change}))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_npz_with_strings_is_refused(tmp_path) -> None:
    np.savez(tmp_path / "s.npz", **{"enc/text": np.array([["a", "b"]])})
    with pytest.raises(InputError, match=r"'enc/text' has dtype <U1; expected numbers"):
        load_inputs(tmp_path / "s.npz")


def test_npz_with_objects_is_refused_without_unpickling(tmp_path) -> None:
    arr = np.empty((1,), dtype=object)
    arr[0] = {"x": 1}
    np.savez(tmp_path / "o.npz", **{"enc/text": arr})
    with pytest.raises(InputError, match="holds object arrays") as info:
        load_inputs(tmp_path / "o.npz")
    assert "pickled data" not in str(info.value)


def test_npz_that_is_not_a_zip_is_refused(tmp_path) -> None:
    (tmp_path / "j.npz").write_bytes(b"this is not a zip file at all")
    with pytest.raises(InputError, match=r"is not a \.npz file \(not a zip archive\)"):
        load_inputs(tmp_path / "j.npz")


def test_npz_with_unequal_sample_counts_is_refused(tmp_path) -> None:
    np.savez(tmp_path / "u.npz", **{"enc/a": np.zeros((2, 3, 4)), "dec/b": np.zeros((3, 3, 4))})
    with pytest.raises(InputError, match="has 3 samples, the others 2"):
        load_inputs(tmp_path / "u.npz")


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload", [pickle.dumps({"enc/text": _Evil()}), os.urandom(256)], ids=["pickle", "junk"]
)
def test_pt_that_weights_only_refuses_is_one_line(tmp_path, payload) -> None:
    (tmp_path / "x.pt").write_bytes(payload)
    with pytest.raises(InputError, match=r"was refused by torch.load\(weights_only=True\)") as e:
        load_inputs(tmp_path / "x.pt")
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_pt_dict_of_tensors_loads(tmp_path) -> None:
    torch.save({"enc": {"text": torch.zeros(2, 3, 4)}, "dec": {"a": torch.ones(2, 1, 4)}},
               tmp_path / "ok.pt")  # fmt: skip
    got = load_inputs(tmp_path / "ok.pt")
    assert sorted(got) == ["dec/a", "enc/text"] and got["enc/text"].shape == (2, 3, 4)


def _rows(ids: list[int]) -> RowBatches:
    out = RowBatches()
    out.sample_ids = {ROW_ID: np.asarray(ids)}
    return out


def test_row_ids_go_to_capture_except_in_multi_process() -> None:
    assert row_ids([{"input_ids": torch.zeros(1, 2)}]) is None  # not rows of a file
    assert row_ids(_rows([0, 2, 3]))[ROW_ID].tolist() == [0, 2, 3]
    assert row_ids(_rows([0, 1, 2]), world_size=2) is None  # positions are the row ids
    with pytest.raises(ConfigError, match="skip rows"):
        row_ids(_rows([0, 2, 3]), world_size=2)
