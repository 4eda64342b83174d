"""Capture options: checked once, before the model runs, each refusal one line."""

from __future__ import annotations

import pytest
import torch

from attnscope.capture.job import capture
from attnscope.capture.options import CaptureOptions, resolve_device
from attnscope.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"heads": [0, 0]}, "heads [0, 0] repeat [0]"),
        ({"layers": [1, 0, 1]}, "layers [1, 0, 1] repeat [1]"),
        ({"kinds": ["self_attention", "self_attention"]}, "repeat ['self_attention']"),
        ({"heads": "01"}, "heads must be a list"),
        ({"heads": [0.5]}, "head indices must be integers, got 0.5"),
        ({"queue_depth": 0}, "queue_depth must be an integer >= 1, got 0"),
        ({"topk": True}, "topk must be an integer >= 1, got True"),
        ({"format": "npz"}, "format 'npz' is not supported"),
        ({"rank": 1}, "rank and world_size go together"),
        ({"resume": True, "overwrite": True}, "resume and overwrite contradict each other"),
        ({"heads": []}, "heads is empty: it would capture nothing"),
        ({"layers": ()}, "layers is empty"),
        ({"heads": [2, -1]}, "heads [2, -1] holds a negative index"),
    ],
)
def test_bad_options_are_refused(kwargs, needle) -> None:
    with pytest.raises(ConfigError) as info:
        CaptureOptions(**kwargs)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_selections_become_tuples_of_ints() -> None:
    import numpy as np

    o = CaptureOptions(heads=np.array([3, 1]), layers=[0, "decoder/1/cross_attention"])
    assert o.heads == (3, 1) and all(type(h) is int for h in o.heads)
    assert o.layers == (0, "decoder/1/cross_attention")


def test_duplicate_heads_store_nothing(small_model, make_batches, tmp_path) -> None:
    with pytest.raises(ConfigError, match="repeat"):
        capture(small_model, make_batches(1), tmp_path / "d.zarr", heads=[0, 0], progress=False)
    assert not (tmp_path / "d.zarr").exists()


def test_bogus_device_is_one_line() -> None:
    with pytest.raises(ConfigError, match="device 'bogus' is not a torch device") as info:
        resolve_device("bogus")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_cuda_is_one_line(small_model, make_batches, tmp_path) -> None:
    with pytest.raises(ConfigError, match="device 'cuda' is not available") as info:
        capture(small_model, make_batches(1), tmp_path / "c.zarr", device="cuda", progress=False)
    assert "\n" not in str(info.value) and "use 'cpu'" in str(info.value)


def test_cpu_device_resolves() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


def test_resume_with_another_format_is_refused(small_model, make_batches, tmp_path) -> None:
    path = tmp_path / "run.zarr"
    capture(small_model, make_batches(1), path, progress=False)
    with pytest.raises(ConfigError, match="resume: format differs: archive .* is zarr, this run"):
        capture(small_model, make_batches(2), path, resume=True, format="hdf5", progress=False)


def test_multi_process_hdf5_is_refused_before_creating_anything(
    small_model, make_batches, tmp_path
) -> None:
    path = tmp_path / "run.h5"
    with pytest.raises(ConfigError, match="multi-process capture .* needs a Zarr directory"):
        capture(small_model, make_batches(2), path, rank=0, world_size=2, progress=False)
    assert list(tmp_path.iterdir()) == []
