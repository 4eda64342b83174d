"""Count the object-store requests attnscope makes, on a local S3 server (moto).

Requests are counted at the server (every HTTP request, by kind: PUT, GET, HEAD, LIST,
DELETE), for: creating an archive, one committed batch (one ``append``), opening an
archive (``open_archive`` + its metadata), reading one head of one sample, and ``verify``.
Each is measured on a small and a 10x larger archive side by side, so a count that grows
with the archive shows as a difference. The figures feed the request and cost projection
in ``docs/archive-format.md`` ("Archives on object storage").

    python scripts/bench_s3_requests.py            # ~1 minute on 2 cores
    python scripts/bench_s3_requests.py --quick    # smaller
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive, verify
from attnscope.store.backends import remote

BUCKET = "attnscope-bench"
KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE")


class RequestLog:
    """Every request a WSGI app serves, as ``(kind, path)`` (thread-safe)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def wrap(self, app: Callable[..., Any]) -> Callable[..., Any]:
        def counted(environ: dict[str, Any], start_response: Any) -> Any:
            method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
            kind = method
            if method == "GET" and ("list-type" in query or "prefix=" in query or
                                    environ.get("PATH_INFO", "").count("/") <= 1):  # fmt: skip
                kind = "LIST"
            elif method == "POST" and "delete" in query:
                kind = "DELETE"
            with self._lock:
                self.seen.append((kind, environ.get("PATH_INFO", "") + "?" + query))
            return app(environ, start_response)

        return counted

    @contextmanager
    def counting(self) -> Iterator[collections.Counter]:
        """Counts by kind of the requests made inside the block."""
        start = len(self.seen)
        out: collections.Counter = collections.Counter()
        try:
            yield out
        finally:
            with self._lock:
                out.update(k for k, _p in self.seen[start:])


@contextmanager
def moto_s3() -> Iterator[RequestLog]:
    """A moto S3 server with one bucket, registered for ``s3://``; yields its request log."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    log = RequestLog()
    srv._server.app = log.wrap(srv._server.app)  # type: ignore[union-attr]
    host, port = srv.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
    prefix = f"s3://{BUCKET}/"  # its own prefix: options registered for s3:// stay
    remote.set_storage_options(prefix, opts)
    import s3fs

    try:
        s3fs.S3FileSystem(**opts).mkdir(BUCKET)
    except FileExistsError:
        pass
    try:
        yield log
    finally:
        remote.set_storage_options(prefix, None)
        srv.stop()


LAYOUT = TokenLayout(encoder=SideLayout.from_lengths({"text": 24, "image": 8}),
                     decoder=SideLayout.from_lengths({"act": 8}))  # fmt: skip


def batch(rng: np.random.Generator, b: int, layers: int) -> dict[str, np.ndarray]:
    def soft(shape: tuple[int, ...]) -> np.ndarray:
        x = rng.random(shape, dtype=np.float32) + 0.01
        return x / x.sum(-1, keepdims=True)

    out = {}
    for i in range(layers):
        out[f"encoder/{i}/self_attention"] = soft((b, 4, 32, 32))
        out[f"decoder/{i}/cross_attention"] = soft((b, 4, 8, 32))
    return out


def measure(log: RequestLog, batches: int, b: int, layers: int) -> dict[str, collections.Counter]:
    """Request counts per step on one archive of ``batches`` batches of ``b`` samples."""
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}.zarr"
    rng = np.random.default_rng(0)
    out: dict[str, collections.Counter] = {}
    with log.counting() as out["create"]:
        w = ArchiveWriter.create(url, LAYOUT, batch_size=b)
    for i in range(batches):
        data = batch(rng, b, layers)
        if i == batches - 1:
            with log.counting() as out["append (one batch)"]:
                w.append(data)
        else:
            w.append(data)
    with log.counting() as out["close"]:
        w.close()
    with log.counting() as out["open + metadata"]:
        a = open_archive(url)
        _ = (a.n_samples, a.arrays, a.layout, a.metadata)
    with log.counting() as out["read one head"]:
        a["encoder/0/self_attention"][batches * b // 2, 1]
    a.close()
    with log.counting() as out["verify (structure)"]:
        verify(url, check_data=False)
    return out


def measure_open(log: RequestLog, samples: int, chunk: int) -> dict[str, collections.Counter]:
    """Open and one-sample read of an archive of ``samples`` tiny samples in chunks of
    ``chunk`` (``samples / chunk`` chunks per array): what opening costs as it grows."""
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}.zarr"
    lay = TokenLayout(encoder=SideLayout.from_lengths({"tok": 1}))
    step = min(samples, 100 * chunk)  # 100 chunks per append
    with ArchiveWriter.create(url, lay, chunk_samples=chunk, validate=False) as w:
        for _ in range(0, samples, step):
            w.append({"encoder/0/self_attention": np.ones((step, 1, 1, 1), np.float32)})
    out: dict[str, collections.Counter] = {}
    with log.counting() as out["open + metadata"]:
        a = open_archive(url)
        _ = (a.n_samples, a.arrays, a.layout, a.metadata)
    with log.counting() as out["read one sample"]:
        a["encoder/0/self_attention"][samples // 2]
    a.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", type=int, default=1_000_000,
                    help="samples of the large archive of the open table (chunks of 100)")
    args = ap.parse_args()
    b, layers = 8, 2
    sizes = (4, 40) if not args.quick else (4, 20)  # last batches grow no array
    with moto_s3() as log:
        res = {n: measure(log, n, b, layers) for n in sizes}
    steps = list(res[sizes[0]])
    arrays = 2 * layers
    print(f"requests on moto S3: {arrays} attention arrays, batches of {b} samples "
          f"(one chunk per batch per array); archives of {sizes[0]} and {sizes[1]} batches")
    head = f"{'step':<22}" + "".join(f"{f'{n} batches':>34}" for n in sizes)
    print(head)
    for step in steps:
        cells = []
        for n in sizes:
            c = res[n][step]
            cells.append(" ".join(f"{k}={c[k]}" for k in KINDS if c[k]) or "none")
        print(f"{step:<22}" + "".join(f"{c:>34}" for c in cells))
    big = args.big if not args.quick else 20_000
    with moto_s3() as log:
        opened = {n: measure_open(log, n, 100) for n in (1000, big)}
    print("\nopening a growing archive (chunks of 100 samples; 1 array):")
    print(f"{'step':<22}" + "".join(f"{f'{n} samples, {n // 100} chunks':>34}" for n in opened))
    for step in ("open + metadata", "read one sample"):
        cells = [" ".join(f"{k}={c[k]}" for k in KINDS if c[k]) for c in
                 (opened[n][step] for n in opened)]  # fmt: skip
        print(f"{step:<22}" + "".join(f"{c:>34}" for c in cells))


if __name__ == "__main__":
    main()
