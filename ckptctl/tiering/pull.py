"""``tier pull``: bring tiered checkpoints back, verified against their manifests, never half-present.

One checkpoint goes to a DEST of its own (``pull``); several go under a run folder, each at its path in the run
(``pull_run``), so a run comes back with the layout it was pushed from. Files are downloaded into ``.<DEST name>.ckptctl-partial`` beside DEST, each hashed as it is written and compared
with the manifest; only when all agree is the folder (or file) renamed to DEST. A killed pull leaves only the
hidden partial folder, whose verified files the next pull keeps. A full disk or a refused write removes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ckptctl.errors import (
    ChecksumMismatchError,
    CkptctlError,
    IntegrityError,
    NoSpaceError,
    NotFoundError,
    PermissionDeniedError,
    RefusedError,
    UsageError,
)
from ckptctl.storage.location import Location
from ckptctl.storage.transfer import digest_local_file, download
from ckptctl.tiering.manifest import Manifest, ManifestFile, RemoteView, check_manifest, remote_view
from ckptctl.tiering.pointers import PointerCopy, pull_pointers

PARTIAL_SUFFIX = ".ckptctl-partial"


@dataclass
class PullResult:
    manifest: Manifest
    dest: str
    downloaded_bytes: int
    reused_bytes: int
    seconds: float


@dataclass
class RunPullResult:
    """What ``pull_run`` did with each checkpoint it was asked for."""

    pulled: list[PullResult]
    present: list[tuple[Manifest, str]]  # already under the run folder: left alone
    failed: list[tuple[Manifest, CkptctlError]]  # corrupt or vanished remotely: nothing written for it
    seconds: float
    pointers: list[PointerCopy] = field(default_factory=list)  # pointer files written back (``latest``...)

    @property
    def downloaded_bytes(self) -> int:
        return sum(r.downloaded_bytes for r in self.pulled)


def pick_manifest(view: RemoteView, step: int | None, latest: bool) -> Manifest:
    """The manifest for ``--step N`` or ``--latest`` (highest step that has one)."""
    if not view.manifests:
        where = view.location.url
        raise NotFoundError(
            f"no tiered checkpoints in {where} (no manifests under .ckptctl-tier/)",
            url=where,
            hint="tier push writes them; a copy without a manifest is not a verified checkpoint",
        )
    if latest:
        stepped = [m for m in view.manifests.values() if m.step is not None]
        if not stepped:
            raise NotFoundError(f"no tiered checkpoint of {view.location.url} has a step")
        return max(stepped, key=lambda m: m.step or 0)
    matches = [m for m in view.manifests.values() if m.step == step]
    if not matches:
        steps = sorted(m.step for m in view.manifests.values() if m.step is not None)
        raise NotFoundError(
            f"step {step} is not tiered in {view.location.url} (tiered steps: "
            f"{', '.join(map(str, steps)) or 'none'})",
            url=view.location.url,
        )
    if len(matches) > 1:
        raise UsageError(f"step {step} names several checkpoints: {', '.join(m.unit for m in matches)}")
    return matches[0]


def _local_target(manifest: Manifest, temp: str, rel: str) -> str:
    if manifest.kind == "file":
        return os.path.join(temp, posixpath.basename(rel))
    inside = rel[len(manifest.unit) + 1 :] if manifest.unit else rel
    return os.path.join(temp, *inside.split("/"))


def pull(
    remote: Location,
    dest: str,
    *,
    step: int | None = None,
    latest: bool = False,
    jobs: int = 4,
    on_bytes: Callable[[int], None] | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> PullResult:
    """Download one tiered checkpoint to ``dest`` (a new folder, or a new file for a one-file checkpoint)."""
    view = _existing_view(remote)
    manifest = pick_manifest(view, step, latest)
    if on_manifest:
        on_manifest(manifest)
    return _pull_unit(remote, view, manifest, dest, jobs, on_bytes)


def pull_run(
    remote: Location,
    dest_root: str,
    *,
    steps: frozenset[int] | None = None,
    jobs: int = 4,
    on_bytes: Callable[[int], None] | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
) -> RunPullResult:
    """Download the tiered checkpoints of ``steps`` (all when None) under ``dest_root``, each at its run path.

    A checkpoint whose path already exists under ``dest_root`` is left alone; one whose remote copy is corrupt is
    reported in ``failed`` and the others still come. Unknown steps are refused before anything is written.
    Pointer files (``latest``) come back where what they name is now there and no local pointer is.
    """
    view = _existing_view(remote)
    if steps is None:
        chosen = list(view.manifests.values())
        if not chosen:
            pick_manifest(view, None, latest=True)  # raises: nothing tiered
    else:
        chosen = [pick_manifest(view, step, latest=False) for step in sorted(steps)]
    chosen.sort(key=lambda m: (m.step is None, m.step or 0, m.unit))
    started = time.monotonic()
    result = RunPullResult([], [], [], 0.0)
    for manifest in chosen:
        dest = os.path.join(os.path.abspath(dest_root), *manifest.unit.split("/"))
        if os.path.lexists(dest):
            result.present.append((manifest, dest))
            continue
        if on_manifest:
            on_manifest(manifest)
        try:
            result.pulled.append(_pull_unit(remote, view, manifest, dest, jobs, on_bytes))
        except (IntegrityError, NotFoundError) as exc:
            result.failed.append((manifest, exc))
    sound = {m.unit for m in chosen} - {m.unit for m, _ in result.failed}
    result.pointers = pull_pointers(view, dest_root, sound)
    result.seconds = time.monotonic() - started
    return result


def _existing_view(remote: Location) -> RemoteView:
    view = remote_view(remote)
    if not view.exists:
        raise NotFoundError(f"no such remote run: {remote.url}", url=remote.url)
    return view


def _pull_unit(
    remote: Location,
    view: RemoteView,
    manifest: Manifest,
    dest: str,
    jobs: int,
    on_bytes: Callable[[int], None] | None,
) -> PullResult:
    check = check_manifest(view, manifest)
    if not check.ok:
        raise IntegrityError(
            f"the remote copy of {manifest.unit} does not match its manifest: {check.problems[0]}"
            + (f" (and {len(check.problems) - 1} more)" if len(check.problems) > 1 else ""),
            url=remote.url_of(manifest.unit),
            hint="re-run tier push from a machine that still has the checkpoint to repair it",
        )
    dest = os.path.abspath(dest)
    if os.path.lexists(dest):
        raise RefusedError(f"{dest} already exists; pull writes a new folder", hint="choose another DEST")
    parent = os.path.dirname(dest)
    temp = os.path.join(parent, f".{os.path.basename(dest)}{PARTIAL_SUFFIX}")
    started = time.monotonic()
    progress = on_bytes or (lambda n: None)
    downloaded = reused = 0
    try:
        os.makedirs(temp, exist_ok=True)

        def fetch(item: ManifestFile) -> tuple[int, int]:
            target = _local_target(manifest, temp, item.path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if (
                os.path.isfile(target)
                and os.path.getsize(target) == item.size
                and digest_local_file(target, item.part_size) == item.digest
            ):
                progress(item.size)
                return 0, item.size
            got = download(
                remote,
                item.path,
                target,
                size=item.size,
                part_size=item.part_size,
                on_bytes=progress,
                parts_pool=parts_pool if jobs > 1 else None,
            )
            if got != item.digest:
                with contextlib.suppress(OSError):
                    os.unlink(target)
                raise ChecksumMismatchError(
                    f"{remote.url_of(item.path)}: downloaded bytes have digest {got}, the manifest says "
                    f"{item.digest}",
                    url=remote.url_of(item.path),
                    hint="the remote copy is corrupt; re-run tier push from a machine that still has it",
                )
            if item.mtime is not None:
                os.utime(target, (item.mtime, item.mtime))
            return item.size, 0

        # Files on one pool, the parts of big S3 objects on another: a worker waiting for its parts never holds
        # a slot that those parts need.
        with (
            ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ckptctl-part") as parts_pool,
            ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ckptctl-pull") as pool,
        ):
            for got, kept in pool.map(fetch, manifest.files):
                downloaded += got
                reused += kept
        _commit(manifest, temp, dest)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise NoSpaceError(f"no space left while writing {dest}: {exc.strerror}", url=dest) from exc
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise PermissionDeniedError(f"cannot write {dest}: {exc.strerror}", url=dest) from exc
        raise
    return PullResult(manifest, dest, downloaded, reused, time.monotonic() - started)


def _commit(manifest: Manifest, temp: str, dest: str) -> None:
    """Make the verified download appear under its final name in one rename, durable once returned."""
    if manifest.kind == "file":
        only = os.path.join(temp, posixpath.basename(manifest.files[0].path))
        os.replace(only, dest)
        shutil.rmtree(temp, ignore_errors=True)
    else:
        os.rename(temp, dest)
    fd = os.open(os.path.dirname(dest), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
