"""A deterministic kill-point harness for the writer (unique module name: tests/ has no
packages): a writer process is killed by SIGKILL right before its k-th file operation,
for every k, and what it leaves must resume.

Named file operations, counted in the writer process and killed before:

* local files (Zarr directory, lock folders, HDF5 sidecars): ``os.replace``, ``os.link``,
  ``os.remove``, ``os.unlink``, ``os.rmdir`` (zarr's ``LocalStore`` and the direct chunk
  writer write a ``*.partial`` file, then rename or link it, so "before the rename" is
  the torn state of every file);
* HDF5: ``create_dataset``, ``create_group``, dataset writes and
  resizes, attribute writes, ``flush``;
* object storage (s3fs): every PUT (``_pipe_file``) and DELETE (``_rm``, ``_rm_file``).

A *zygote* process imports everything once and forks one writer per kill point (no zarr,
fsspec or h5py state exists before the fork), so a scan of ~100 points costs a fraction
of a second each instead of an interpreter start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import h5py
import numpy as np

from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

LAYOUT = TokenLayout(
    encoder=SideLayout.from_lengths({"text": 4}),
    decoder=SideLayout.from_lengths({"act": 3}),
)
#: a ragged archive: masks and token ids are side data created with the first batch
OPTS: dict[str, Any] = {"max_lengths": {"encoder": 4}, "batch_size": 2}
try:  # imported once in the zygote, not in every forked writer (about a second)
    import s3fs
except ImportError:  # pragma: no cover
    s3fs = None
N_BATCHES = 2
B = 2


def batch(b: int) -> dict[str, Any]:
    """Batch ``b`` of the scenario: two attention arrays, two id keys, masks, token ids."""
    rng = np.random.default_rng(b)
    s = 4 - b % 2  # ragged: batch lengths 4, 3, 4, ...

    def soft(*shape: int) -> np.ndarray:
        x = rng.random(shape).astype(np.float32) + 0.05
        return x / x.sum(-1, keepdims=True)

    return {
        "weights": {
            "encoder/0/self_attention": soft(B, 2, s, s),
            "decoder/0/cross_attention": soft(B, 2, 3, s),
        },
        # several keys, like capture's input hashes: a kill can fall between their creation
        "sample_ids": {f"id{i}": np.arange(B * b, B * b + B, dtype=np.uint64) * (i + 1)
                       for i in range(2)},  # fmt: skip
        "tokens": {"encoder": {"ids": rng.integers(0, 99, (B, s))}},
    }


def append(w: ArchiveWriter, b: int) -> int:
    x = batch(b)
    return w.append(x["weights"], sample_ids=x["sample_ids"], tokens=x["tokens"])


def write_all(path: str, *, start: int = 0, writer: ArchiveWriter | None = None,
              progress: list[str] = ()) -> None:  # fmt: skip
    """The uninterrupted scenario (or its rest, from batch ``start``): create or resume, then
    append every batch, noting each returned committed count in the files ``progress``."""
    w = writer if writer is not None else ArchiveWriter.open_or_create(path, LAYOUT, **OPTS)
    with w:
        for b in range(start, N_BATCHES):
            n = append(w, b)
            for fn in progress:
                with open(fn, "a", encoding="utf-8") as fh:
                    fh.write(f"committed {n}\n")


# -- the writer process -------------------------------------------------------------------
def _arm(kill_at: int, count_file: str) -> None:
    """Count named file operations; SIGKILL this process right before operation ``kill_at``
    (1-based). Each operation is noted in ``count_file`` (one line each)."""
    lock = threading.Lock()
    seen = [0]

    def hit(what: str, args: tuple) -> None:
        with lock:
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            with open(count_file, "a", encoding="utf-8") as fh:
                where = args[0] if args and isinstance(args[0], (str, os.PathLike)) else ""
                fh.write(f"{what} {os.fspath(where)[-60:]}\n")

    def wrap(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def op(*a: Any, **k: Any) -> Any:
            hit(name, a)
            return real(*a, **k)

        setattr(owner, name, op)

    def wrap_async(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        async def op(*a: Any, **k: Any) -> Any:
            hit(name, a[1:])
            return await real(*a, **k)

        setattr(owner, name, op)

    for name in ("replace", "link", "remove", "unlink", "rmdir"):
        wrap(os, name)
    for owner, names in ((h5py.Group, ("create_dataset", "create_group")),
                         (h5py.Dataset, ("__setitem__", "resize")),
                         (h5py.AttributeManager, ("__setitem__",)),
                         (h5py.File, ("flush",))):  # fmt: skip
        for name in names:
            wrap(owner, name)
    if s3fs is None:  # pragma: no cover - the S3 scan is skipped then
        return
    for name in ("_pipe_file", "_rm", "_rm_file"):
        wrap_async(s3fs.S3FileSystem, name)


def _child(path: str, kill_at: int, work: str) -> None:
    """One writer run (in a forked process); exits through SIGKILL or os._exit."""
    code = 0
    try:
        import attnscope.store.backends.zarr_store as zb

        zb.ENCODE_THREADS = 1  # chunk files one after another: a stable operation order
        _arm(kill_at, os.path.join(work, "ops"))
        ops = os.path.join(work, "ops")
        write_all(path, progress=[os.path.join(work, "progress"), ops])
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(work, "error"), "w", encoding="utf-8") as fh:
            fh.write(f"{type(e).__name__}: {e}")
        code = 1
    os._exit(code)


def _fork(path: str, kill_at: int, work: str) -> int:
    os.makedirs(work, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        _child(path, kill_at, work)
    _pid, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def zygote() -> None:
    """Read ``{"path": template with {k}, "work": folder, "strides": [a, b], "names":
    [...]}`` from stdin; run the scenario once unkilled (k = 0) to list its operations,
    then once per kill point: every ``a``-th operation up to the first commit, every
    ``b``-th after it (and the first and last), or with ``names`` (``[key, nth]`` pairs)
    the nth operation on each key; print ``{"ops": n,
    "first_commit": k, "runs": {k: returncode}}`` (k: the first operation after the first
    commit)."""
    job = json.loads(sys.stdin.read())
    tpl, work, (a, b) = job["path"], job["work"], job["strides"]
    # Warm up (lazy imports, zarr's codecs) once here, not in every child: zarr and
    # fsspec reset their event-loop threads in a forked child.
    write_all(os.path.join(work, "warm.zarr"))
    rc0 = _fork(tpl.format(k=0), 0, os.path.join(work, "0"))
    with open(os.path.join(work, "0", "ops"), encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    n = sum(not x.startswith("committed") for x in lines)
    k1 = lines.index(f"committed {B}") + 1  # operations up to the first commit, inclusive
    if job.get("names"):  # the first operation on each named key, and the first commit
        ops = [x for x in lines if not x.startswith("committed")]
        points = sorted({[i + 1 for i, x in enumerate(ops) if key in x][nth - 1]
                         for key, nth in job["names"]})  # fmt: skip
    else:
        points = sorted({1, n, *range(1, k1 + 1, a), *range(k1 + 1, n + 1, b)})
    runs = {0: rc0}
    for k in points:
        runs[k] = _fork(tpl.format(k=k), k, os.path.join(work, str(k)))
    print(json.dumps({"ops": n, "first_commit": k1, "runs": runs}))


def scan(path_template: str, work: str, strides: tuple[int, int] = (1, 1),
         env: dict[str, str] | None = None,
         names: list | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the zygote in a fresh interpreter; returns its report (see :func:`zygote`)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "import kill_testlib; kill_testlib.zygote()")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps({"path": path_template, "work": work, "strides": list(strides),
                          "names": names}),
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
