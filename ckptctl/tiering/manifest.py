"""The tier manifest: the one object that makes a remote copy of a checkpoint real.

``push`` writes ``<remote run>/.ckptctl-tier/<unit>.json`` only after every file of the unit is uploaded and
verified, so a unit without a valid manifest is not tiered, whatever files exist. The manifest lists every file
with its size and digest; ``status`` and ``pull`` check the store against it. ``remote_view`` reads the remote run in
one listing plus one GET per manifest.

Version 2 (written by push): per file ``size``, full-object ``crc64nvme`` and ``crc32c`` (base64, as S3 and GCS
print them; ``storage.checksums``), the ``part_size`` it was uploaded with, and the store's ``etag`` once verified
(an "unchanged since push" token); per manifest the store's checksum ``store_level`` (``storage.s3_data``).
Version 1 (still read, never written by push): per file an MD5 ``digest``, S3-ETag-shaped for multipart files of
``part_size``. Both are validated field by field: a manifest is remote input.

The run's own files (config.json, tokenizer files, metric files, logs: ``tiering.run_files``) have one manifest of
the same v2 shape, ``.ckptctl-tier/run-files.manifest`` (unit ``""``, layout ``run-files``, no step). Its name does
not end in ``.json``, so nothing that looks for checkpoint manifests (``unit_of_manifest``, ``remote_view``'s
checkpoints, ``ckptctl runs``) ever takes it for one.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptctl import __version__
from ckptctl.errors import IntegrityError, NoSuchBucketError, NotFoundError
from ckptctl.storage.checksums import CRC32C_BYTES, CRC64_BYTES, Hasher, crc_from_b64
from ckptctl.storage.location import FileEntry, Location
from ckptctl.storage.transfer import (
    MAX_PARTS,
    MIN_PART_SIZE,
    is_s3,
    reread,
    store_md5_digest,
    stored_checksum,
)

if TYPE_CHECKING:
    from ckptctl.storage.s3_data import S3DataPath

MANIFEST_DIR = ".ckptctl-tier"
MANIFEST_VERSION = 2
VERSIONS = (1, 2)
STORE_LEVELS = ("A", "B", "C", "crc32c")
"""What verified the objects at push (``storage.s3_data`` levels; ``crc32c``: GCS's own CRC32C)."""
MAX_ETAG = 256
MAX_MANIFEST_BYTES = 32 * 2**20
"""About 150,000 files of one checkpoint; a manifest is read whole, so this bounds the memory it can cost."""
MAX_PART_SIZE = 5 * 2**30  # S3's maximum part size
MAX_SIZE = 2**63 - 1  # a file's size as an off_t
MAX_STEP = 2**63 - 1
TIMESTAMPS = (-(2**31), 2**33)
"""Times a manifest may hold (1901 to 2242): what every platform's ``time_t`` and ``datetime`` represent, so a
restored mtime never overflows. ``push`` records a file time outside it as unknown."""
_DIGEST = re.compile(r"[0-9a-f]{32}(?:-[1-9][0-9]{0,4})?")
KINDS = ("dir", "file")
RUN_FILES_MANIFEST = f"{MANIFEST_DIR}/run-files.manifest"
"""The manifest of the run's own files (``tiering.run_files``), relative to the remote run."""
LEVEL_PROBE = f"{MANIFEST_DIR}/checksum-probe"
"""The object a push writes and deletes before its first S3 upload to learn the store's checksum level
(``storage.s3_data``); not ``.json``, so a probe left by a killed push is never read as a manifest."""
RUN_FILES_LAYOUT = "run-files"
"""The ``layout`` of that manifest: it describes no checkpoint."""


@dataclass(frozen=True)
class ManifestFile:
    path: str
    """Relative to the run, as on the local disk."""
    size: int
    digest: str | None
    """v1 only: the MD5 (S3-ETag-shaped for parts of ``part_size``)."""
    part_size: int | None
    mtime: float | None = None
    """The local modification time, restored by pull (the catalog orders and settles checkpoints by it)."""
    crc64nvme: str | None = None
    """v2: full-object CRC64NVME, base64."""
    crc32c: str | None = None
    """v2: full-object CRC32C, base64."""
    etag: str | None = None
    """v2: the store's ETag once the object was verified (None where the store has none)."""
    mode: int | None = None
    """The file's permission bits at push (0o777 at most; v2 pushes record it); pull gives them back, less the
    puller's umask."""

    @property
    def md5_part_size(self) -> int | None:
        """What a ``Hasher`` needs to check this file: v1 MD5 parts (0: one MD5), None for v2 (CRCs only)."""
        return None if self.digest is None else (self.part_size or 0)

    def matches(self, hasher: Hasher) -> bool:
        """Whether the bytes ``hasher`` was fed are this file."""
        if self.digest is not None:
            return hasher.digest.size == self.size and hasher.etag == self.digest
        return (
            hasher.digest.size == self.size
            and hasher.digest.crc64nvme_b64 == self.crc64nvme
            and hasher.digest.crc32c_b64 == self.crc32c
        )

    def shown(self, hasher: Hasher | None = None) -> str:
        """This file's digest for a message (or what ``hasher`` computed, in the same form)."""
        if self.digest is not None:
            return hasher.etag if hasher else self.digest
        if hasher is None:
            return f"CRC64NVME {self.crc64nvme}"
        return f"CRC64NVME {hasher.digest.crc64nvme_b64} ({hasher.digest.size} bytes)"


@dataclass(frozen=True)
class Manifest:
    unit: str
    kind: str
    step: int | None
    layout: str
    files: tuple[ManifestFile, ...]
    source: str
    created: float = field(default_factory=time.time)
    ckptctl_version: str = __version__
    store_level: str | None = None
    """v2: what verified the objects at push (STORE_LEVELS), None where nothing but sizes and a re-read could."""

    @property
    def version(self) -> int:
        """2 when every file has CRCs, else 1 (v1 manifests are re-encoded as they were read)."""
        return 2 if all(f.crc64nvme is not None for f in self.files) else 1

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> bytes:
        payload: dict[str, Any] = {
            "ckptctl_manifest_version": self.version,
            "ckptctl_version": self.ckptctl_version,
            "unit": self.unit,
            "kind": self.kind,
            "step": self.step,
            "layout": self.layout,
            "source": self.source,
            "created": self.created,
            "total_bytes": self.total_bytes,
            "files": [_encoded_file(f, self.version) for f in self.files],
        }
        if self.version == 2:
            payload["store_level"] = self.store_level
        return json.dumps(payload, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes, *, name: str = "manifest") -> Manifest:
        """Parse and validate a manifest (remote input: every field's type and range, once, here); anything that
        is not a whole, valid one raises IntegrityError naming ``name`` (the manifest's URL)."""
        return cls.from_payload(parse_manifest_json(data, name=name), name=name)

    @classmethod
    def from_payload(cls, payload: Any, *, name: str = "manifest") -> Manifest:
        """A manifest from its parsed JSON, checked field by field (see ``decode``)."""
        try:
            return cls._checked(payload)
        except _Invalid as exc:
            raise IntegrityError(f"{name}: {exc}", url=name) from None

    @classmethod
    def _checked(cls, payload: Any) -> Manifest:
        if not isinstance(payload, dict):
            raise _Invalid("not a JSON object")
        version = payload.get("ckptctl_manifest_version")
        if type(version) is not int or version not in VERSIONS:
            raise _Invalid(f"not a ckptctl manifest of a known version ({_shown(version)})")
        level = payload.get("store_level") if version == 2 else None
        if level is not None and level not in STORE_LEVELS:
            raise _Invalid(f"store_level {_shown(level)} is not one of {', '.join(STORE_LEVELS)}")
        unit = _string(payload, "unit")
        kind = _string(payload, "kind")
        if kind not in KINDS:
            raise _Invalid(f"kind {_shown(kind)} is not one of {', '.join(KINDS)}")
        step = payload.get("step")
        if step is not None:
            _integer(step, "step", 0, MAX_STEP)
        raw_files = payload.get("files")
        if not isinstance(raw_files, list) or not raw_files:
            raise _Invalid("files is not a non-empty list")
        files = tuple(_file(entry, index, version) for index, entry in enumerate(raw_files))
        paths = [f.path for f in files]
        _check_paths(unit, kind, paths)
        if len(set(paths)) != len(paths):
            raise _Invalid("a file is listed twice")
        total = payload.get("total_bytes")
        if total is not None and (type(total) is not int or total != sum(f.size for f in files)):
            raise _Invalid(f"total_bytes {_shown(total)} is not the sum of the file sizes")
        created = payload.get("created", 0)
        return cls(
            unit=unit,
            kind=kind,
            step=step,
            layout=_string(payload, "layout"),
            files=files,
            source=_string(payload, "source", ""),
            created=_timestamp(created, "created"),
            ckptctl_version=_string(payload, "ckptctl_version", ""),
            store_level=level,
        )


class _Invalid(ValueError):
    """One field of a manifest is wrong (``Manifest.from_payload`` turns it into an IntegrityError)."""


def parse_manifest_json(data: bytes, *, name: str = "manifest") -> Any:
    """The JSON of a manifest; not JSON (or nested deeper than the parser goes) is an IntegrityError."""
    try:
        return json.loads(data)
    except RecursionError:
        raise IntegrityError(f"{name}: JSON nested too deeply: not a ckptctl manifest", url=name) from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise IntegrityError(f"{name}: not valid JSON ({exc})", url=name) from None


def plausible_timestamp(value: float | None) -> float | None:
    """``value`` when a manifest may hold it as a time (finite, within TIMESTAMPS), else None."""
    if value is None or not math.isfinite(value) or not TIMESTAMPS[0] <= value <= TIMESTAMPS[1]:
        return None
    return value


_JSON_KINDS: dict[type, str] = {list: "a list", dict: "an object"}  # json.loads gives these, and scalars


def _shown(value: Any) -> str:
    """A field's value for a message, short whatever it holds."""
    scalar = isinstance(value, (str, int, float, bool)) or value is None
    text = repr(value) if scalar else _JSON_KINDS.get(type(value), type(value).__name__)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(payload: dict[str, Any], key: str, default: str | None = None) -> str:
    value = payload.get(key, default)
    if not isinstance(value, str):
        raise _Invalid(f"{key} is {_shown(value)}, not a string")
    return value


def _integer(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise _Invalid(f"{what} is {_shown(value)}, not an integer")
    if not low <= value <= high:
        raise _Invalid(f"{what} {_shown(value)} is outside {low}..{high}")
    return value


def _timestamp(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise _Invalid(f"{what} is {_shown(value)}, not a number")
    if plausible_timestamp(value) is None:
        raise _Invalid(f"{what} {_shown(value)} is not a plausible time (seconds since 1970)")
    return float(value)


def _encoded_file(item: ManifestFile, version: int) -> dict[str, Any]:
    if version == 1:
        return {
            "path": item.path,
            "size": item.size,
            "digest": item.digest,
            "part_size": item.part_size,
            "mtime": item.mtime,
        }
    return {
        "path": item.path,
        "size": item.size,
        "crc64nvme": item.crc64nvme,
        "crc32c": item.crc32c,
        "part_size": item.part_size,
        "etag": item.etag,
        "mtime": item.mtime,
        **({"mode": item.mode} if item.mode is not None else {}),
    }


def _crc(entry: dict[str, Any], key: str, width: int, where: str) -> str:
    value = _string(entry, key)
    if crc_from_b64(value, width) is None:
        raise _Invalid(f"{where}: {key} {_shown(value)} is not a base64 {8 * width}-bit CRC")
    return value


def _file(entry: Any, index: int, version: int) -> ManifestFile:
    where = f"files[{index}]"
    if not isinstance(entry, dict):
        raise _Invalid(f"{where} is not an object")
    path = _string(entry, "path")
    where = f"file {_shown(path)}"
    size = _integer(entry.get("size"), f"{where}: size", 0, MAX_SIZE)
    digest = crc64 = crc32c = etag = None
    if version == 1:
        digest = _string(entry, "digest")
        if not _DIGEST.fullmatch(digest):
            raise _Invalid(f"{where}: digest {_shown(digest)} is not an MD5 (or S3 multipart ETag)")
    else:
        crc64 = _crc(entry, "crc64nvme", CRC64_BYTES, where)
        crc32c = _crc(entry, "crc32c", CRC32C_BYTES, where)
        etag = entry.get("etag")
        if etag is not None and (
            not isinstance(etag, str) or not 0 < len(etag) <= MAX_ETAG or not etag.isprintable()
        ):
            raise _Invalid(f"{where}: etag {_shown(etag)} is not a short printable string")
    part_size = entry.get("part_size")
    if part_size is not None:
        _integer(part_size, f"{where}: part_size", MIN_PART_SIZE, MAX_PART_SIZE)
        if -(-size // part_size) > MAX_PARTS:
            raise _Invalid(f"{where}: {size} bytes in parts of {part_size} is over {MAX_PARTS} parts")
    mtime = entry.get("mtime")
    mode = entry.get("mode")
    return ManifestFile(
        path,
        size,
        digest,
        part_size,
        None if mtime is None else _timestamp(mtime, f"{where}: mtime"),
        crc64,
        crc32c,
        etag,
        None if mode is None else _integer(mode, f"{where}: mode", 0, 0o777),
    )


def _check_paths(unit: str, kind: str, paths: list[str]) -> None:
    """Refuse paths that would leave the run (pull writes them under DEST): a manifest is remote input."""
    for path in (unit, *paths):
        if not is_safe_path(path):
            raise _Invalid(f"unsafe path {_shown(path)}")
    prefix = f"{unit}/" if unit else ""
    for path in paths:
        if (path != unit) if kind == "file" else not path.startswith(prefix):
            raise _Invalid(f"file {_shown(path)} is outside its checkpoint {_shown(unit)}")


def is_safe_path(path: str) -> bool:
    """A relative, '/'-separated path that stays where it is joined ("" is the run itself) and that the local
    disk can spell (no NUL; undecodable names only as the surrogate escapes ``os`` gives them)."""
    if not path:
        return True
    try:
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    parts = path.split("/")
    return not (
        path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts)
    )


def manifest_rel(unit_path: str) -> str:
    """Where a unit's manifest lives, relative to the remote run."""
    return f"{MANIFEST_DIR}/{urllib.parse.quote(unit_path or '.', safe='')}.json"


def unit_of_manifest(rel: str) -> str | None:
    """The checkpoint a manifest is for, from its file name (``manifest_rel`` reversed); None when the name is
    not one ``manifest_rel`` gives."""
    name = rel[len(MANIFEST_DIR) + 1 :] if rel.startswith(MANIFEST_DIR + "/") else ""
    if "/" in name or not name.endswith(".json"):
        return None
    unit = urllib.parse.unquote(name[: -len(".json")], errors="surrogateescape")
    unit = "" if unit == "." else unit
    return unit if is_safe_path(unit) and manifest_rel(unit) == rel else None


@dataclass(frozen=True)
class BadManifest:
    """A manifest that is there but cannot be trusted (unreadable, not JSON, a field of the wrong type or range,
    an unsafe path): its checkpoint is on the remote in a state no one can verify, reported as corrupt."""

    rel: str
    """The manifest, relative to the remote run."""
    unit: str | None
    """The checkpoint it is for, from its file name (None when the name does not decode to a safe path)."""
    step: int | None
    """The step it claims, when that field at least is a plain integer."""
    error: IntegrityError

    @property
    def shown(self) -> str:
        """What to call it: its checkpoint's path, else the manifest's."""
        return self.unit if self.unit is not None else self.rel


@dataclass
class RemoteView:
    """The remote run as one listing: its objects by path, the manifests that validated, and those that did not."""

    location: Location
    entries: dict[str, FileEntry]
    manifests: dict[str, Manifest]
    bad_manifests: dict[str, BadManifest]
    """By manifest path (relative to the remote run)."""
    exists: bool
    run_files: Manifest | None = None
    """The manifest of the run's own files (``RUN_FILES_MANIFEST``) when there is a valid one."""
    bad_run_files: BadManifest | None = None
    """That manifest when it is there but cannot be trusted (never used; push rewrites it)."""

    def objects_of(self, unit_path: str, kind: str) -> list[FileEntry]:
        """Objects that belong to a unit (whatever a manifest says): for partial uploads and repairs."""
        if kind == "file":
            entry = self.entries.get(unit_path)
            return [entry] if entry else []
        prefix = f"{unit_path}/" if unit_path else ""
        return [
            e
            for path, e in self.entries.items()
            if path.startswith(prefix) and not path.startswith(MANIFEST_DIR)
        ]


def remote_view(location: Location) -> RemoteView:
    """List the remote run once and read its manifests; a missing run folder is an empty view (not a missing
    bucket: that is an error). A manifest that cannot be read or does not validate is kept in ``bad_manifests``,
    never used and never an exception: one bad checkpoint does not hide the others."""
    try:
        listing = location.walk()
    except NoSuchBucketError:
        raise
    except NotFoundError:
        return RemoteView(location, {}, {}, {}, exists=False)
    entries = {e.path: e for e in listing if e.type == "file"}
    wanted = [p for p in entries if p.startswith(MANIFEST_DIR + "/") and p.endswith(".json")]
    payloads = _read_payloads(location, wanted + [p for p in (RUN_FILES_MANIFEST,) if p in entries])
    manifests: dict[str, Manifest] = {}
    bad: dict[str, BadManifest] = {}
    for path in wanted:
        url = location.url_of(path)
        payload = payloads[path]
        try:
            if isinstance(payload, IntegrityError):
                raise payload
            manifest = Manifest.from_payload(payload, name=url)
            if manifest_rel(manifest.unit) != path:
                raise IntegrityError(
                    f"{url}: names checkpoint {_shown(manifest.unit)}, whose manifest is elsewhere"
                )
        except IntegrityError as exc:
            step = payload.get("step") if isinstance(payload, dict) else None
            claimed = step if type(step) is int and 0 <= step <= MAX_STEP else None
            bad[path] = BadManifest(path, unit_of_manifest(path), claimed, exc)
            continue
        manifests[manifest.unit] = manifest
    run_files = bad_run_files = None
    if RUN_FILES_MANIFEST in entries:
        try:
            url = location.url_of(RUN_FILES_MANIFEST)
            payload = payloads[RUN_FILES_MANIFEST]
            if isinstance(payload, IntegrityError):
                raise payload
            run_files = Manifest.from_payload(payload, name=url)
            _check_run_files(run_files, url)
        except IntegrityError as exc:
            run_files, bad_run_files = None, BadManifest(RUN_FILES_MANIFEST, None, None, exc)
    return RemoteView(location, entries, manifests, bad, True, run_files, bad_run_files)


MANIFEST_READERS = 16
"""Manifests read side by side: one GET each, ~50 ms apiece on a store (10 checkpoints: 0.5 s one by one)."""


def _read_payloads(location: Location, paths: list[str]) -> dict[str, Any]:
    """Each manifest's parsed JSON, or the IntegrityError that reading or parsing it raised (any other error
    propagates, as one read would raise it); read on threads when there are several."""

    def one(path: str) -> Any:
        try:
            return _read_payload(location, path)
        except IntegrityError as exc:
            return exc

    if len(paths) < 2:
        return {p: one(p) for p in paths}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(MANIFEST_READERS, len(paths)), thread_name_prefix="ckptctl-manifest") as pool:
        return dict(zip(paths, pool.map(one, paths), strict=True))


def _read_payload(location: Location, path: str) -> Any:
    """One manifest object's parsed JSON (validated by ``Manifest.from_payload`` after, so that a bad one's step
    can still be reported)."""
    # IntegrityError covers a FIFO or a link in its place and one over the size cap (storage.location).
    data = location.read_bytes(path, max_bytes=MAX_MANIFEST_BYTES)
    return parse_manifest_json(data, name=location.url_of(path))


def _check_run_files(manifest: Manifest, url: str) -> None:
    """The run-files manifest describes the run itself, never a checkpoint: anything else is not one."""
    if (manifest.unit, manifest.kind, manifest.layout, manifest.step) != ("", "dir", RUN_FILES_LAYOUT, None):
        raise IntegrityError(f"{url}: not a run-files manifest (unit, kind, layout or step)", url=url)


@dataclass(frozen=True)
class Check:
    """How well the store matches a manifest: ``verified`` (sizes and the store's own checksums agree),
    ``size-only`` (the store reports no checksum and no re-read was asked for), or ``bad`` with the problems."""

    state: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state in ("verified", "size-only")


def check_manifest(
    view: RemoteView, manifest: Manifest, *, reread: bool = False, data: S3DataPath | None = None
) -> Check:
    """Compare every file of a manifest with the listed object: present, same size, same bytes as far as the
    listing tells (v2: the ETag recorded once push verified the object, or GCS's CRC32C; v1: the MD5-shaped
    ETag or md5Hash). With ``reread``: the store's own full-object checksum (S3 HeadObject with ChecksumMode,
    GCS ``info``: one request a file) or, where it keeps none, the object read back and hashed."""
    problems: list[str] = []
    size_only = False
    if reread and data is None and is_s3(view.location):
        from ckptctl.storage.transfer import open_data_path

        data = open_data_path(view.location, 4)  # one client for every file's request
    for item in manifest.files:
        check = check_file(view, item, reread=reread, data=data)
        problems += check.problems
        size_only = size_only or check.state == "size-only"
    if problems:
        return Check("bad", tuple(problems))
    return Check("size-only" if size_only else "verified")


def check_file(
    view: RemoteView, item: ManifestFile, *, reread: bool = False, data: S3DataPath | None = None
) -> Check:
    """``check_manifest`` for one file: run files are restored and reported one by one, not as a whole."""
    entry = view.entries.get(item.path)
    if entry is None:
        return Check("bad", (f"{item.path}: missing on the store",))
    if entry.size != item.size:
        return Check("bad", (f"{item.path}: {entry.size} bytes on the store, {item.size} in the manifest",))
    verdict = _compare(view.location, item, entry, reread, data)
    if verdict is _UNKNOWN:
        return Check("size-only")
    if verdict is not None:
        return Check("bad", (f"{item.path}: {verdict}",))
    return Check("verified")


_UNKNOWN = "unknown"


def _compare(
    location: Location, item: ManifestFile, entry: FileEntry, reread_: bool, data: S3DataPath | None
) -> str | None:
    """None when the object is the manifest's file, ``_UNKNOWN`` when nothing tells, else what differs."""
    if item.digest is not None:
        theirs = store_md5_digest(entry, item.part_size)
        if theirs is None and reread_:
            theirs = reread(location, item.path, item.size, item.md5_part_size, data).etag
        if theirs is None:
            return _UNKNOWN
        return (
            None if theirs == item.digest else f"digest {theirs} on the store, {item.digest} in the manifest"
        )
    if reread_:
        stored = _stored_crc(location, item, data)
        if stored is not None:
            return stored or None
        hasher = reread(location, item.path, item.size, None, data)
        return (
            None
            if item.matches(hasher)
            else f"{item.shown(hasher)} on the store, {item.shown()} in the manifest"
        )
    if entry.checksum and entry.checksum.startswith("crc32c:"):
        theirs = entry.checksum[len("crc32c:") :]
        return (
            None if theirs == item.crc32c else f"CRC32C {theirs} on the store, {item.crc32c} in the manifest"
        )
    if item.etag is None or entry.etag is None:
        return _UNKNOWN
    if entry.etag == item.etag:
        return None
    return f"ETag {entry.etag} on the store, {item.etag} in the manifest: the object changed since push"


def _stored_crc(location: Location, item: ManifestFile, data: S3DataPath | None) -> str | None:
    """Compare the full-object checksum the store keeps (S3 CRC64NVME, GCS CRC32C) with the manifest's: "" when
    they agree, what differs when not, None when the store keeps none (then only a re-read can tell)."""
    held = stored_checksum(location, item.path, data)
    if held is None:
        return None
    name, theirs = held
    want = item.crc64nvme if name == "crc64nvme" else item.crc32c
    return "" if theirs == want else f"{name.upper()} {theirs} on the store, {want} in the manifest"


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    return {
        "unit": manifest.unit,
        "step": manifest.step,
        "layout": manifest.layout,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        "created": manifest.created,
    }
