"""The whole multi-machine path on a local moto S3 server: capture by N processes into one
archive on S3 (under ``torchrun``, and as a job array given ``--rank/--world-size``), one
rank killed with SIGKILL after committing and resumed, analysis on a Dask cluster of worker
processes reading the S3 archive and writing the tables to S3, then render and report from
S3 archive + S3 tables without torch. Every array, table and figure equals the
single-process local run.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from s3_testlib import moto_s3  # noqa: E402

from attnscope.analysis.tables import TABLES  # noqa: E402
from attnscope.cli import cli  # noqa: E402
from attnscope.store import open_archive, verify  # noqa: E402
from attnscope.store.backends import remote  # noqa: E402

MODEL = {
    "embed_dim": 32,
    "context_length": 16,
    "num_heads": 4,
    "num_encoder_layers": 1,
    "num_decoder_layers": 2,
    "enc_modalities": {"text": 4, "image": 6},
    "dec_modalities": {"action": 5},
}
BATCHES = ["--batches", "4", "--batch-size", "2", "--seed", "0"]  # 8 samples, 2 per rank
# what render draws in both runs: one layer, one head, one sample, every figure kind
FIGURES = ["--layers", "0", "--heads", "0", "--samples", "0", "--workers", "1", "--no-progress"]

# The CLI, with one rank killed by SIGKILL right after its first batch is committed, the
# first time it runs (torchrun counts its restarts in TORCHELASTIC_RESTART_COUNT).
CLI_KILLING_A_RANK = textwrap.dedent(
    """
    import os, signal, sys
    rank = os.environ.get("RANK")
    if "--rank" in sys.argv:
        rank = sys.argv[sys.argv.index("--rank") + 1]
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first and rank is not None and rank == os.environ.get("KILL_RANK"):
        from attnscope.store import writer as W
        _submit = W.ArchiveWriter.submit
        def submit(self, *a, **k):
            _submit(self, *a, **k)
            self.flush()  # committed
            print(f"killing rank {rank} after its first commit", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        W.ArchiveWriter.submit = submit
    from attnscope.cli import cli
    cli(sys.argv[1:], prog_name="attnscope")
    """
)
# render or report with torch unimportable: a core-only install
WITHOUT_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # import torch raises ImportError
    from attnscope.cli import cli
    try:
        cli(sys.argv[1:], prog_name="attnscope")
    finally:
        torch = [m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v]
        assert not torch, f"torch was imported: {torch[:3]}"
    """
)


def _ok(args: list[str]) -> None:
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def s3() -> Any:
    with moto_s3() as s:
        yield s


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    (root / "model.json").write_text(json.dumps(MODEL))
    (root / "cli_killing_a_rank.py").write_text(CLI_KILLING_A_RANK)
    (root / "without_torch.py").write_text(WITHOUT_TORCH)
    return root


@pytest.fixture(scope="module")
def local(work: Path) -> dict[str, Path]:
    """The single-process local run: archive, tables, figures and report."""
    out = {"archive": work / "local.zarr", "tables": work / "local-tables",
           "figs": work / "local-figs", "report": work / "local.html"}  # fmt: skip
    _ok(["capture", "--config", str(work / "model.json"), *BATCHES, "--out",
         str(out["archive"]), "--no-progress"])  # fmt: skip
    _ok(["analyze", str(out["archive"]), "--out", str(out["tables"]), "--no-progress"])
    _ok(["render", str(out["archive"]), "--out", str(out["figs"]), "--tables",
         str(out["tables"]), *FIGURES])  # fmt: skip
    _ok(["report", str(out["archive"]), "--tables", str(out["tables"]), "--out",
         str(out["report"])])  # fmt: skip
    return out


def _equal_archives(url: str, local: Path) -> None:
    assert verify(url).ok
    with open_archive(url) as a, open_archive(local) as b:
        assert a.n_samples == b.n_samples == 8
        assert a.arrays == b.arrays
        for name in b.arrays:
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
        ids, want = a.sample_ids, b.sample_ids
        assert sorted(ids) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(ids[k], want[k], err_msg=k)
    assert not remote.keys(url + "/.attnscope-locks")  # every rank released its lease


