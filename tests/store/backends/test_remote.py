"""Archives on object storage (``store/remote.py``): a local S3 server (moto) per module.

Round trips (dense, ragged), lazy reads, capture -> analyze -> render from S3 equal to the
same run on local disk, kill -9 during a capture to S3 and resume, the one-line errors
(missing bucket, no credentials, HDF5 / zip at a URL) and ``memory://`` URLs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from click.testing import CliRunner  # noqa: E402
from s3_testlib import BUCKET, KEYS, moto_s3  # noqa: E402

from attnscope.cli import cli  # noqa: E402
from attnscope.errors import (  # noqa: E402
    ArchiveCorruptError,
    ArchiveLockedError,
    ArchiveNotFoundError,
    ConfigError,
    MissingExtraError,
)
from attnscope.store import (  # noqa: E402
    ArchiveWriter,
    SideLayout,
    TokenLayout,
    info,
    open_archive,
    verify,
)
from attnscope.store.backends import remote  # noqa: E402

_ref = importlib.util.spec_from_file_location(
    "capture_ref_data", Path(__file__).parents[2] / "capture" / "ref_data.py"
)
ref_data = importlib.util.module_from_spec(_ref)
_ref.loader.exec_module(ref_data)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on a free local port, one bucket, options registered for s3://."""
    with moto_s3() as s3:
        yield s3.endpoint


@pytest.fixture
def url(endpoint) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}.zarr"


def _softmax(rng, shape) -> np.ndarray:
    x = rng.random(shape).astype(np.float32) + 0.01
    return x / x.sum(-1, keepdims=True)


LAYOUT = TokenLayout(
    encoder=SideLayout.from_lengths({"text": 5, "image": 3}),
    decoder=SideLayout.from_lengths({"act": 4}),
)


def _write(path, ragged: bool, batches: int = 3) -> None:
    rng = np.random.default_rng(7)
    opts = {"max_lengths": {"encoder": 8}} if ragged else {}
    with ArchiveWriter.create(path, LAYOUT, **opts) as w:
        for i in range(batches):
            s = 8 - i if ragged else 8
            w.append(
                {"encoder/0/self_attention": _softmax(rng, (2, 2, s, s)),
                 "decoder/0/cross_attention": _softmax(rng, (2, 2, 4, s))},
                sample_ids={"step": np.arange(2 * i, 2 * i + 2)},
            )  # fmt: skip


@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_roundtrip_on_s3_equals_local(url, tmp_path, ragged) -> None:
    local = tmp_path / "local.zarr"
    _write(url, ragged)
    _write(local, ragged)
    with open_archive(url) as a, open_archive(local) as b:
        assert a.n_samples == b.n_samples == 6 and a.ragged == ragged
        assert a.identity()["archive"] == url
        for name in b.arrays:
            np.testing.assert_array_equal(a[name][:], b[name][:])
        if ragged:
            np.testing.assert_array_equal(a.masks("encoder"), b.masks("encoder"))
        np.testing.assert_array_equal(a.sample_ids["step"], np.arange(6))
    rep = verify(url)
    assert rep.ok, rep.problems
    assert info(url)["n_samples"] == 6
    # resume appends after the committed samples
    with ArchiveWriter.open(url) as w:
        assert w.committed == 6
        w.append({"encoder/0/self_attention": _softmax(np.random.default_rng(0), (2, 2, 8, 8)),
                  "decoder/0/cross_attention": _softmax(np.random.default_rng(1), (2, 2, 4, 8))},
                 sample_ids={"step": np.array([6, 7])})  # fmt: skip
    with open_archive(url) as a:
        assert a.n_samples == 8


def test_one_head_read_fetches_only_its_chunk(url) -> None:
    t, h, n = 384, 4, 2  # 384 x 384 float16 = 288 KiB: one chunk per (sample, head)
    lay = TokenLayout(encoder=SideLayout.from_lengths({"tok": t}))
    x = np.empty((n, h, t, t), np.float16)
    for i in range(n):
        for j in range(h):
            x[i, j] = i * 16 + j
    with ArchiveWriter.create(url, lay, compressor="none", validate=False) as w:
        w.append({"encoder/0/self_attention": x})
    with open_archive(url) as a:
        arr = a["encoder/0/self_attention"]
        assert arr.chunks == (1, 1, t, t)
        b = a._backend
        g0, b0 = b.chunk_reads, b.bytes_read
        m = arr[1, 2]
        assert np.all(m == 1 * 16 + 2)
        assert b.chunk_reads - g0 == 1  # one GET, of the one chunk holding that head
        assert b.bytes_read - b0 < 2 * t * t * 2


