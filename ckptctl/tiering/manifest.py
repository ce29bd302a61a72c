"""The tier manifest: the one object that makes a remote copy of a checkpoint real.

``push`` writes ``<remote run>/.ckptctl-tier/<unit>.json`` only after every file of the unit is uploaded and
verified, so a unit without a valid manifest is not tiered, whatever files exist. The manifest lists every file
with its size and digest (``storage.transfer``: MD5, S3-ETag-shaped for multipart files); ``status`` and ``pull``
check the store against it. ``remote_view`` reads the remote run in one listing plus one GET per manifest.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from ckptctl import __version__
from ckptctl.errors import NoSuchBucketError, NotFoundError
from ckptctl.storage.location import FileEntry, Location
from ckptctl.storage.transfer import reread_digest, store_digest

MANIFEST_DIR = ".ckptctl-tier"
MANIFEST_VERSION = 1


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
    def decode(cls, data: bytes) -> Manifest:
        """Parse a manifest; raises ValueError for anything that is not a whole, valid one."""
        payload = json.loads(data)
        if not isinstance(payload, dict) or payload.get("ckptctl_manifest_version") != MANIFEST_VERSION:
            raise ValueError("not a ckptctl manifest of a known version")
        files = tuple(
            ManifestFile(str(f["path"]), int(f["size"]), str(f["digest"]), f.get("part_size"), f.get("mtime"))
            for f in payload["files"]
        )
        if not files:
            raise ValueError("a manifest without files")
        unit = str(payload["unit"])
        _check_paths(unit, str(payload["kind"]), [f.path for f in files])
        return cls(
            unit=unit,
            kind=str(payload["kind"]),
            step=payload.get("step"),
            layout=str(payload["layout"]),
            files=files,
            source=str(payload.get("source", "")),
            created=float(payload.get("created", 0)),
            ckptctl_version=str(payload.get("ckptctl_version", "")),
        )


def _check_paths(unit: str, kind: str, paths: list[str]) -> None:
    """Refuse paths that would leave the run (pull writes them under DEST): a manifest is remote input."""
    for path in (unit, *paths):
        parts = path.split("/")
        if path and (path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts)):
            raise ValueError(f"unsafe path in manifest: {path!r}")
    prefix = f"{unit}/" if unit else ""
    for path in paths:
        if (path != unit) if kind == "file" else not path.startswith(prefix):
            raise ValueError(f"manifest file {path!r} is outside its checkpoint {unit!r}")


def manifest_rel(unit_path: str) -> str:
    """Where a unit's manifest lives, relative to the remote run."""
    return f"{MANIFEST_DIR}/{urllib.parse.quote(unit_path or '.', safe='')}.json"


@dataclass
class RemoteView:
    """The remote run as one listing: its objects by path, and the manifests that parsed."""

    location: Location
    entries: dict[str, FileEntry]
    manifests: dict[str, Manifest]
    bad_manifests: dict[str, str]
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
    bucket: that is an error)."""
    try:
        listing = location.walk()
    except NoSuchBucketError:
        raise
    except NotFoundError:
        return RemoteView(location, {}, {}, {}, exists=False)
    entries = {e.path: e for e in listing if e.type == "file"}
    manifests: dict[str, Manifest] = {}
    bad: dict[str, str] = {}
    for path in entries:
        if not (path.startswith(MANIFEST_DIR + "/") and path.endswith(".json")):
            continue
        try:
            manifest = Manifest.decode(location.read_bytes(path))
        except (ValueError, KeyError, TypeError) as exc:
            bad[path] = f"unreadable manifest {path}: {exc}"
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