def _capture_args(work: Path, url: str) -> list[str]:
    return ["capture", "--config", str(work / "model.json"), *BATCHES, "--out", url,
            "--no-progress"]  # fmt: skip


def test_torchrun_capture_to_s3_dask_analysis_and_core_render_equal_one_local_process(
    s3, work, local
) -> None:
    import distributed

    url, tabs = s3.url("run.zarr"), s3.url("tables")
    # torchrun, two ranks; rank 1 is killed after its first commit, torchrun restarts the
    # group once: rank 0 rejoins with nothing left to do, rank 1 resumes after its commit
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", "1", str(work / "cli_killing_a_rank.py")]  # fmt: skip
    res = _run([*torchrun, *_capture_args(work, url)], s3.env(KILL_RANK="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("killing rank 1 after its first commit") == 1, res.stderr[-3000:]
    _equal_archives(url, local["archive"])

    # analysis on a Dask cluster of two worker processes reading the archive on S3; the
    # tables go to S3
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:  # fmt: skip
        _ok(["analyze", url, "--out", tabs, "--scheduler", cluster.scheduler_address,
             "--no-progress"])  # fmt: skip
    names = sorted(f"{t}.parquet" for t in TABLES)
    assert set(names) <= set(remote.keys(tabs))
    fs, root = remote.filesystem(tabs)
    for name in names:
        with fs.open(f"{root}/{name}", "rb") as f:
            got = pd.read_parquet(f)
        want = pd.read_parquet(local["tables"] / name)
        # the fingerprint hashes root metadata recording where and when each capture ran;
        # every computed column is equal
        ident = [c for c in want.columns if c.startswith("archive")]
        pd.testing.assert_frame_equal(got.drop(columns=ident), want.drop(columns=ident))

    # render and report from the S3 archive and S3 tables with torch unimportable
    figs, page = work / "s3-figs", work / "s3.html"
    core = [str(work / "without_torch.py")]
    res = _run([*core, "render", url, "--out", str(figs), "--tables", tabs, *FIGURES], s3.env())
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([*core, "report", url, "--tables", tabs, "--out", str(page)], s3.env())
    assert res.returncode == 0, res.stderr[-3000:]
    got = {p.relative_to(figs): p for p in figs.rglob("*.png")}
    want = {p.relative_to(local["figs"]): p for p in local["figs"].rglob("*.png")}
    assert len(want) > 5 and got.keys() == want.keys()
    for k in want:
        assert got[k].read_bytes() == want[k].read_bytes(), k
    assert _page(page, url) == _page(local["report"], local["archive"])


def _page(path: Path, archive: Any) -> str:
    """A report without what differs between the two runs: the archive's name and
    fingerprint, and the provenance table (when, on which host and pid each capture ran).
    The embedded attention, tables and figures are compared whole."""
    text = re.sub(r"<h3>Provenance</h3><table>.*?</table>", "", path.read_text())
    with open_archive(archive) as a:
        ident = a.identity()
    for v in (ident["fingerprint"], str(ident["archive"]), Path(str(archive)).name):
        text = text.replace(str(v), "ARCHIVE")
    return text


def test_job_array_capture_to_s3_with_a_killed_rank_equals_one_local_process(
    s3, work, local
) -> None:
    url = s3.url("array.zarr")
    cmd = [str(work / "cli_killing_a_rank.py"), *_capture_args(work, url), "--world-size", "2"]
    env = s3.env(KILL_RANK="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, *cmd, "--rank", str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [-signal.SIGKILL, 0], outs
    assert "killing rank 1 after its first commit" in outs[0][1]
    with open_archive(url) as a:  # rank 0's samples and rank 1's first batch are committed
        assert a.commits["range-0-4"][2] == 4 and a.commits["range-4-8"][2] == 2
        assert a.n_samples == 6
    # the job array reruns the failed task: it resumes after its committed batch
    res = _run([*cmd, "--rank", "1"], {k: v for k, v in env.items() if k != "KILL_RANK"})
    assert res.returncode == 0, res.stderr[-3000:]
    _equal_archives(url, local["archive"])
    # a second process given rank 1 while a live one holds its shard is refused
    from attnscope.store import ArchiveWriter

    with ArchiveWriter.open(url, sample_range=(4, 8)):
        res = CliRunner().invoke(cli, [*_capture_args(work, url), "--world-size", "2",
                                       "--rank", "1"])  # fmt: skip
    assert res.exit_code == 1 and "two processes given rank 1" in res.stderr, res.output


# The CLI, with a storage fault right after this process's first batch is committed:
# FAULT=credentials makes the S3 server refuse every request from now on (moto starts
# checking credentials, and these are unknown to it: as keys that expired mid-run);
# FAULT=bucket moves the archive's bucket away (its objects to BACKUP, then deleted).
CLI_WITH_A_FAULT = textwrap.dedent(
    """
    import json, os, sys, urllib.request
    from attnscope.store import writer as W
    BACKUP = "attnscope-test-backup"
    def fault():
        opts = json.loads(os.environ["ATTNSCOPE_STORAGE_OPTIONS"])
        if os.environ["FAULT"] == "credentials":
            url = opts["endpoint_url"] + "/moto-api/reset-auth"
            req = urllib.request.Request(url, data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
            urllib.request.urlopen(req).close()
            return
        import s3fs
        fs = s3fs.S3FileSystem(**opts)
        bucket = os.environ["BUCKET"]
        fs.mkdir(BACKUP)
        for key in fs.find(bucket):
            fs.copy(key, BACKUP + key[len(bucket):])
        fs.rm(bucket, recursive=True)
    _submit, done = W.ArchiveWriter.submit, []
    def submit(self, *a, **k):
        _submit(self, *a, **k)
        if not done:
            done.append(1)
            self.flush()  # committed
            fault()
    if os.environ.get("FAULT"):
        W.ArchiveWriter.submit = submit
    from attnscope.cli import cli
    cli(sys.argv[1:], prog_name="attnscope")
    """
)


def _restore_bucket(s3, bucket: str) -> None:
    fs, backup = s3.fs(), "attnscope-test-backup"
    fs.mkdir(bucket)
    for key in fs.find(backup):
        fs.copy(key, bucket + key[len(backup) :])
    fs.rm(backup, recursive=True)


@pytest.mark.parametrize("fault", ["credentials", "bucket"])
def test_storage_fault_mid_run_is_one_line_and_the_rank_resumes_once_fixed(
    s3, work, local, fault
) -> None:
    import urllib.request

    bucket = "attnscope-vanishing" if fault == "bucket" else s3.bucket
    if fault == "bucket":
        s3.fs().mkdir(bucket)
    url = f"s3://{bucket}/{fault}.zarr"
    args = [*_capture_args(work, url), "--world-size", "2"]
    _ok([*args, "--rank", "0"])
    (work / "cli_with_a_fault.py").write_text(CLI_WITH_A_FAULT)
    rank1 = [str(work / "cli_with_a_fault.py"), *args, "--rank", "1"]
    try:
        res = _run(rank1, s3.env(FAULT=fault, BUCKET=bucket))
    finally:  # the cause is fixed
        if fault == "credentials":
            req = urllib.request.Request(f"{s3.endpoint}/moto-api/reset-auth", data=b"inf",
                                         method="POST", headers={"Content-Type": "text/plain"})
            urllib.request.urlopen(req).close()
        elif not s3.fs().exists(bucket):
            _restore_bucket(s3, bucket)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stderr[-3000:]
    want = ("access to the storage was refused mid-run" if fault == "credentials"
            else f"bucket '{bucket}' no longer exists")  # fmt: skip
    assert lines[0].startswith("Error: ") and want in lines[0], lines[0]
    assert "samples committed before are safe" in lines[0], lines[0]
    with open_archive(url) as a:  # nothing committed was lost
        assert a.commits["range-0-4"][2] == 4 and a.commits["range-4-8"][2] == 2
    assert verify(url).ok
    res = _run(rank1, s3.env())  # rerun once fixed: the rank resumes after its commit
    assert res.returncode == 0, res.stderr[-3000:]
    _equal_archives(url, local["archive"])
