"""Row policies: parsing, resolution on a layout, and captures that keep only some query rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.capture import Transformer
from attnscope.capture.job import capture
from attnscope.capture.policy import RowPolicy
from attnscope.errors import ConfigError, SelectionError
from attnscope.store import SideLayout, TokenLayout, open_archive, verify

from . import hf_models
from .ref_data import DEC, ENC, batches, reference_weights

LAYOUT = TokenLayout(encoder=SideLayout.from_lengths(ENC), decoder=SideLayout.from_lengths(DEC))


# -- parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("decoder:last", {"decoder": [6]}),
        ("decoder:last=4", {"decoder": [3, 4, 5, 6]}),
        ("decoder:every=3", {"decoder": [0, 3, 6]}),
        ("decoder:segment=traj", {"decoder": [3, 4, 5, 6]}),
        ("encoder:rows=0,5,9", {"encoder": [0, 5, 9]}),
        ("encoder:rows=9,0,9", {"encoder": [0, 9]}),
        (["decoder:last", "encoder:every=5"], {"encoder": [0, 5], "decoder": [6]}),
        ("decoder:last,encoder:rows=1,2", {"encoder": [1, 2], "decoder": [6]}),
        ({"decoder": [3, 4, 5]}, {"decoder": [3, 4, 5]}),
        ({"decoder": "last"}, {"decoder": [6]}),
        ({"encoder": 2}, {"encoder": [2]}),
    ],
)
def test_spellings_resolve_to_sorted_unique_rows(spec, want) -> None:
    got = RowPolicy.parse(spec).resolve(LAYOUT)
    assert {k: v.tolist() for k, v in got.items()} == want
    assert all(v.dtype == np.int64 for v in got.values())


@pytest.mark.parametrize(
    "spec", ["decoder:last=2", "decoder:every=4,encoder:rows=1,3", "decoder:segment=traj"]
)
def test_json_and_text_round_trip(spec) -> None:
    pol = RowPolicy.parse(spec)
    assert RowPolicy.from_json(pol.to_json()) == pol
    assert RowPolicy.parse(str(pol).split()) == pol


def test_segment_names_a_typed_group_kind_too() -> None:
    dec = SideLayout.from_lengths({"text": 2, "act_a": 2, "pad": 1, "act_b": 3})
    lay = TokenLayout(decoder=dec)
    lay = lay.with_groups({"act_a": {"kind": "action"}, "act_b": {"kind": "action"}})
    got = RowPolicy.parse("decoder:segment=action").resolve(lay)
    assert got["decoder"].tolist() == [2, 3, 5, 6, 7]
    assert RowPolicy.parse("decoder:segment=act_b").resolve(lay)["decoder"].tolist() == [5, 6, 7]
    with pytest.raises(SelectionError, match=r"no segment 'image'; its segments are \['text', "
                                             r"'act_a', 'pad', 'act_b'\] \(group kinds "
                                             r"\['action'\]\)"):  # fmt: skip
        RowPolicy.parse("decoder:segment=image").resolve(lay)


def test_no_policy_is_none() -> None:
    assert RowPolicy.parse(None) is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("middle:last", r"unknown side 'middle'"),
        ("decoder:first", r"unknown rule 'first'"),
        ("decoder:every=0", r"every needs a step >= 1, got 0"),
        ("decoder:last=0", r"last needs a count >= 1"),
        ("decoder:every=x", r"expected an integer"),
        ("decoder:segment", r"segment needs a value"),
        ("decoder", r"cannot parse 'decoder'"),
        ("decoder:last,decoder:every=2", r"given more than once"),
        ("encoder:rows=-1", r"negative"),
        ("", r"empty policy"),
        ({}, r"empty policy"),
        ({"decoder": [1.5]}, r"row indices or a rule"),
        (3, r"must be a spec string"),
    ],
)
def test_bad_spellings_are_one_config_error(spec, match) -> None:
    with pytest.raises(ConfigError, match=match):
        RowPolicy.parse(spec)


@pytest.mark.parametrize(
    ("spec", "layout", "match"),
    [
        ("decoder:segment=action", LAYOUT,
         r"no segment 'action'; its segments are \['text', 'traj'\]"),
        ("encoder:rows=3,10", LAYOUT,
         r"row\(s\) \[10\] out of range: the encoder axis has 10 rows"),
        ("decoder:last", TokenLayout(encoder=LAYOUT.encoder),
         r"no decoder side \(its sides: \['encoder'\]\)"),
        ("encoder:last=999", LAYOUT,
         r"'encoder:last=999' asks for more rows than the encoder axis has \(10\); "
         r"expected last=1..10"),
    ],
)  # fmt: skip
def test_resolution_errors_name_what_exists(spec, layout, match) -> None:
    with pytest.raises(SelectionError, match=match):
        RowPolicy.parse(spec).resolve(layout)


# -- capture of the reference model -------------------------------------------------------
@pytest.fixture
def model(small_model: Transformer) -> Transformer:
    return small_model


@pytest.mark.parametrize(
    ("spec", "opts"),
    [
        ("decoder:segment=traj", {}),
        ("decoder:last", {"heads": [3, 1]}),
        ("encoder:every=2", {"layers": [1], "kinds": ["self_attention"]}),
        ("decoder:last=2,encoder:rows=1,8", {"kinds": ["decoder/cross_attention"]}),
        ({"decoder": [0, 4]}, {"heads": [0, 2], "layers": [0]}),
    ],
)
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_kept_rows_equal_the_models_own_weights(model, tmp_path, spec, opts, suffix) -> None:
    data = batches()
    path = tmp_path / f"rows{suffix}"
    capture(model, data, path, rows=spec, dtype="float32", progress=False, **opts)
    ref = reference_weights(model, data)
    rows = RowPolicy.parse(spec).resolve(LAYOUT)
    heads = opts.get("heads", [0, 1, 2, 3])
    with open_archive(path) as a:
        assert a.arrays
        assert a.metadata["query_rows"] == {k: v.tolist() for k, v in rows.items()}
        for name in a.arrays:
            stack, _layer, kind = name.split("/")
            side = "encoder" if stack == "encoder" else "decoder"
            want = ref[name][:, heads]
            if side in rows:
                np.testing.assert_array_equal(a.query_rows(name), rows[side])
                want = want[:, :, rows[side]]
            else:
                assert a.query_rows(name) is None
            assert a[name].shape == (6, *want.shape[1:])
            np.testing.assert_allclose(a[name][:], want, atol=1e-6)
    assert verify(path).ok


def test_topk_of_kept_rows_equals_topk_of_the_full_capture(model, tmp_path) -> None:
    data = batches()
    capture(model, data, tmp_path / "full.zarr", topk=3, dtype="float32", progress=False)
    capture(model, data, tmp_path / "last.zarr", topk=3, dtype="float32", progress=False,
            rows="decoder:last=3", heads=[2])  # fmt: skip
    with open_archive(tmp_path / "full.zarr") as f, open_archive(tmp_path / "last.zarr") as a:
        for name in a.arrays:
            r = a.query_rows(name)
            full = f[name][:][:, [2]]
            if name.startswith("decoder"):
                assert r.tolist() == [4, 5, 6]
                full = full[:, :, r]
            np.testing.assert_array_equal(a[name][:], full)
            fv, fi, _ = f[name].topk_arrays()
            v, i, _ = a[name].topk_arrays()
            sel = fi[:, [2]] if r is None else fi[:, [2]][:, :, r]
            np.testing.assert_array_equal(i, sel)


def test_resume_with_another_policy_is_refused(model, tmp_path) -> None:
    data = batches(4)
    path = tmp_path / "r.zarr"
    capture(model, data[:2], path, rows="decoder:last", progress=False)
    for other, match in (
        ("decoder:last=2", r"resume: rows differ: archive has 'decoder:last', this run asks for "
                           r"'decoder:last=2'"),
        (None, r"resume: rows differ: archive has 'decoder:last', this run asks for all rows"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            capture(model, data, path, rows=other, resume=True, progress=False)
    s = capture(model, data, path, rows="decoder:last", resume=True, progress=False)
    assert s.committed == 8
    with open_archive(path) as a:
        assert a["decoder/0/self_attention"].shape == (8, 4, 1, 7)


def test_resume_of_a_full_archive_with_a_policy_is_refused(model, tmp_path) -> None:
    data = batches(3)
    capture(model, data[:1], tmp_path / "f.zarr", progress=False)
    with pytest.raises(ConfigError, match=r"rows differ: archive has all rows"):
        capture(model, data, tmp_path / "f.zarr", rows="decoder:last", resume=True,
                progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("decoder:segment=action", r"no segment 'action'; its segments are \['text', 'traj'\]"),
        ("decoder:rows=2,7", r"row\(s\) \[7\] out of range: the decoder axis has 7 rows"),
    ],
)
def test_policy_naming_what_the_model_lacks_writes_nothing(model, tmp_path, spec, match) -> None:
    with pytest.raises(SelectionError, match=match):
        capture(model, batches(), tmp_path / "x.zarr", rows=spec, progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_dry_run_counts_the_kept_rows(model, tmp_path) -> None:
    rep = capture(model, batches(), tmp_path / "d.zarr", rows="decoder:last", dtype="float32",
                  dry_run=True, progress=False)  # fmt: skip
    assert rep.bytes_per_sample["decoder/0/self_attention"] == 4 * 1 * 7 * 4
    assert rep.bytes_per_sample["encoder/0/self_attention"] == 4 * 10 * 10 * 4
    assert not (tmp_path / "d.zarr").exists()


# -- Hugging Face, padded batches ---------------------------------------------------------
def test_hf_padded_batches_keep_rows_of_the_padded_axis(tmp_path) -> None:
    """Two batches (7 and 5 tokens, one sample right-padded): rows index the 7-long axis;
    a kept row that is padding in a sample is stored as zeros and masked."""
    model = hf_models.make("bert")
    b1 = hf_models.batch_for("bert", model)
    b2 = {k: v[:, :5].clone() for k, v in hf_models.batch_for("bert", model, seed=1).items()}
    b2["attention_mask"][0, 3:] = 0
    path = tmp_path / "bert.zarr"
    capture(model, [b1, b2], path, rows="encoder:rows=0,4,6", dtype="float32",
            progress=False)  # fmt: skip
    with open_archive(path) as a:
        assert a.ragged
        for i, b in enumerate((b1, b2)):
            want = hf_models.as_stored(model, b, hf_models.reference_attentions(model, b))
            for name in a.arrays:
                got = a[name][2 * i : 2 * i + 2]
                assert got.shape == (2, 2, 3, 7)
                full = np.zeros((2, 2, 7, 7), dtype=np.float32)
                t = want[name].shape[2]
                full[:, :, :t, :t] = want[name]
                np.testing.assert_allclose(got, full[:, :, [0, 4, 6]], atol=1e-6)
        x = a["encoder/0/self_attention"]
        np.testing.assert_array_equal(x.valid(1)[0], [True, True, False])  # 5 real tokens
        np.testing.assert_array_equal(x.valid(2)[0], [True, False, False])  # 3 real tokens
    assert verify(path).ok


def test_hf_last_row_of_a_padded_axis(tmp_path) -> None:
    model = hf_models.make("gpt2")
    b = hf_models.batch_for("gpt2", model)
    capture(model, [b], tmp_path / "g.zarr", rows={"decoder": "last"}, dtype="float32",
            progress=False)  # fmt: skip
    want = hf_models.as_stored(model, b, hf_models.reference_attentions(model, b))
    with open_archive(tmp_path / "g.zarr") as a:
        for name in a.arrays:
            assert a.query_rows(name).tolist() == [6]
            np.testing.assert_allclose(a[name][:], want[name][:, :, [6]], atol=1e-6)
        # sample 1 has 5 real tokens: its row 6 is padding, stored as zeros
        assert not a["decoder/0/self_attention"][1].any()


def test_rows_option_is_checked_before_the_model_runs(model, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"every needs a step >= 1"):
        capture(model, batches(), tmp_path / "x.zarr", rows="decoder:every=0", progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_generation_keeps_the_policy_rows_of_the_final_sequence(tmp_path) -> None:
    pytest.importorskip("transformers")
    model = hf_models.make("gpt2")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padded prompts, as generate expects
    prompts = {"input_ids": ids, "attention_mask": mask}
    gen = dict(max_new_tokens=3)
    capture(model, [prompts], tmp_path / "full.zarr", generate=gen, dtype="float32",
            progress=False)  # fmt: skip
    capture(model, [prompts], tmp_path / "last.zarr", generate=gen, dtype="float32",
            progress=False, rows="decoder:last=3")  # fmt: skip
    with open_archive(tmp_path / "full.zarr") as f, open_archive(tmp_path / "last.zarr") as a:
        for name in f.arrays:
            assert a.query_rows(name).tolist() == [6, 7, 8]  # the generated tokens' rows
            np.testing.assert_array_equal(a[name][:], f[name][:][:, :, 6:9])
