"""Typed token groups in the layout: validation, JSON round trip, old layouts, archives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attnscope.errors import ConfigError
from attnscope.store import ArchiveWriter, open_archive
from attnscope.store.layout import SideLayout, TokenGroup, TokenLayout

SPEC = {
    "agentview_image": {"kind": "image", "grid": [3, 3], "camera": "agentview"},
    "robot0_eef_pos": "state",
    "text": {"kind": "text"},
    "traj": {"kind": "trajectory", "steps": 2},
}


def _layout() -> TokenLayout:
    enc = SideLayout.from_lengths({"text": 2, "robot0_eef_pos": 1, "agentview_image": 9})
    dec = SideLayout.from_lengths({"text": 3, "traj": 4})
    return TokenLayout(enc, dec)


def test_groups_typed_and_json_round_trip() -> None:
    lay = _layout().with_groups(SPEC)
    enc, dec = lay.encoder, lay.decoder
    assert enc.groups["agentview_image"] == TokenGroup("image", (3, 3), "agentview")
    assert enc.groups["robot0_eef_pos"].kind == "state"
    assert enc.groups["text"].kind == "text" and dec.groups["text"].kind == "text"
    assert dec.groups["traj"].steps == 2
    doc = json.loads(json.dumps(lay.to_json()))
    assert doc["encoder"]["groups"]["agentview_image"] == {
        "kind": "image",
        "grid": [3, 3],
        "camera": "agentview",
    }
    assert TokenLayout.from_json(doc) == lay


def test_untyped_by_default_and_old_layout_json_reads_untyped() -> None:
    lay = _layout()
    assert lay.encoder.groups == {} and "groups" not in lay.to_json()["encoder"]
    old = {"encoder": {"segments": [["agentview_image", 0, 9]]}, "decoder": None}
    got = TokenLayout.from_json(old)
    assert got.encoder.groups == {} and got.encoder.segments[0].group is None


def test_old_reader_ignores_the_groups_key() -> None:
    doc = _layout().with_groups(SPEC).to_json()
    # what a reader before typed groups did: segments and labels only
    old = SideLayout(
        tuple(
            SideLayout.from_lengths({n: b - a for n, a, b in doc["encoder"]["segments"]}).segments
        ),
        tuple(doc["encoder"]["labels"]),
    )
    assert old.length == 12


def test_one_side_only_with_prefix() -> None:
    lay = _layout().with_groups({"decoder/text": "text"})
    assert "text" in lay.decoder.groups and "text" not in lay.encoder.groups


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"agentview_image": {"kind": "image", "grid": [2, 4]}}, "rows * cols == tokens"),
        ({"agentview_image": {"kind": "image"}}, "grid=(rows, cols)"),
        ({"agentview_image": "picture"}, "unknown token group kind 'picture'"),
        ({"nope": "state"}, "names no segment"),
        ({"robot0_eef_pos": {"kind": "state", "grid": [1, 1]}}, "image groups only"),
        ({"traj": {"kind": "trajectory", "steps": 3}}, "multiple of steps=3"),
        ({"text": {"kind": "text", "colour": 1}}, "unknown key(s) ['colour']"),
    ],
)
def test_bad_group_specs_refused_in_one_line(spec: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        _layout().with_groups(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_groups_and_episode_ids_stored_in_archive(tmp_path: Path) -> None:
    lay = _layout().with_groups(SPEC)
    rng = np.random.default_rng(0)
    w = rng.random((2, 1, 12, 12)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    with ArchiveWriter.create(tmp_path / "a.zarr", lay) as wr:
        wr.append(
            {"encoder/0/self_attention": w},
            sample_ids={"episode": np.array([4, 4]), "step": np.array([0, 1])},
        )
    with open_archive(tmp_path / "a.zarr") as a:
        assert a.layout == lay
        assert a.sample_layout(1).encoder.groups["agentview_image"].grid == (3, 3)
        np.testing.assert_array_equal(a.sample_ids["step"], [0, 1])
