"""capture(..., dry_run=True): one real batch measured, nothing written at the destination."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple

import pytest
from click.testing import CliRunner

from attnscope.capture import capture
from attnscope.capture.dryrun import DryRunReport
from attnscope.cli import cli
from attnscope.errors import ConfigError
from attnscope.store.backends import location


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _on_disk(path: str) -> tuple[int, int]:
    """(bytes, files) of a Zarr directory, lock folders left out."""
    size = files = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".attnscope")]
        for n in names:
            size += os.path.getsize(os.path.join(root, n))
            files += 1
    return size, files


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_dry_run_writes_nothing_and_predicts_the_real_archive(
    tmp_path, small_model, make_batches, suffix
):
    batches = make_batches(4, 2)
    dest = tmp_path / "out" / ("run" + suffix)
    before = _files(tmp_path)
    rep = capture(small_model, batches, dest, dry_run=True, progress=False, heads=[0, 2])
    assert isinstance(rep, DryRunReport)
    assert _files(tmp_path) == before  # no folder, no lock, no file
    assert rep.samples == 8 and rep.batches == 4 and rep.batch_size == 2
    # float16, 2 heads: encoder self-attention is (2, 10, 10) per sample
    assert rep.bytes_per_sample["encoder/0/self_attention"] == 2 * 10 * 10 * 2
    assert rep.bytes_uncompressed == 8 * sum(rep.bytes_per_sample.values())
    capture(small_model, batches, dest, progress=False, heads=[0, 2])
    if suffix == ".zarr":
        size, files = _on_disk(str(dest))
        # one commit-log document per commit; batches committed together share one
        assert files <= rep.files <= files + rep.batches - 1
        assert abs(rep.bytes_compressed - size) <= 0.1 * size
    else:
        assert rep.files == 1
        size = dest.stat().st_size
        assert abs(rep.bytes_compressed - size) <= 0.25 * size
    assert rep.chunks > 0
    text = rep.format()
    assert "nothing written" in text and "encoder/0/self_attention" in text


def test_dry_run_of_an_unsized_source_uses_total_or_reports_per_batch(
    tmp_path, small_model, make_batches
):
    batches = make_batches(3, 2)
    rep = capture(small_model, iter(batches), tmp_path / "a.zarr", dry_run=True, progress=False)
    assert rep.per_batch_only and rep.samples is None
    assert rep.bytes_uncompressed == 2 * sum(rep.bytes_per_sample.values())
    assert "per batch" in rep.format()
    rep = capture(
        small_model, iter(batches), tmp_path / "a.zarr", dry_run=True, total=6, progress=False
    )
    assert rep.samples == 6 and rep.batches == 3
    assert not (tmp_path / "a.zarr").exists()


def test_dry_run_warns_when_the_destination_lacks_space(
    tmp_path, small_model, make_batches, monkeypatch
):
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(location.shutil, "disk_usage", lambda p: usage(10, 9, 1))
    rep = capture(small_model, make_batches(2, 2), tmp_path / "a.zarr", dry_run=True,
                  progress=False)  # fmt: skip
    assert rep.warning is not None and rep.warning.startswith("warning:")
    assert rep.format().splitlines()[-1] == rep.warning
    monkeypatch.setattr(location.shutil, "disk_usage", real)
    rep = capture(small_model, make_batches(2, 2), tmp_path / "a.zarr", dry_run=True,
                  progress=False)  # fmt: skip
    assert rep.warning is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_dry_run_on_an_unwritable_path_is_one_clear_error(tmp_path, small_model, make_batches):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not a writable directory") as e:
            capture(small_model, make_batches(1, 2), ro / "sub" / "a.zarr", dry_run=True,
                    progress=False)  # fmt: skip
        assert "\n" not in str(e.value) and "ro" in str(e.value)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_dry_run_path_that_is_a_file_parent_is_refused(tmp_path, small_model, make_batches):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a writable directory"):
        capture(small_model, make_batches(1, 2), tmp_path / "f" / "a.zarr", dry_run=True,
                progress=False)  # fmt: skip


def test_dry_run_does_not_combine_with_resume(tmp_path, small_model, make_batches):
    with pytest.raises(ConfigError, match="dry_run"):
        capture(small_model, make_batches(1, 2), tmp_path / "a.zarr", dry_run=True, resume=True)


def test_cli_dry_run_prints_the_report_and_writes_nothing(tmp_path):
    out = tmp_path / "run.zarr"
    r = CliRunner().invoke(
        cli, ["capture", "--batches", "3", "--batch-size", "2", "--out", str(out),
              "--dry-run", "--device", "cpu", "--no-progress"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "dry run: nothing written" in r.output and "6 samples in 3 batches" in r.output
    assert list(tmp_path.iterdir()) == []
