"""Archives at fsspec URLs (``s3://bucket/run.zarr``, ``memory://``, ...): the one place
that knows URLs.

Everything the store does to a *path* (exists, list, delete, size, locks) has a URL twin
here; :func:`attnscope.store.backends.location.locate` asks :func:`is_url` once, and a
:class:`~attnscope.store.backends.location.RemoteLocation` calls these. Zarr archives on a URL are
read and written through zarr's ``FsspecStore``; HDF5 stays local-file only.

``file://`` URLs are local paths (the prefix is stripped), so they keep the local store's
atomic writes and ``flock`` leases.

Storage options of a URL (:func:`storage_options`), later ones winning: the JSON object in
the environment variable ``ATTNSCOPE_STORAGE_OPTIONS``, then what
:func:`set_storage_options` registered for the longest matching URL prefix. fsspec's own
configuration (``FSSPEC_S3_ENDPOINT_URL``, ...) and the provider's (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, profiles) apply underneath, as with any fsspec URL.

Writer leases on a URL (:class:`RemoteLease`) are exclusive where the store has
conditional writes (S3 ``If-None-Match: *``; see ``docs/archive-format.md``, "Archives on
object storage").
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from attnscope._extras import EXTRA_OF, missing_extra_error
from attnscope.errors import (
    ArchiveCorruptError,
    ArchiveLockedError,
    ArchiveNotFoundError,
    ConfigError,
    MissingExtraError,
)
from attnscope.store.backends.lock import (
    ALL,
    LOCK_DIR_NAME,
    alive,
    lock_record,
    lost_error,
    overlap,
)

__all__ = [
    "ENV_OPTIONS",
    "RemoteLease",
    "fspath",
    "is_url",
    "set_storage_options",
    "storage_options",
]

#: environment variable holding default storage options (a JSON object) for every URL
ENV_OPTIONS = "ATTNSCOPE_STORAGE_OPTIONS"
#: protocols whose first path component is a bucket / container that must exist
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
#: the fsspec backend package of common protocols (its extra, if any: ``_extras.EXTRA_OF``)
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
            "abfs": "adlfs", "abfss": "adlfs"}  # fmt: skip
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")  # two letters at least: not C://
_CHAINED = re.compile(r"^\w[\w+.-]*::")  # fsspec chained URLs: simplecache::s3://..., zip::...
_registered: dict[str, dict[str, Any]] = {}
_UNCACHED = {"use_listings_cache": False}
_reachable: set[tuple[str, str]] = set()  # (url, options) whose credentials and bucket passed
T = TypeVar("T")


def _scheme(path: str) -> str | None:
    m = _URL.match(path)
    return m.group(1).lower() if m else None


def is_url(path: Any) -> bool:
    """Whether ``path`` is a non-local fsspec URL (``file://`` counts as local)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = os.fspath(path)
    if not isinstance(p, str):
        return False
    return _CHAINED.match(p) is not None or _scheme(p) not in (None, "file")


def fspath(path: str | os.PathLike[str]) -> str:
    """``os.fspath`` that keeps URLs whole and turns ``file://`` URLs into local paths."""
    p = os.fspath(path)
    if _scheme(p) == "file":
        from urllib.parse import unquote, urlparse

        u = urlparse(p)
        local = u.netloc in ("", "localhost")
        return unquote(u.path if local else f"//{u.netloc}{u.path}")
    return _normal(p) if _scheme(p) is not None or _CHAINED.match(p) else p


def _normal(url: str) -> str:
    """``url`` with a lower-case scheme (RFC 3986: schemes are case-insensitive) and no
    trailing slash."""
    scheme = _scheme(url)
    if scheme is not None:
        url = scheme + url[len(scheme) :]
    return url.rstrip("/")


def refuse_chained(url: str) -> None:
    """fsspec chained URLs (``simplecache::s3://...``) are refused in one line: their
    storage options, listings and leases would apply to the outer layer, not the store."""
    if _CHAINED.match(url):
        inner = url.rsplit("::", 1)[-1]
        raise ConfigError(
            f"{url!r} is a chained fsspec URL; expected a single-protocol URL "
            f"(e.g. {inner!r}) or a local path"
        )


def exists(path: str) -> bool:
    """Whether anything is at ``path``: a local file or folder, or any key under a URL."""
    if not is_url(path):
        return os.path.exists(path)
    return bool(_top(path))


# -- storage options and filesystems ----------------------------------------------------
def set_storage_options(prefix: str, options: dict[str, Any] | None) -> None:
    """Use ``options`` (fsspec storage options) for every URL starting with ``prefix``.

    ``None`` removes the entry. Example: ``set_storage_options("s3://lab-bucket/",
    {"endpoint_url": "http://minio:9000", "key": ..., "secret": ...})``.
    """
    if _scheme(prefix) is None:
        raise ConfigError(f"storage options prefix {prefix!r} is not a URL; expected e.g. 's3://'")
    if options is None:
        _registered.pop(prefix, None)
    else:
        _registered[prefix] = dict(options)


def storage_options(url: str) -> dict[str, Any]:
    """The fsspec storage options of ``url`` (see the module docstring)."""
    out: dict[str, Any] = {}
    raw = os.environ.get(ENV_OPTIONS)
    if raw:
        try:
            env = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{ENV_OPTIONS} is not valid JSON ({e}); expected an object") from e
        if not isinstance(env, dict):
            raise ConfigError(f"{ENV_OPTIONS} is {raw!r}; expected a JSON object of options")
        out.update(env)
    url = _normal(url)
    match = sorted((len(_normal(p)), p) for p in _registered if _under(url, _normal(p)))
    for _n, prefix in match:  # the longest (most specific) prefix last, winning
        out.update(_registered[prefix])
    return out


def _under(url: str, prefix: str) -> bool:
    """Whether ``url`` is ``prefix`` or below it, per path component (``s3://lab`` is not a
    prefix of ``s3://lab-public``); a bare scheme (``s3:`` once normalised) covers all."""
    if prefix.endswith(":"):
        return url.startswith(prefix + "//")
    return url == prefix or url.startswith(prefix + "/")


def _backend_error(url: str, e: BaseException) -> MissingExtraError | ConfigError:
    scheme = _scheme(url) or ""
    if isinstance(e, ImportError):
        pkg = BACKENDS.get(scheme)
        if pkg is None:
            return MissingExtraError(
                f"{url!r} needs an fsspec backend for {scheme}:// that is not installed "
                f"({_first_line(e)}); expected its package installed"
            )
        extra = EXTRA_OF.get(pkg)
        how = f"pip install 'attnscope[{extra}]'" if extra else f"pip install {pkg}"
        return MissingExtraError(
            f"{url!r} needs the fsspec backend of {scheme}:// ({pkg}), which is not "
            f"installed; install it with: {how}"
        )
    return ConfigError(
        f"{url!r}: unknown URL protocol {scheme!r}; expected a protocol fsspec supports "
        f"(s3://, gs://, az://, memory://, file://, ...) or a local path"
    )


def filesystem(url: str, *, cached: bool = True) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` of ``url`` (synchronous API).

    ``cached=False``: an instance without fsspec's listings cache, for objects that other
    writers create and delete meanwhile (leases): s3fs answers ``info``, ``cat_file`` and
    ``rm`` from a cached listing of the parent, so an object created after another thread
    listed the folder reads as missing."""
    refuse_chained(url)
    url = _normal(url)
    try:
        from fsspec.core import url_to_fs
    except ImportError as e:
        raise missing_extra_error("fsspec", f"the archive URL {url!r}") from e
    try:
        fs, path = url_to_fs(url, **storage_options(url), **({} if cached else _UNCACHED))
    except (ImportError, ValueError, TypeError) as e:
        if isinstance(e, ImportError) or "protocol not known" in str(e).lower():
            raise _backend_error(url, e) from e
        raise ConfigError(
            f"{url!r}: bad storage options {sorted(storage_options(url))} or URL "
            f"({_first_line(e)}); expected options the {_scheme(url)}:// filesystem accepts"
        ) from e
    return fs, path.rstrip("/")


def open_store(url: str, *, read_only: bool) -> Any:
    """zarr's ``FsspecStore`` at ``url`` (bucket and credentials checked first)."""
    check_reachable(url)
    url = _normal(url)
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(url, storage_options=storage_options(url), read_only=read_only)
    except (ImportError, ValueError) as e:
        raise _backend_error(url, e) from e


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def storage_call(url: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with credential and access failures as one-line errors."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - classified below, anything else re-raised
        names = {type(x).__name__ for x in _chain(e)}
        profile = next((x for x in _chain(e) if type(x).__name__ == "ProfileNotFound"), None)
        if profile is not None:
            name = getattr(profile, "kwargs", {}).get("profile") or os.environ.get("AWS_PROFILE")
            raise ConfigError(
                f"no credentials for {url!r}: AWS profile {name!r} does not exist; expected a "
                "profile in the AWS config or credentials file (AWS_PROFILE), or keys via "
                f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or {ENV_OPTIONS}"
            ) from e
        if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
            raise ConfigError(
                f"no credentials for {url!r}; expected AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), storage options key/secret via "
                f"{ENV_OPTIONS} or set_storage_options, or anon=True for a public bucket"
            ) from e
        if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}:
            raise ConfigError(
                f"cannot reach the storage service of {url!r} ({_first_line(e)}); expected a "
                "reachable endpoint (storage option endpoint_url, or AWS_ENDPOINT_URL)"
            ) from e
        if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            raise ConfigError(
                f"{url!r}: bad storage options {sorted(storage_options(url))} "
                f"({_first_line(e)}); expected options the {_scheme(url)}:// filesystem accepts"
            ) from e
        if isinstance(e, PermissionError):
            raise ConfigError(
                f"access to {url!r} denied ({_first_line(e)}); expected credentials allowed "
                "to list, read and write under it"
            ) from e
        raise


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def bucket_of(url: str) -> str | None:
    """The bucket (container) named by ``url``, for protocols that have one."""
    scheme = _scheme(url)
    if scheme not in BUCKET_PROTOCOLS:
        return None
    return url[len(scheme) + 3 :].split("/", 1)[0] or None


def check_reachable(url: str) -> None:
    """Raise one line if ``url``'s credentials are missing or its bucket does not exist.

    Two requests, once per URL and storage options in this process.
    """
    refuse_chained(url)
    url = _normal(url)
    refuse_by_suffix(url)
    scheme = _scheme(url)
    if scheme in BUCKET_PROTOCOLS and bucket_of(url) is None:
        raise ConfigError(
            f"{url!r} names no bucket; expected {scheme}://<bucket>/<path>, e.g. "
            f"{scheme}://my-bucket/run.zarr"
        )
    token = (url, json.dumps(storage_options(url), sort_keys=True, default=str))
    if token in _reachable:
        return
    fs, root = filesystem(url)
    storage_call(url, fs.exists, f"{root}/zarr.json")  # a signed request: credentials
    bucket = bucket_of(url)
    if bucket is not None and not storage_call(url, _bucket_exists, fs, bucket, root):
        raise ArchiveNotFoundError(
            f"bucket {bucket!r} of {url!r} does not exist; expected an existing bucket "
            "(attnscope never creates buckets)"
        )
    _reachable.add(token)


def _bucket_exists(fs: Any, bucket: str, root: str) -> bool:
    """Whether ``bucket`` exists, asked by listing the archive's own prefix (one key at
    most): credentials scoped to a prefix may not HEAD the bucket, and fsspec's
    ``exists(bucket)`` answers False for that 403. A denied listing raises
    PermissionError (access denied, not "no such bucket")."""
    if hasattr(fs, "call_s3"):  # s3fs: NoSuchBucket -> FileNotFoundError, 403 -> PermissionError
        key = root.split("/", 1)[1] if "/" in root else ""
        try:
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key + "/" if key else "", MaxKeys=1)
        except FileNotFoundError:
            return False
        return True
    if fs.exists(bucket):
        return True
    try:  # other object stores: a listing of the prefix succeeds when the bucket exists
        fs.ls(root, detail=False)
    except FileNotFoundError:
        return False
    return True


def _top(url: str) -> list[str]:
    """Names one level under ``url`` ([] when nothing is there): one listing request."""
    check_reachable(url)
    fs, root = filesystem(url)
    storage_call(url, fs.invalidate_cache, root)
    try:
        found = storage_call(url, fs.ls, root, detail=False)
    except FileNotFoundError:
        return []
    return [str(k).rstrip("/").rsplit("/", 1)[-1] for k in found]


def keys(url: str) -> list[str]:
    """Every key under ``url``, relative to it ('' for an object at ``url`` itself)."""
    check_reachable(url)
    fs, root = filesystem(url)
    storage_call(url, fs.invalidate_cache, root)
    try:
        found = storage_call(url, fs.find, root)
    except FileNotFoundError:
        return []
    out = []
    for k in found:
        k = k.lstrip("/") if not root.startswith("/") else k
        rel = k[len(root) :].lstrip("/") if k.startswith(root) else k
        out.append(rel)
    return out


def _is_lock_key(key: str) -> bool:
    return key == LOCK_DIR_NAME or key.startswith(LOCK_DIR_NAME + "/")


def bare_group(doc: bytes) -> bool:
    """Whether ``doc`` (a root ``zarr.json``) is a Zarr group without attnscope root
    metadata: what a writer killed between creating the group and writing its metadata
    left (archives of older versions wrote them in two PUTs)."""
    try:
        meta = json.loads(doc)
    except ValueError:
        return False
    return (isinstance(meta, dict) and meta.get("node_type") == "group"
            and "attnscope" not in (meta.get("attributes") or {}))  # fmt: skip


def holds_no_data(url: str) -> bool:
    """Objects exist under ``url`` and all belong to the writer lock folder, besides at
    most a root ``zarr.json`` without attnscope metadata (:func:`bare_group`)."""
    names = set(_top(url))
    if not names or not names <= {LOCK_DIR_NAME, "zarr.json"}:
        return False
    if "zarr.json" not in names:
        return True
    fs, root = filesystem(url)
    try:
        return bare_group(storage_call(url, fs.cat_file, f"{root}/zarr.json"))
    except FileNotFoundError:
        return True


def clear_except_locks(url: str) -> None:
    """Delete every key under ``url`` but the writer lock folder."""
    fs, root = filesystem(url)
    doomed = [f"{root}/{k}" if k else root for k in keys(url) if not _is_lock_key(k)]
    if doomed:
        storage_call(url, fs.rm, doomed)


def disk_size(url: str) -> int:
    """Bytes stored under ``url``."""
    fs, root = filesystem(url)
    try:
        return int(storage_call(url, fs.du, root, total=True))
    except FileNotFoundError:
        return 0


def sniff_format(url: str) -> str:
    """``"zarr"`` for a Zarr archive at ``url``; one-line errors otherwise."""
    check_reachable(url)
    fs, root = filesystem(url)
    if storage_call(url, fs.exists, f"{root}/zarr.json"):
        return "zarr"
    if not _top(url):
        raise ArchiveNotFoundError(f"no archive at {url!r}")
    raise ArchiveCorruptError(
        f"{url!r} holds objects but no zarr.json: not an attnscope Zarr archive"
    )


def refuse_by_suffix(url: str) -> None:
    """:func:`refuse_hdf5` for the format a URL's suffix names (before any request)."""
    refuse_hdf5(url, "hdf5" if url.lower().endswith((".h5", ".hdf5")) else "zarr")


def refuse_hdf5(path: str, fmt: str) -> None:
    """HDF5 archives are local files: a URL with format hdf5 (or ``.zip``) is refused."""
    if not is_url(path):
        return
    if fmt == "hdf5":
        raise ConfigError(
            f"{path!r}: HDF5 archives are local files only; expected a local path for "
            "format hdf5, or a Zarr archive (e.g. s3://bucket/run.zarr) on object storage"
        )
    if path.lower().endswith(".zip"):
        raise ConfigError(
            f"{path!r}: zip archives are local files only; expected a Zarr directory URL "
            "(e.g. s3://bucket/run.zarr)"
        )


# -- writer leases ----------------------------------------------------------------------
def _create(fs: Any, path: str, body: bytes) -> bool:
    """Write ``body`` at ``path`` only if nothing is there; False if something is.

    S3 (and MinIO, R2, moto): one conditional PUT (``If-None-Match: *``), atomic on the
    server. A filesystem whose ``pipe_file`` has no ``mode="create"`` gets an exists check
    then a PUT: advisory only (see ``docs/archive-format.md``)."""
    try:
        fs.pipe_file(path, body, mode="create")
    except FileExistsError:
        return False
    except TypeError as e:
        if "mode" not in str(e):
            raise
        fs.invalidate_cache(path)
        if fs.exists(path):
            return False
        fs.pipe_file(path, body)
    return True


# Single lock objects are deleted with ``rm_file`` (one DELETE): ``rm`` first expands the
# path through fsspec's listings cache, which another thread's listing may have filled
# before the object existed, and then silently deletes nothing.
class RemoteLease:
    """Writer lease on a URL: a JSON object in ``<url>/.attnscope-locks/``.

    Same records and rules as :class:`attnscope.store.backends.lock.Lease` (stale when its
    pid is dead on this host, another host's never broken). Two writers cannot both win:
    the record is created with a conditional PUT (``If-None-Match: *``), so of two writers
    of one name one gets 412; writers of different names (overlapping sample ranges)
    create first and list after, so at least one of two racing writers sees the other and
    backs off (S3 listings are strongly consistent). :meth:`check` runs before each group
    commit and stops a writer whose record was deleted or replaced.
    """

    def __init__(self, archive: str, sample_range: tuple[int, int] | None) -> None:
        self.archive = archive
        self.range = sample_range
        self.dir = f"{archive.rstrip('/')}/{LOCK_DIR_NAME}"
        self.name = (ALL if sample_range is None else
                     f"range-{sample_range[0]}-{sample_range[1]}") + ".json"  # fmt: skip
        self.file = f"{self.dir}/{self.name}"
        self.held = False
        self.token: str | None = None

    def _read(self, fs: Any, full: str) -> dict[str, Any] | None:
        """A lock record, or None when it is gone or unreadable debris."""
        try:
            rec = json.loads(storage_call(self.dir, fs.cat_file, full))
        except FileNotFoundError:
            return None
        except ValueError:
            storage_call(self.dir, fs.rm_file, full)  # a PUT is whole: debris, not a writer
            return None
        return rec if isinstance(rec, dict) else None

    def _sweep(self, fs: Any, root: str, me: str, *, mine: str | None = None) -> None:
        """Remove stale records of this host; raise if a live overlapping one is found
        (``mine``: this writer's own record, skipped)."""
        try:
            found = storage_call(self.dir, fs.find, root)
        except FileNotFoundError:
            found = []
        for full in found:
            key = str(full).rstrip("/").rsplit("/", 1)[-1]
            if not key.endswith(".json") or key == mine:
                continue
            rec = self._read(fs, full)
            if rec is None:
                continue
            if rec.get("host") == me and isinstance(rec.get("pid"), int) and not alive(rec["pid"]):
                storage_call(self.dir, fs.rm_file, full)  # stale: its writer died on this host
                continue
            other = None if rec.get("range") is None else tuple(rec["range"])
            if overlap(self.range, other):  # type: ignore[arg-type]
                held = "the whole archive" if other is None else f"samples {list(other)}"
                err = ArchiveLockedError(
                    f"{self.archive!r} is locked: a writer (pid {rec.get('pid')} on host "
                    f"{rec.get('host')!r}, since {rec.get('since')}) holds {held}. Wait for "
                    f"it, or delete {self.dir}/{key} if that writer is gone."
                )
                err.whole = other is None
                raise err

    def acquire(self) -> RemoteLease:
        check_reachable(self.dir)
        fs, root = filesystem(self.dir, cached=False)
        me = socket.gethostname()
        self._sweep(fs, root, me)
        rec = lock_record(me, self.range)
        body = json.dumps(rec).encode()
        full = f"{root}/{self.name}"
        if not storage_call(self.dir, _create, fs, full, body):
            # another writer created this very name after the sweep: it reports it (or
            # removes it, stale) and then the create is tried once more
            self._sweep(fs, root, me)
            if not storage_call(self.dir, _create, fs, full, body):
                err = ArchiveLockedError(
                    f"{self.archive!r} is locked: another writer created {self.file} while "
                    "this one started; expected one writer of these samples (retry later)"
                )
                err.whole = self.range is None
                raise err
        self.held, self.token = True, rec["token"]
        try:  # create, then list: a writer of an overlapping range is seen by one of us
            self._sweep(fs, root, me, mine=self.name)
        except BaseException:
            self.release()
            raise
        return self

    def check(self) -> None:
        """Raise unless this writer's record is still the one at its name (a HEAD and a
        GET). A failure of the store itself (access denied, the bucket gone) is raised as
        the store's ``OSError``, as a failed chunk write would be, for the caller to name."""
        fs, root = filesystem(self.dir, cached=False)
        full = f"{root}/{self.name}"
        try:
            found = json.loads(fs.cat_file(full))
        except FileNotFoundError:
            bucket = bucket_of(self.archive)
            if bucket is not None and not _bucket_exists(fs, bucket, root):
                raise  # the bucket is gone, not only the lease
            found = None
        except ValueError:
            found = None
        if not isinstance(found, dict) or found.get("token") != self.token:
            raise lost_error(self.archive, self.file, found if isinstance(found, dict) else None)

    def release(self) -> None:
        """Delete this writer's lock object (idempotent; errors are ignored)."""
        if not self.held:
            return
        self.held = False
        try:
            fs, root = filesystem(self.dir, cached=False)
            found = json.loads(fs.cat_file(f"{root}/{self.name}"))
            if found.get("token") == self.token:  # never another writer's record
                fs.rm_file(f"{root}/{self.name}")
        except Exception:  # noqa: BLE001 - a vanished object or a lost connection
            pass
