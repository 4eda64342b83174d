"""A local S3 server (moto) for tests outside tests/store/test_remote.py (unique module
name: imported through pytest's ``pythonpath``): one server per module, a bucket, and the
storage options registered for ``s3://`` in this process and given to child processes
through ``ATTNSCOPE_STORAGE_OPTIONS``."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

BUCKET = "attnscope-test"
KEYS = {"key": "testing", "secret": "testing"}


@dataclass
class S3:
    """A running moto server: its endpoint and the storage options that reach it."""

    endpoint: str
    bucket: str = BUCKET

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, **KEYS}

    def env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` for a child process that reaches this server."""
        from attnscope.store.backends import remote

        return {**os.environ, remote.ENV_OPTIONS: json.dumps(self.options), **extra}

    def url(self, name: str) -> str:
        """A fresh URL in the bucket: ``s3://bucket/<random>-<name>``."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:8]}-{name}"

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.options)


@contextmanager
def moto_s3() -> Iterator[S3]:
    """Start a moto S3 server on a free local port with :data:`BUCKET`, register its
    options for ``s3://``; stop and unregister on exit."""
    import moto.server
    import s3fs

    from attnscope.store.backends import remote

    saved = {k: os.environ.get(k) for k in ("AWS_EC2_METADATA_DISABLED", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    s3 = S3(f"http://{host}:{port}")
    remote.set_storage_options("s3://", s3.options)
    try:
        s3fs.S3FileSystem(**s3.options).mkdir(BUCKET)
    except FileExistsError:  # moto's state is per process: a second server sees the bucket
        pass
    try:
        yield s3
    finally:
        remote.set_storage_options("s3://", None)
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
