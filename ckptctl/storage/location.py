"""A place that holds checkpoints, on any fsspec filesystem, with the few operations every command needs.

This module (with the rest of ``ckptctl.storage``) is the only code that imports fsspec. Each operation is
implemented once, in as few requests as the backend allows: a listing is one ``find(detail=True)`` walk (never a
HEAD per file), a header read is ``cat_file(start, end)`` (never ``open()``, whose default readahead fetches
50 MiB), deletes go in batches. fsspec and boto errors come out as ``ckptctl.errors`` exceptions naming the URL.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from ckptctl.errors import (
    BackendNotInstalledError,
    CkptctlError,
    InputTooLargeError,
    NoCredentialsError,
    NoSuchBucketError,
    NotADirectoryRunError,
    NotARegularFileError,
    NotFoundError,
    OutputOverlapsInputError,
    PermissionDeniedError,
    StorageUnavailableError,
    UsageError,
)

EntryType = Literal["file", "directory", "link"]

if os.environ.get("CKPTCTL_DEBUG", "") in ("", "0"):
    import logging

    # The stores' libraries log their retries and tracebacks on stderr (gcsfs: six per unreachable request);
    # ckptctl says what failed in one line. CKPTCTL_DEBUG=1 lets them speak.
    for _name in ("gcsfs", "s3fs", "fsspec", "aiobotocore", "botocore", "urllib3", "google"):
        logging.getLogger(_name).setLevel(logging.CRITICAL)

# What ``read_bytes`` reads at most unless the caller says less: small files of every kind (markers, manifests,
# trainer_state.json of a long run) fit; a device or a sparse multi-GB file does not fill memory.
SMALL_FILE_LIMIT = 256 * 1024 * 1024
POINTER_FILE_LIMIT = 4096
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
# Deeper than any trainer's layout; past it a hostile tree is not descended (and no descriptors run out).
_MAX_WALK_DEPTH = 128

# Class names of connection failures raised by botocore/aiohttp/requests; matched by name so that this module
# does not import any backend.
_CONNECTION_ERROR_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ConnectionError",
    "ConnectionRefusedError",
    "TimeoutError",
}

_CREDENTIAL_ERROR_NAMES = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "DefaultCredentialsError",
    "RefreshError",
    "TransportError",
}
# botocore's errors for settings it checks only when the first request is made (-o region_name=5).
_SETTINGS_ERROR_NAMES = {
    "InvalidRegionError",
    "InvalidEndpointConfigurationError",
    "InvalidS3AddressingStyleError",
}
_DENIED_CODES = ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")

_EXTRA_FOR_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


@dataclass(frozen=True)
class FileEntry:
    """One listed object: a file, a directory, or (local disks only) a symlink that is not followed."""

    path: str
    """Relative to the location, '/'-separated; "" is the location itself."""
    type: EntryType
    size: int
    mtime: float | None
    """Seconds since the epoch (local mtime, S3 LastModified, GCS updated)."""
    etag: str | None = None
    checksum: str | None = None
    """``md5:<b64>`` or ``crc32c:<b64>`` where the store reports one (GCS)."""
    link_target: str | None = None
    """For symlinks: the target relative to the location when it lies inside it, else the raw target."""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> str:
        return posixpath.dirname(self.path)


# fsspec backends' options that must be strings, and those that must be groups (s3fs, gcsfs, adlfs names).
_STRING_OPTIONS = frozenset(
    {"endpoint_url", "profile", "region_name", "project", "key", "secret", "token", "account_name"}
)
_MAPPING_OPTIONS = frozenset({"client_kwargs", "config_kwargs", "s3_additional_kwargs", "storage_options"})


def is_url(text: str) -> bool:
    """Whether ``text`` names a store by URL (``s3://``, ``memory://``) rather than a local path (``file://``
    counts as local): the one test of it outside fsspec."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme != "file" and "/" not in scheme


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ``key=value`` pairs into fsspec storage options.

    Values are parsed as JSON when they can be (``anon=true``, ``default_block_size=1048576``) and kept as strings
    otherwise; dotted keys nest (``client_kwargs.region_name=us-east-1``).
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option takes key=value, got {pair!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        target = options
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UsageError(f"--storage-option {key}: {part} is set both as a value and as a group")
        if leaf in _STRING_OPTIONS and not isinstance(value, str):
            value = raw  # endpoint_url=5 is the string "5" (and then an error from the store, not a crash)
        if leaf in _MAPPING_OPTIONS and not isinstance(value, dict):
            raise UsageError(
                f"--storage-option {key} takes a group of settings ({leaf}.NAME=VALUE or a JSON object), "
                f"got {raw[:40]!r}"
            )
        target[leaf] = value
    return options


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _mtime_of(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "last_modified", "created", "timeCreated"):
        if key in info:
            found = _timestamp(info[key])
            if found is not None:
                return found
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (backends wrap the error that matters)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _caused_by(exc: BaseException, names: set[str]) -> bool:
    """Whether ``exc`` or anything in its cause chain is of a class with one of ``names``."""
    return any(cls.__name__ in names for link in _chain(exc) for cls in type(link).__mro__)


def _is_connection_error(exc: BaseException) -> bool:
    refused = (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH)
    return _caused_by(exc, _CONNECTION_ERROR_NAMES) or any(
        isinstance(link, OSError) and link.errno in refused for link in _chain(exc)
    )


_GCS_ENDPOINT = "https://storage.googleapis.com"
PROBE_SECONDS = 5.0


def _probe_endpoint(endpoint: str, url: str) -> None:
    """One TCP connection to the store's endpoint before any request: gcsfs retries a refused connection six
    times with backoff (~36 s) before it reports anything, so an unreachable ``gs://`` endpoint is told in at
    most PROBE_SECONDS instead. Costs one connection set-up per command."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=PROBE_SECONDS):
            pass
    except OSError as exc:
        raise StorageUnavailableError(
            f"cannot reach the store for {url} at {parts.hostname}:{port} within {PROBE_SECONDS:.0f} s: "
            f"{exc.strerror or exc}",
            url=url,
        ) from None


class Location:
    """A folder (local or remote) addressed by a URL, with ckptctl's storage operations relative to it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.url = url.rstrip("/") if len(url) > 1 else url

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> Location:
        """Open a location; a missing backend (s3fs, gcsfs) is a one-line error naming the extra to install."""
        options = dict(storage_options or {})
        scheme, sep, rest = url.partition("://")
        if sep and scheme in _EXTRA_FOR_PROTOCOL and not rest.strip("/"):
            # Before the backend is made: gcsfs would look for credentials (and a metadata server) first.
            raise UsageError(f"{url} names no bucket; a run lives in one: {scheme}://BUCKET/PATH", url=url)
        try:
            fs, root = url_to_fs(url, **options)
        except ImportError as exc:
            protocol = url.split("://", 1)[0] if "://" in url else "file"
            extra = _EXTRA_FOR_PROTOCOL.get(protocol)
            hint = (
                f"pip install 'ckptctl[{extra}]'"
                if extra
                else f"install the fsspec backend for {protocol}://"
            )
            raise BackendNotInstalledError(
                f"{protocol}:// needs a backend that is not installed ({exc})", url=url, hint=hint
            ) from exc
        except (ValueError, TypeError, AttributeError) as exc:
            raise UsageError(f"cannot open {url}: {exc}", url=url) from exc
        location = cls(fs, root, url)
        if not location.is_local and location.protocol not in ("memory", "file") and not root.strip("/"):
            raise UsageError(
                f"{url} names no bucket; a run lives in one: {location.protocol}://BUCKET/PATH", url=url
            )
        if location.protocol in ("gs", "gcs"):
            _probe_endpoint(str(getattr(fs, "_endpoint", None) or _GCS_ENDPOINT), url)
        return location

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def protocol(self) -> str:
        proto = self.fs.protocol
        return proto if isinstance(proto, str) else proto[0]

    def full_path(self, rel: str = "") -> str:
        """The backend path of ``rel`` (relative to this location)."""
        if not rel:
            return self.root
        return posixpath.join(self.root, rel) if self.root else rel

    def url_of(self, rel: str = "") -> str:
        """A URL for messages: what the user typed, plus ``rel``."""
        if not rel:
            return self.url
        return f"{self.url}/{rel}" if not self.url.endswith("/") else f"{self.url}{rel}"

    def child(self, rel: str) -> Location:
        return Location(self.fs, self.full_path(rel), self.url_of(rel))

    @property
    def name(self) -> str:
        """The last component (a file's or a folder's name; ``""`` at the top of a filesystem)."""
        return posixpath.basename(self.root.rstrip("/"))

    @property
    def at_top(self) -> bool:
        """True at the filesystem root, or at a bucket on an object store (nothing above it is ours to read)."""
        floor = 0 if self.is_local or self.protocol == "memory" else 1
        return self.root.strip("/").count("/") < floor or posixpath.dirname(self.root) == self.root

    def parent(self) -> Location:
        """The folder holding this location (itself at the top, see ``at_top``); the URL keeps what was typed."""
        if self.at_top:
            return self
        root = posixpath.dirname(self.root.rstrip("/")) or ("/" if self.root.startswith("/") else "")
        scheme, sep, path = self.url.rpartition("://")
        head = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ("" if sep else ".")
        return Location(self.fs, root, f"{scheme}{sep}{head or ('/' if path.startswith('/') else '')}")

    # -- errors ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def errors(self, rel: str = "") -> Iterator[None]:
        """Translate fsspec/boto/OS errors raised inside the block into ckptctl errors naming the URL."""
        url = self.url_of(rel)
        try:
            yield
        except CkptctlError:
            raise
        except (FileNotFoundError, NotADirectoryError) as exc:
            if self._bucket_missing():
                raise NoSuchBucketError(f"no such bucket: {self._bucket_url()}", url=url) from exc
            raise NotFoundError(f"no such file or folder: {url}", url=url) from exc
        except PermissionError as exc:
            raise PermissionDeniedError(f"permission denied: {url}", url=url) from exc
        except Exception as exc:
            if _caused_by(exc, _CREDENTIAL_ERROR_NAMES):
                raise NoCredentialsError(
                    f"no usable credentials for {url}: {exc}".splitlines()[0], url=url
                ) from exc
            if _is_connection_error(exc):
                raise StorageUnavailableError(
                    f"cannot reach the store for {url}: {type(exc).__name__}: {exc}".splitlines()[0], url=url
                ) from exc
            text = str(exc)
            if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
                raise NoSuchBucketError(f"no such bucket: {self._bucket_url()}", url=url) from exc
            if any(code in text for code in _DENIED_CODES):
                raise PermissionDeniedError(f"permission denied: {url}", url=url) from exc
            if _caused_by(exc, _SETTINGS_ERROR_NAMES) or (
                isinstance(exc, ValueError) and text.startswith("Invalid endpoint")
            ):
                raise UsageError(
                    f"the store's settings for {url} are not valid: {text}".splitlines()[0],
                    url=url,
                    hint="check the --storage-option values",
                ) from exc
            raise

    def _bucket(self) -> str | None:
        if self.is_local or self.protocol in ("memory", "file"):
            return None
        return self.root.split("/", 1)[0] or None

    def _bucket_url(self) -> str:
        return f"{self.protocol}://{self._bucket()}"

    def _bucket_missing(self) -> bool:
        bucket = self._bucket()
        if bucket is None:
            return False
        try:
            return not self.fs.exists(bucket)
        except Exception:
            return False

    # -- reading --------------------------------------------------------------------------------------------
    def stat(self, rel: str = "") -> FileEntry:
        """One entry's facts (a single HEAD or stat); a missing path raises NotFoundError."""
        path = self.full_path(rel)
        with self.errors(rel):
            if self.is_local:
                return self._local_entry(path, rel)
            info = self.fs.info(path)
        return self._entry(info, rel)

    def exists(self, rel: str = "") -> bool:
        with self.errors(rel):
            return bool(self.fs.exists(self.full_path(rel)))

    def walk(self) -> list[FileEntry]:
        """Every file and folder below this location, in one listing walk, sorted by path.

        Object stores: one ``find(detail=True)`` (paginated LIST requests only), with the listing cache cleared
        first so that a run written by another client is seen as it is now. Local disks: ``os.scandir``, which
        reports symlinks as links instead of following them (a ``last.ckpt -> epoch=3.ckpt`` link is a pointer,
        not a second checkpoint, and a link loop cannot hang the walk). Raises NotFoundError when the location
        does not exist and NotADirectoryRunError when it is a file.
        """
        if self.is_local:
            return self._walk_local()
        with self.errors():
            self._forget_listings()
            found = self.fs.find(self.root, detail=True)
        entries: list[FileEntry] = []
        folders: set[str] = set()
        prefix = self.root.rstrip("/") + "/"
        for path, info in found.items():
            if path.rstrip("/") == self.root.rstrip("/") and info.get("type") == "file":
                raise NotADirectoryRunError(
                    f"{self.url} is a file; expected a folder of checkpoints", url=self.url
                )
            if not path.startswith(prefix) or info.get("type") == "directory" or path.endswith("/"):
                continue
            rel = path[len(prefix) :]
            entries.append(self._entry(info, rel))
            parent = posixpath.dirname(rel)
            while parent and parent not in folders:
                folders.add(parent)
                parent = posixpath.dirname(parent)
        if not entries:
            self._raise_if_missing_or_file()
        # Object stores have no folders, and backends infer them differently: derive them from the keys.
        entries.extend(FileEntry(folder, "directory", 0, None) for folder in folders)
        entries.sort(key=lambda e: e.path)
        return entries

    def _forget_listings(self) -> None:
        """Drop cached listings of this location and everything below it (s3fs and gcsfs keep them forever, and
        ``invalidate_cache(path)`` forgets the path and its parents, not its sub-folders)."""
        self.fs.invalidate_cache(self.root)
        cache = getattr(self.fs, "dircache", None)
        if cache:
            prefix = self.root.rstrip("/") + "/"
            for key in [k for k in list(cache) if k.startswith(prefix)]:
                cache.pop(key, None)

    def _raise_if_missing_or_file(self) -> None:
        """An empty listing on an object store means a missing prefix, a file, or a missing bucket."""
        with self.errors():
            try:
                info = self.fs.info(self.root)
            except FileNotFoundError:
                if self._bucket_missing():
                    raise NoSuchBucketError(f"no such bucket: {self._bucket_url()}", url=self.url) from None
                raise NotFoundError(f"no such file or folder: {self.url}", url=self.url) from None
        if info.get("type") == "file":
            raise NotADirectoryRunError(
                f"{self.url} is a file; expected a folder of checkpoints", url=self.url
            )

    def _walk_local(self) -> list[FileEntry]:
        """Walk by directory descriptors (``scandir(fd)``, ``lstat`` and ``readlink`` relative to it): a path
        longer than PATH_MAX inside a run is listed instead of failing the walk, a folder swapped for a link
        mid-walk is never entered (``O_NOFOLLOW``), and only one descriptor per level is open at a time."""
        root = self.root or "/"
        with self.errors():
            top = os.stat(root)
            if not stat.S_ISDIR(top.st_mode):
                raise NotADirectoryRunError(
                    f"{self.url} is a file; expected a folder of checkpoints", url=self.url
                )
            entries: list[FileEntry] = []
            root_fd = os.open(root, _DIR_FLAGS)
            # Each level: its descriptor, its path relative to the root, and the sub-folders still to visit.
            stack: list[tuple[int, str, list[str]]] = [(root_fd, "", self._scan_dir(root_fd, "", entries))]
            try:
                while stack:
                    fd, rel_dir, todo = stack[-1]
                    if not todo:
                        os.close(fd)
                        stack.pop()
                        continue
                    name = todo.pop()
                    rel = f"{rel_dir}/{name}" if rel_dir else name
                    if len(stack) >= _MAX_WALK_DEPTH:
                        continue
                    try:
                        child = os.open(name, _DIR_FLAGS | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                            continue  # gone, or replaced by a link or a file since it was listed
                        raise
                    stack.append((child, rel, self._scan_dir(child, rel, entries)))
            finally:
                for fd, _, _ in stack:
                    os.close(fd)
        entries.sort(key=lambda e: e.path)
        return entries

    def _scan_dir(self, fd: int, rel_dir: str, entries: list[FileEntry]) -> list[str]:
        """Append one folder's entries; return the names of its sub-folders."""
        folders: list[str] = []
        with os.scandir(fd) as it:
            for item in it:
                rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                st = item.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raw = os.readlink(item.name, dir_fd=fd)
                    entries.append(self._link_entry(rel, raw, st.st_mtime))
                    continue
                kind: EntryType = "directory" if stat.S_ISDIR(st.st_mode) else "file"
                entries.append(FileEntry(rel, kind, st.st_size if kind == "file" else 0, st.st_mtime))
                if kind == "directory":
                    folders.append(item.name)
        return folders

    def _link_entry(self, rel: str, raw: str, mtime: float) -> FileEntry:
        """A link as a pointer: its target relative to the root when it stays inside, else as written."""
        root = os.path.normpath(self.root or "/")
        absolute = os.path.normpath(os.path.join(root, os.path.dirname(rel), raw))
        inside = os.path.commonpath([absolute, root]) == root
        target = os.path.relpath(absolute, root).replace(os.sep, "/") if inside else raw
        return FileEntry(rel, "link", 0, mtime, link_target=target)

    def _local_entry(self, path: str, rel: str) -> FileEntry:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return self._link_entry(rel, os.readlink(path), st.st_mtime)
        kind: EntryType = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        return FileEntry(rel, kind, st.st_size if kind == "file" else 0, st.st_mtime)

    def _entry(self, info: dict[str, Any], rel: str) -> FileEntry:
        kind: EntryType = "directory" if info.get("type") == "directory" else "file"
        etag = info.get("ETag") or info.get("etag")
        checksum = None
        if info.get("md5Hash"):
            checksum = f"md5:{info['md5Hash']}"
        elif info.get("crc32c"):
            checksum = f"crc32c:{info['crc32c']}"
        return FileEntry(
            path=rel,
            type=kind,
            size=int(info.get("size") or 0) if kind == "file" else 0,
            mtime=_mtime_of(info),
            etag=etag.strip('"') if isinstance(etag, str) else None,
            checksum=checksum,
        )

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file, in one ranged request (never a buffered ``open``)."""
        with self.errors(rel):
            return bytes(self.fs.cat_file(self.full_path(rel), start=start, end=end))

    def read_bytes(self, rel: str, *, max_bytes: int = SMALL_FILE_LIMIT) -> bytes:
        """A whole small file (pointer files, trainer_state.json, manifests, metric files), at most ``max_bytes``.

        Such files come from other people's runs: a FIFO named ``latest`` would block a plain read forever and
        ``/dev/zero`` or a sparse 2 GiB ``latest`` would fill memory. Locally only a regular file is read, opened
        without blocking and, below the location, without following a link (the root itself is what the user
        named); anything else raises NotARegularFileError. Everywhere a file over ``max_bytes`` raises
        InputTooLargeError after reading at most ``max_bytes + 1`` bytes (one ranged GET on an object store).
        """
        with self.errors(rel):
            if self.is_local:
                return self._read_local_capped(rel, max_bytes)
            data = bytes(self.fs.cat_file(self.full_path(rel), start=0, end=max_bytes + 1))
        if len(data) > max_bytes:
            raise self._too_large(rel, max_bytes)
        return data

    def _too_large(self, rel: str, max_bytes: int) -> InputTooLargeError:
        return InputTooLargeError(
            f"{self.url_of(rel)} is larger than the {max_bytes:,} bytes a file of its kind can be; not read",
            url=self.url_of(rel),
        )

    def _read_local_capped(self, rel: str, max_bytes: int) -> bytes:
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        if rel:
            flags |= getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.full_path(rel), flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotARegularFileError(
                    f"{self.url_of(rel)} is a symbolic link; ckptctl does not follow it", url=self.url_of(rel)
                ) from exc
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFileError(
                    f"{self.url_of(rel)} is not a regular file (a FIFO, device or socket); not read",
                    url=self.url_of(rel),
                )
            if info.st_size > max_bytes:
                raise self._too_large(rel, max_bytes)
            chunks: list[bytes] = []
            left = max_bytes + 1
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise self._too_large(rel, max_bytes)
        return data

    # -- writing and deleting ---------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file so that no reader ever sees it half-written.

        Local disks: a temporary file in the same folder, fsync, rename, fsync of the folder. Object stores: one
        PUT, which the store makes visible only once whole.
        """
        from ckptctl.storage.atomic import atomic_write_local

        if self.is_local:
            with self.errors(rel):
                atomic_write_local(self.full_path(rel), data)
            return
        with self.errors(rel):
            self.fs.pipe_file(self.full_path(rel), data)

    def delete_files(self, rels: list[str], *, batch_size: int = 1000, verify: bool = True) -> list[str]:
        """Delete files (never folders recursively) and return the ones that are still there afterwards.

        Object stores get batched deletes (S3 DeleteObjects takes 1,000 keys a request). Because s3fs and gcsfs
        drop per-key errors, success is not taken on trust: what is left is re-listed and returned, so a caller
        can report a partial deletion instead of a silent one (``verify=False`` skips that listing for a caller
        that verifies a larger batch itself, and returns []). Empty local folders left behind are removed.
        """
        if not rels:
            return []
        if self.is_local:
            return self._delete_local(rels)
        paths = [self.full_path(rel) for rel in rels]
        with self.errors():
            for start in range(0, len(paths), batch_size):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(paths[start : start + batch_size])
        return self.still_present(rels) if verify else []

    def still_present(self, rels: list[str]) -> list[str]:
        """Which of ``rels`` exist now, by one fresh listing (local disks: a stat each)."""
        if self.is_local:
            return [rel for rel in rels if os.path.lexists(self.full_path(rel))]
        wanted = set(rels)
        with self.errors():
            self._forget_listings()
            present = self.fs.find(self.root)
        prefix = self.root.rstrip("/") + "/"
        remaining = {p[len(prefix) :] for p in present if p.startswith(prefix)}
        return sorted(wanted & remaining)

    def _delete_local(self, rels: list[str]) -> list[str]:
        failed: list[str] = []
        parents: set[str] = set()
        for rel in rels:
            path = self.full_path(rel)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                failed.append(rel)
            parent = posixpath.dirname(rel)
            while parent:
                parents.add(parent)
                parent = posixpath.dirname(parent)
        for parent in sorted(parents, key=lambda p: p.count("/"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(self.full_path(parent))
        return failed

    def require_bucket(self) -> None:
        """Fail early (before hours of work) when the bucket to write into does not exist or the store cannot be
        reached (an unreachable endpoint must not read as a missing bucket)."""
        bucket = self._bucket()
        if bucket is None:
            return
        try:
            with self.errors():
                self.fs.info(bucket)
        except NotFoundError:
            raise NoSuchBucketError(f"no such bucket: {self._bucket_url()}", url=self.url) from None

    def upload_file(self, local_path: str, rel: str) -> None:
        """Copy a local file to ``rel``. Object stores make it visible only once whole (single or multipart PUT);
        locally it goes through a temporary name and a rename. The bytes take tier's verified copy
        (``storage.transfer.upload``: hashed once as they pass, checked against what the store reports)."""
        from ckptctl.storage.transfer import upload

        upload(local_path, self, rel)

    def remove_empty_folder(self, rel: str) -> None:
        """Remove a folder marker left after its files were deleted (local rmdir; a no-op on object stores)."""
        if self.is_local:
            with contextlib.suppress(OSError):
                os.rmdir(self.full_path(rel))

    # -- where two locations meet -----------------------------------------------------------------------------
    def relation_to(self, other: Location) -> Overlap | None:
        """Where this location lies against ``other``: ``same`` place, ``inside`` it, ``contains`` it, or None.

        Local paths are compared resolved (the real path of the part that exists, so a link or ``..`` cannot hide
        an overlap) and then by inode for the parts that exist (a bind mount or a hard link is the same place
        under another name). Object stores compare protocol, bucket and key prefix by whole segments
        (``s3://b/run`` and ``s3://b/run2`` are apart); endpoints are not compared, so the same bucket and key
        reached two ways count as one place: this refuses too much rather than too little.
        """
        if self.is_local != other.is_local:
            return None
        if self.is_local:
            return _local_relation(self.root or "/", other.root or "/")
        mine, theirs = (_PROTOCOL_ALIASES.get(p, p) for p in (self.protocol, other.protocol))
        if mine != theirs:
            return None
        return _segments_relation(_segments(self.root), _segments(other.root))

    def overlaps(self, other: Location) -> bool:
        """Whether one of the two is, contains or lies inside the other (see ``relation_to``)."""
        return self.relation_to(other) is not None


Overlap = Literal["same", "inside", "contains"]
_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "local": "file"}
_OVERLAP_WORDS: dict[Overlap, str] = {
    "same": "is the same place as",
    "inside": "lies inside",
    "contains": "contains",
}


def refuse_overlap(output: Location, source: Location, *, output_role: str, source_role: str) -> None:
    """Raise OutputOverlapsInputError when ``output`` is, contains or lies inside ``source``; call it before
    anything is written or deleted (an OUT inside SRC would overwrite, or a --force delete, what is being read)."""
    relation = output.relation_to(source)
    if relation is None:
        return
    raise OutputOverlapsInputError(
        f"{output_role} {output.url} {_OVERLAP_WORDS[relation]} {source_role} {source.url}: "
        "ckptctl never writes where it reads",
        url=output.url,
        hint=f"{output_role} must be neither {source_role}, nor inside it, nor around it",
    )


def _segments(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part not in ("", "."))


def _segments_relation(mine: tuple[str, ...], theirs: tuple[str, ...]) -> Overlap | None:
    if mine == theirs:
        return "same"
    if mine[: len(theirs)] == theirs:
        return "inside"
    if theirs[: len(mine)] == mine:
        return "contains"
    return None


def _local_relation(mine: str, theirs: str) -> Overlap | None:
    real_mine, real_theirs = os.path.realpath(mine), os.path.realpath(theirs)
    found = _segments_relation(_segments(real_mine), _segments(real_theirs))
    if found is not None:
        return found
    below = _at_or_below_by_inode(real_mine, real_theirs)
    if below is not None:
        return "same" if below == 0 else "inside"
    return "contains" if _at_or_below_by_inode(real_theirs, real_mine) is not None else None


def _at_or_below_by_inode(inner: str, outer: str) -> int | None:
    """How many levels ``inner`` lies below the existing ``outer`` (0: the same file or folder), comparing the
    inodes of ``inner`` and each existing ancestor with ``outer``'s; None when it is not below it."""
    try:
        target = os.stat(outer)
    except OSError:
        return None
    path, depth = inner, 0
    while True:
        try:
            found = os.stat(path)
        except OSError:
            pass
        else:
            if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                return depth
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path, depth = parent, depth + 1
