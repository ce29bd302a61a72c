"""The tier manifest: the one object that makes a remote copy of a checkpoint real.

``push`` writes ``<remote run>/.ckptctl-tier/<unit>.json`` only after every file of the unit is uploaded and
verified, so a unit without a valid manifest is not tiered, whatever files exist. The manifest lists every file
with its size and digest (``storage.transfer``: MD5, S3-ETag-shaped for multipart files); ``status`` and ``pull``
check the store against it. ``remote_view`` reads the remote run in one listing plus one GET per manifest.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from ckptctl import __version__
from ckptctl.errors import IntegrityError, NoSuchBucketError, NotFoundError
from ckptctl.storage.location import FileEntry, Location
from ckptctl.storage.transfer import MAX_PARTS, MIN_PART_SIZE, reread_digest, store_digest

MANIFEST_DIR = ".ckptctl-tier"
MANIFEST_VERSION = 1
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


@dataclass(frozen=True)
class ManifestFile:
    path: str
    """Relative to the run, as on the local disk."""
    size: int
    digest: str
    part_size: int | None
    mtime: float | None = None
    """The local modification time, restored by pull (the catalog orders and settles checkpoints by it)."""


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

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> bytes:
        payload = {
            "ckptctl_manifest_version": MANIFEST_VERSION,
            "ckptctl_version": self.ckptctl_version,
            "unit": self.unit,
            "kind": self.kind,
            "step": self.step,
            "layout": self.layout,
            "source": self.source,
            "created": self.created,
            "total_bytes": self.total_bytes,
            "files": [
                {
                    "path": f.path,
                    "size": f.size,
                    "digest": f.digest,
                    "part_size": f.part_size,
                    "mtime": f.mtime,
                }
                for f in self.files
            ],
        }
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
        if type(version) is not int or version != MANIFEST_VERSION:
            raise _Invalid(f"not a ckptctl manifest of a known version ({_shown(version)})")
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
        files = tuple(_file(entry, index) for index, entry in enumerate(raw_files))
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


def _file(entry: Any, index: int) -> ManifestFile:
    where = f"files[{index}]"
    if not isinstance(entry, dict):
        raise _Invalid(f"{where} is not an object")
    path = _string(entry, "path")
    where = f"file {_shown(path)}"
    size = _integer(entry.get("size"), f"{where}: size", 0, MAX_SIZE)
    digest = _string(entry, "digest")
    if not _DIGEST.fullmatch(digest):
        raise _Invalid(f"{where}: digest {_shown(digest)} is not an MD5 (or S3 multipart ETag)")
    part_size = entry.get("part_size")
    if part_size is not None:
        _integer(part_size, f"{where}: part_size", MIN_PART_SIZE, MAX_PART_SIZE)
        if -(-size // part_size) > MAX_PARTS:
            raise _Invalid(f"{where}: {size} bytes in parts of {part_size} is over {MAX_PARTS} parts")
    mtime = entry.get("mtime")
    return ManifestFile(
        path, size, digest, part_size, None if mtime is None else _timestamp(mtime, f"{where}: mtime")
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
    manifests: dict[str, Manifest] = {}
    bad: dict[str, BadManifest] = {}
    for path in entries:
        if not (path.startswith(MANIFEST_DIR + "/") and path.endswith(".json")):
            continue
        url = location.url_of(path)
        payload: Any = None
        try:
            # IntegrityError covers a FIFO or a link in its place and one over the size cap (storage.location).
            payload = parse_manifest_json(location.read_bytes(path, max_bytes=MAX_MANIFEST_BYTES), name=url)
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
    return RemoteView(location, entries, manifests, bad, exists=True)


@dataclass(frozen=True)
class Check:
    """How well the store matches a manifest: ``verified`` (sizes and the store's own checksums agree),
    ``size-only`` (the store reports no checksum and no re-read was asked for), or ``bad`` with the problems."""

    state: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state in ("verified", "size-only")


def check_manifest(view: RemoteView, manifest: Manifest, *, reread: bool = False) -> Check:
    """Compare every file of a manifest with the listed object: present, same size, same digest."""
    problems: list[str] = []
    size_only = False
    for item in manifest.files:
        entry = view.entries.get(item.path)
        if entry is None:
            problems.append(f"{item.path}: missing on the store")
            continue
        if entry.size != item.size:
            problems.append(f"{item.path}: {entry.size} bytes on the store, {item.size} in the manifest")
            continue
        theirs = store_digest(entry, item.part_size)
        if theirs is None and reread:
            theirs = reread_digest(view.location, item.path, item.part_size)
        if theirs is None:
            size_only = True
        elif theirs != item.digest:
            problems.append(f"{item.path}: digest {theirs} on the store, {item.digest} in the manifest")
    if problems:
        return Check("bad", tuple(problems))
    return Check("size-only" if size_only else "verified")


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    return {
        "unit": manifest.unit,
        "step": manifest.step,
        "layout": manifest.layout,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        "created": manifest.created,
    }