def test_capture_to_s3_then_analyze_render_equal_local(url, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from attnscope.analysis import analyze
    from attnscope.capture import Transformer, capture
    from attnscope.render.batch import render_archive

    data = ref_data.batches(3)
    local = tmp_path / "local.zarr"
    torch.manual_seed(0)
    dry = capture(Transformer(32, 16, 4, 2, 2).eval(), data, url, dry_run=True, progress=False)
    assert dry.free_bytes is None and dry.warning is None and not remote.exists(url)
    for where in (url, local):
        torch.manual_seed(0)
        m = Transformer(32, 16, 4, 2, 2).eval()
        s = capture(m, data, where, progress=False)
        assert s.committed == 6
    res = CliRunner().invoke(cli, ["verify", url])
    assert res.exit_code == 0 and res.output.strip().endswith(": ok"), res.output
    res = CliRunner().invoke(cli, ["info", url, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["n_samples"] == 6, res.output
    # the S3 side through the CLI, the local side through the library
    tabs = {"s3": tmp_path / "tables-s3", "local": tmp_path / "tables-local"}
    res = CliRunner().invoke(cli, ["analyze", url, "--out", str(tabs["s3"]), "--no-progress"])
    assert res.exit_code == 0, res.output
    analyze(local, tabs["local"], progress=False)
    names = sorted(p.name for p in tabs["local"].glob("*.parquet"))
    assert names and names == sorted(p.name for p in tabs["s3"].glob("*.parquet"))
    for name in names:
        got, want = pd.read_parquet(tabs["s3"] / name), pd.read_parquet(tabs["local"] / name)
        # the fingerprint hashes the root metadata, which records when and where each
        # capture ran; every computed column must be equal
        ident = [c for c in want.columns if c.startswith("archive")]
        pd.testing.assert_frame_equal(got.drop(columns=ident), want.drop(columns=ident))
    figs = {"s3": tmp_path / "figs-s3", "local": tmp_path / "figs-local"}
    res = CliRunner().invoke(cli, ["render", url, "--out", str(figs["s3"]), "--layers", "0",
                                   "--heads", "0", "--what", "heatmap", "--workers", "1",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    render_archive(local, figs["local"], layers=[0], heads=[0], what=["heatmap"],
                   progress=False, workers=1)  # fmt: skip
    got = {p.relative_to(figs["s3"]): p for p in figs["s3"].rglob("*.png")}
    want = {p.relative_to(figs["local"]): p for p in figs["local"].rglob("*.png")}
    assert want and got.keys() == want.keys()
    for k in want:
        assert got[k].read_bytes() == want[k].read_bytes(), k


def _committed(url: str) -> int:
    """The main writer's committed count, from its commit record alone (one GET)."""
    fs, root = remote.filesystem(url)
    try:
        doc = json.loads(fs.cat_file(f"{root}/_commits/main/zarr.json"))
    except FileNotFoundError:
        return 0
    return int(doc["attributes"]["attnscope"]["committed"])


def test_kill9_during_capture_to_s3_then_resume(url, endpoint, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from attnscope.capture import Transformer, capture

    enc, dec = ref_data.ENC, ref_data.DEC
    script = textwrap.dedent(f"""
        import time, torch
        from attnscope.capture import Transformer, capture
        from attnscope.capture.synthetic import synthetic_batches
        torch.manual_seed(0)
        m = Transformer(32, 16, 4, 2, 2).eval()
        def slow():
            for i, b in enumerate(synthetic_batches(1000, 2, 32, enc={enc!r}, dec={dec!r})):
                if i == 3:
                    print("ready", flush=True)
                yield b
                time.sleep(0.05)
        capture(m, slow(), {url!r}, progress=False)
    """)
    env = {**os.environ, remote.ENV_OPTIONS: json.dumps({"endpoint_url": endpoint, **KEYS})}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60  # a guard against a hang, not a timing assertion
        while _committed(url) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)  # kill only once two batches are committed (the writer lags)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with open_archive(url) as a:
        n = a.n_samples
        assert n >= 4 and n % 2 == 0
    # the killed writer's lease object is stale (its pid is dead here): resume takes over
    assert remote.keys(url + "/.attnscope-locks") == ["all.json"]
    data = ref_data.batches(n // 2 + 2)
    torch.manual_seed(0)
    s = capture(Transformer(32, 16, 4, 2, 2).eval(), data, url, resume=True, progress=False)
    assert s.committed == n + 4
    local = tmp_path / "ref.zarr"
    torch.manual_seed(0)
    capture(Transformer(32, 16, 4, 2, 2).eval(), data, local, progress=False)
    with open_archive(url) as a, open_archive(local) as b:
        assert a.n_samples == b.n_samples == n + 4
        for name in b.arrays:
            np.testing.assert_array_equal(a[name][:], b[name][:])
    assert verify(url).ok
    assert not remote.keys(url + "/.attnscope-locks")


def test_kill_between_data_and_commit_on_s3_hides_torn_batch(url, endpoint, monkeypatch):
    """The store's own crash test on S3: SIGKILL after a batch's chunk PUTs, before the PUT
    of its commit record (chunks of 4 samples, batches of 6: partial chunks rewritten)."""
    from ..test_store_crash_lock_verify import check_after_crash, run_child

    monkeypatch.setenv(remote.ENV_OPTIONS, json.dumps({"endpoint_url": endpoint, **KEYS}))
    proc = run_child(url, die_at=3)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert out.split() == ["6", "12", "18"]
    assert _committed(url) == 18
    check_after_crash(url, 3)


def test_second_writer_on_s3_is_refused(url) -> None:
    _write(url, False, batches=1)
    with ArchiveWriter.open(url):
        with pytest.raises(ArchiveLockedError, match=f"pid {os.getpid()}"):
            ArchiveWriter.open(url)
    with ArchiveWriter.open(url) as w:  # released on close
        assert w.committed == 2
    assert not remote.keys(url + "/.attnscope-locks")


def test_missing_bucket_is_one_clear_error(endpoint) -> None:
    bad = "s3://attnscope-no-such-bucket/run.zarr"
    with pytest.raises(ArchiveNotFoundError, match="bucket 'attnscope-no-such-bucket'.*exist"):
        open_archive(bad)
    with pytest.raises(ArchiveNotFoundError, match="does not exist"):
        ArchiveWriter.create(bad, LAYOUT)
    res = CliRunner().invoke(cli, ["info", bad])
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "attnscope-no-such-bucket" in lines[0], res.stderr


def test_no_credentials_is_one_clear_error_and_loses_nothing(url, monkeypatch) -> None:
    _write(url, False, batches=1)
    for k in list(os.environ):
        if k.startswith("AWS_") and k not in ("AWS_EC2_METADATA_DISABLED", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    remote.set_storage_options(url, {"key": None, "secret": None})
    try:
        for call in (lambda: open_archive(url), lambda: ArchiveWriter.open(url),
                     lambda: ArchiveWriter.create(url, LAYOUT, overwrite=True)):  # fmt: skip
            with pytest.raises(ConfigError, match="no credentials for 's3://"):
                call()
    finally:
        remote.set_storage_options(url, None)
    with open_archive(url) as a:  # nothing committed was lost
        assert a.n_samples == 2


def test_hdf5_and_zip_urls_are_refused(endpoint, tmp_path) -> None:
    for bad in (f"s3://{BUCKET}/run.h5", "memory://x/run.hdf5"):
        with pytest.raises(ConfigError, match="HDF5 archives are local files only"):
            ArchiveWriter.create(bad, LAYOUT)
        with pytest.raises(ConfigError, match="local files only"):
            open_archive(bad)
    with pytest.raises(ConfigError, match="HDF5 archives are local files only"):
        ArchiveWriter.create(f"s3://{BUCKET}/run.zarr", LAYOUT, format="hdf5")
    with pytest.raises(ConfigError, match="zip archives are local files only"):
        ArchiveWriter.create(f"s3://{BUCKET}/run.zarr.zip", LAYOUT)


def test_unknown_protocol_and_missing_backend(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="unknown URL protocol 'nosuch'"):
        open_archive("nosuch://b/run.zarr")

    def no_gcsfs(url, **options):  # what fsspec raises when gcsfs is not installed
        raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr("fsspec.core.url_to_fs", no_gcsfs)
    with pytest.raises(MissingExtraError, match="gcsfs"):
        open_archive("gs://b/run.zarr")


def test_memory_url_roundtrip_resume_and_overwrite() -> None:
    mem = f"memory://attnscope/{uuid.uuid4().hex[:8]}.zarr"
    _write(mem, True, batches=2)
    with ArchiveWriter.open(mem) as w:
        assert w.committed == 4
    with pytest.raises(ConfigError, match="already exists"):
        ArchiveWriter.create(mem, LAYOUT)
    with ArchiveWriter.create(mem, LAYOUT, overwrite=True) as w:
        w.append({"encoder/0/self_attention": _softmax(np.random.default_rng(0), (1, 2, 8, 8))})
    with open_archive(mem) as a:
        assert a.n_samples == 1 and not a.ragged
    assert verify(mem).ok


def test_file_url_is_a_local_path(tmp_path) -> None:
    _write(f"file://{tmp_path}/f.zarr", False, batches=1)
    assert (tmp_path / "f.zarr" / "zarr.json").is_file()
    with open_archive(tmp_path / "f.zarr") as a:
        assert a.n_samples == 2


def test_storage_options_from_env_and_prefixes(monkeypatch) -> None:
    # gs:// here: the module's server registered options for every s3:// URL
    monkeypatch.setenv(remote.ENV_OPTIONS, json.dumps({"anon": False, "endpoint_url": "a"}))
    remote.set_storage_options("gs://attnscope-opts/", {"endpoint_url": "b"})
    remote.set_storage_options("gs://attnscope-opts/deep/", {"endpoint_url": "c"})
    try:
        assert remote.storage_options("gs://attnscope-opts/x.zarr") == {
            "anon": False, "endpoint_url": "b"}
        assert remote.storage_options("gs://attnscope-opts/deep/x.zarr")["endpoint_url"] == "c"
        assert remote.storage_options("gs://other/x.zarr")["endpoint_url"] == "a"
    finally:
        remote.set_storage_options("gs://attnscope-opts/", None)
        remote.set_storage_options("gs://attnscope-opts/deep/", None)
    monkeypatch.setenv(remote.ENV_OPTIONS, "{not json")
    with pytest.raises(ConfigError, match=remote.ENV_OPTIONS):
        remote.storage_options("s3://b/x.zarr")
    with pytest.raises(ConfigError, match="names no bucket"):
        open_archive("s3:///run.zarr")
    with pytest.raises(ConfigError, match="is not a URL"):
        remote.set_storage_options("bucket/", {})
    monkeypatch.delenv(remote.ENV_OPTIONS)
    remote.set_storage_options("s3://attnscope-badopts/", {"endpoint": "x"})  # endpoint_url
    try:
        with pytest.raises(ConfigError, match=r"bad storage options \[.*'endpoint'"):
            open_archive("s3://attnscope-badopts/run.zarr")
    finally:
        remote.set_storage_options("s3://attnscope-badopts/", None)


# -- review fixes: half-created groups, scoped credentials, URL forms ---------------------
def _bare_group(path: str) -> None:
    """What a writer killed between creating the Zarr group and writing its root metadata
    left (two writes before): a root zarr.json without attnscope attributes, a lock."""
    import zarr

    store = remote.open_store(path, read_only=False) if remote.is_url(path) else path
    zarr.open_group(store=store, mode="w", zarr_format=3)
    if remote.is_url(path):
        fs, root = remote.filesystem(path)
        fs.pipe_file(f"{root}/.attnscope-locks/stale.txt", b"x")
    else:
        os.makedirs(os.path.join(path, ".attnscope-locks"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_writes_group_and_root_meta_in_one_write(where, request, tmp_path, monkeypatch):
    path = str(tmp_path / "a.zarr") if where == "local" else request.getfixturevalue("url")
    from attnscope.store.backends import zarr_store as _zarr

    def killed(self, meta):  # a kill -9 between a group PUT and a root-metadata PUT
        raise RuntimeError("killed before the root metadata")

    monkeypatch.setattr(_zarr.ZarrBackend, "write_root_meta", killed)
    with ArchiveWriter.create(path, LAYOUT) as w:
        assert w.committed == 0
    monkeypatch.undo()
    with ArchiveWriter.open_or_create(path, LAYOUT) as w:
        w.append({"encoder/0/self_attention": _softmax(np.random.default_rng(0), (1, 2, 8, 8))})
    with open_archive(path) as a:
        assert a.n_samples == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bare_group_left_by_killed_writer_is_resumed_or_overwritten(where, request, tmp_path):
    path = str(tmp_path / "a.zarr") if where == "local" else request.getfixturevalue("url")
    x = _softmax(np.random.default_rng(0), (1, 2, 8, 8))
    _bare_group(path)
    with ArchiveWriter.open_or_create(path, LAYOUT) as w:  # resume starts fresh
        w.append({"encoder/0/self_attention": x})
    _bare_group(path + "2")
    with ArchiveWriter.create(path + "2", LAYOUT, overwrite=True) as w:
        w.append({"encoder/0/self_attention": x})
    _bare_group(path + "3")
    with ArchiveWriter.create(path + "3", LAYOUT) as w:  # not "already exists" either
        w.append({"encoder/0/self_attention": x})
    for p in (path, path + "2", path + "3"):
        with open_archive(p) as a:
            assert a.n_samples == 1


def test_prefix_scoped_credentials_are_not_a_missing_bucket(url, monkeypatch) -> None:
    """Credentials allowed only under a prefix get 403 on HeadBucket / GetBucketLocation
    (simulated: moto does not evaluate IAM conditions); a denied listing is access denied."""
    import s3fs.core

    orig = s3fs.core.S3FileSystem._call_s3
    denied = {"head_bucket", "get_bucket_location"}

    async def scoped(self, method, *a, **kw):
        if method in denied:
            raise PermissionError("Access Denied (simulated prefix-scoped IAM policy)")
        return await orig(self, method, *a, **kw)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", scoped)
    _write(url, False, batches=1)
    with open_archive(url) as a:
        assert a.n_samples == 2
    denied.add("list_objects_v2")
    other = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}.zarr"
    with pytest.raises(ConfigError, match=f"access to '{other}' denied"):
        open_archive(other)


def test_chained_url_is_refused_not_written_locally(endpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    chained = f"simplecache::s3://{BUCKET}/chained.zarr"
    assert remote.is_url(chained) and remote.is_url("zip::memory://x.zip")
    for call in (lambda: ArchiveWriter.create(chained, LAYOUT), lambda: open_archive(chained)):
        with pytest.raises(ConfigError, match=r"chained fsspec URL; expected .*'s3://"):
            call()
    assert not list(tmp_path.iterdir())


def test_file_url_out_folder_is_its_local_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(str(tmp_path / "a.zarr"), False, batches=1)
    res = CliRunner().invoke(cli, ["analyze", f"file://{tmp_path}/a.zarr", "--out",
                                   f"file://{tmp_path}/tables", "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tables").is_dir() and not (tmp_path / "file:").exists()


def test_storage_option_prefixes_match_path_components() -> None:
    remote.set_storage_options("gs://lab", {"key": "LAB"})
    remote.set_storage_options("gs://b/run.zarr/", {"key": "K"})
    remote.set_storage_options("GS://c/", {"key": "C"})
    try:
        assert "key" not in remote.storage_options("gs://lab-public/run.zarr")
        assert remote.storage_options("gs://lab/run.zarr")["key"] == "LAB"
        assert remote.storage_options("gs://lab")["key"] == "LAB"
        assert remote.storage_options("gs://b/run.zarr")["key"] == "K"
        assert remote.storage_options("gs://b/run.zarr/.attnscope-locks")["key"] == "K"
        assert "key" not in remote.storage_options("gs://b/run.zarr2")
        assert remote.storage_options("gs://c/x.zarr")["key"] == "C"
    finally:
        for p in ("gs://lab", "gs://b/run.zarr/", "GS://c/"):
            remote.set_storage_options(p, None)


def test_upper_case_scheme_is_the_same_url(url) -> None:
    _write(url, False, batches=1)
    upper = "S3" + url[2:]
    assert remote.fspath(upper + "/") == url
    with open_archive(upper) as a:
        assert a.n_samples == 2


def test_missing_aws_profile_is_one_clear_error(url, monkeypatch) -> None:
    import s3fs

    _write(url, False, batches=1)
    for k in list(os.environ):
        if k.startswith("AWS_") and k not in ("AWS_EC2_METADATA_DISABLED", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_PROFILE", "attnscope-no-such-profile")
    remote.set_storage_options(url, {"key": None, "secret": None})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ConfigError, match="no credentials for 's3://.*'attnscope-no-such-p"):
            open_archive(url)
        res = CliRunner().invoke(cli, ["info", url])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and "no credentials" in lines[0], res.stderr
    finally:
        remote.set_storage_options(url, None)
        s3fs.S3FileSystem.clear_instance_cache()


def test_swapped_chunks_on_s3_are_refused_by_verify_and_by_reads(url):
    """The commit log binds each chunk's place on object storage too."""
    _write(url, ragged=False)
    assert verify(url).ok
    fs, root = remote.filesystem(url)
    a, b = (f"{root}/encoder/0/self_attention/c/{i}/0/0/0" for i in (0, 1))
    blob_a, blob_b = fs.cat_file(a), fs.cat_file(b)
    assert blob_a != blob_b
    fs.pipe_file(a, blob_b)
    fs.pipe_file(b, blob_a)
    with open_archive(url) as arc:
        with pytest.raises(ArchiveCorruptError, match="differs from what commit"):
            arc["encoder/0/self_attention"][0:2]
    rep = verify(url)
    assert not rep.ok and any("digest mismatch" in p for p in rep.problems), rep.problems


def test_a_group_commit_on_s3_keeps_every_sample_id(url, monkeypatch):
    """Boxes of one array that share a chunk (sample ids, 4096 per chunk), written in one
    group commit through zarr's codec pipeline (every array on object storage), go one
    after another: concurrent, each read-modify-write would drop the other's samples."""
    import threading

    gate, real = threading.Event(), ArchiveWriter._write_group

    def held(self, group):
        assert gate.wait(timeout=60)
        real(self, group)

    monkeypatch.setattr(ArchiveWriter, "_write_group", held)
    rng = np.random.default_rng(3)
    with ArchiveWriter.create(url, LAYOUT) as w:
        for i in range(6):
            w.submit({"encoder/0/self_attention": _softmax(rng, (2, 2, 8, 8))},
                     sample_ids={"step": np.arange(2 * i, 2 * i + 2)})  # fmt: skip
        gate.set()
    with open_archive(url) as a:
        np.testing.assert_array_equal(a.sample_ids["step"], np.arange(12))
    assert verify(url).ok


def _race(monkeypatch, *calls):
    """Run ``calls`` in threads that all pass the lease's first listing before any of them
    creates its record: the interleaving two processes started together can hit."""
    gate = threading.Barrier(len(calls), timeout=30)
    real = remote._create
    # S3 applies a conditional PUT atomically; moto checks If-None-Match, then stores, in
    # one request thread among others: one lock around its PUT handler makes it atomic
    from moto.s3.responses import S3Response

    put, atomic = S3Response.put_object, threading.Lock()

    def put_object(self):
        with atomic:
            return put(self)

    monkeypatch.setattr(S3Response, "put_object", put_object)

    def create(fs, path, body):
        gate.wait()
        return real(fs, path, body)

    monkeypatch.setattr(remote, "_create", create)
    out: list[object] = [None] * len(calls)

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_two_writers_racing_on_one_prefix_cannot_both_win(url, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    batch = {"encoder/0/self_attention": _softmax(rng, (2, 2, 8, 8))}
    out = _race(monkeypatch, lambda: ArchiveWriter.create(url, LAYOUT),
                lambda: ArchiveWriter.create(url, LAYOUT))  # fmt: skip
    won = [w for w in out if isinstance(w, ArchiveWriter)]
    lost = [e for e in out if isinstance(e, ArchiveLockedError)]
    assert len(won) == 1 and len(lost) == 1, out
    assert "locked" in str(lost[0])
    won[0].append(batch)
    won[0].close()
    monkeypatch.undo()
    with open_archive(url) as a:
        np.testing.assert_array_equal(a["encoder/0/self_attention"][:],
                                      batch["encoder/0/self_attention"].astype(np.float16))
    assert verify(url).ok


def test_overlapping_range_writers_racing_cannot_both_win(url, monkeypatch) -> None:
    with ArchiveWriter.create(url, LAYOUT, capacity=8, chunk_samples=1,
                              arrays={"encoder/0/self_attention": (2, 8, 8)}):  # fmt: skip
        pass
    out = _race(monkeypatch, lambda: ArchiveWriter.open(url, sample_range=(0, 4)),
                lambda: ArchiveWriter.open(url, sample_range=(2, 6)))  # fmt: skip
    assert sum(isinstance(w, ArchiveWriter) for w in out) <= 1, out  # often neither: safe
    assert sum(isinstance(w, ArchiveLockedError) for w in out) >= 1, out
    for w in out:
        if isinstance(w, ArchiveWriter):
            w.close()
    monkeypatch.undo()
    fs, root = remote.filesystem(url)
    assert not [k for k in remote.keys(url) if k.startswith(".attnscope-locks/")]  # released
    # disjoint ranges race freely: both win
    out = _race(monkeypatch, lambda: ArchiveWriter.open(url, sample_range=(0, 4)),
                lambda: ArchiveWriter.open(url, sample_range=(4, 8)))  # fmt: skip
    assert all(isinstance(w, ArchiveWriter) for w in out), out
    for w in out:
        w.close()


def test_a_lease_deleted_by_hand_stops_the_writer_keeping_its_commits(url) -> None:
    rng = np.random.default_rng(4)
    batch = {"encoder/0/self_attention": _softmax(rng, (2, 2, 8, 8))}
    w = ArchiveWriter.create(url, LAYOUT)
    w.append(batch)
    fs, root = remote.filesystem(url)
    fs.rm(f"{root}/.attnscope-locks/all.json")  # "delete it if that writer is gone"
    with pytest.raises(ArchiveLockedError, match="lease .*all.json is gone"):
        w.append(batch)
    try:
        w.close()  # the error may be raised again here (Zarr's committer thread) or not
    except ArchiveLockedError:
        pass
    with open_archive(url) as a:
        assert a.n_samples == 2  # the batch before is kept; nothing of the refused one
    assert verify(url).ok
    with ArchiveWriter.open(url) as w2:  # resume works once the clash is gone
        w2.append(batch)
    with open_archive(url) as a:
        assert a.n_samples == 4


def test_a_released_lease_never_deletes_another_writers_record(url) -> None:
    w = ArchiveWriter.create(url, LAYOUT)
    fs, root = remote.filesystem(url)
    key = f"{root}/.attnscope-locks/all.json"
    other = {**json.loads(fs.cat_file(key)), "token": "someone-else", "pid": 1}
    fs.pipe_file(key, json.dumps(other).encode())  # taken over while this writer ran
    try:
        w.close()
    except ArchiveLockedError:
        pass
    assert json.loads(fs.cat_file(key))["token"] == "someone-else"
    fs.rm(key)


_bench = importlib.util.spec_from_file_location(
    "bench_s3_requests", Path(__file__).parents[3] / "scripts" / "bench_s3_requests.py"
)
bench_s3 = importlib.util.module_from_spec(_bench)
_bench.loader.exec_module(bench_s3)  # type: ignore[union-attr]


def test_request_counts_per_batch_and_per_open_do_not_grow_with_the_archive() -> None:
    """Counted at the server: an append costs one PUT per chunk it fills, one log document,
    one record and one lease check (HEAD and GET of its record), plus, when an array grows,
    its metadata (capacity doubles: after batches 2, 3, 5, 9, ...); opening an archive 10x
    larger costs the same."""
    with bench_s3.moto_s3() as log:
        small = bench_s3.measure(log, batches=4, b=4, layers=1)
        large = bench_s3.measure(log, batches=12, b=4, layers=1)
        opened = [bench_s3.measure_open(log, n, 10) for n in (200, 2000)]  # 20, 200 chunks
    arrays = 2  # encoder self + decoder cross, one layer; one chunk each per batch
    for res in (small, large):
        assert res["append (one batch)"] == {"PUT": arrays + 2, "HEAD": 1, "GET": 1}, res
    for step in ("create", "open + metadata", "close"):
        assert small[step] == large[step], (step, small[step], large[step])
    assert opened[0]["open + metadata"] == opened[1]["open + metadata"], opened
    # a read finds its log documents by binary search: a few more GETs, not 10x
    reads = [o["read one sample"]["GET"] for o in opened]
    assert reads[1] <= reads[0] + 6, reads
