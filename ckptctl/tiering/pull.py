"""``tier pull``: bring tiered checkpoints back, verified against their manifests, never half-present.

One checkpoint goes to a DEST of its own (``pull``); several go under a run folder, each at its path in the run
(``pull_run``), so a run comes back with the layout it was pushed from. Files are downloaded into
``.<DEST name>.ckptctl-partial`` beside DEST, each hashed as it is written and compared with the manifest; only
when all agree is the folder (or file) renamed to DEST. A killed pull leaves only the hidden partial folder, whose
verified files the next pull keeps. A full disk or a refused write removes it.

Nothing is written through a link (``storage.atomic``): a link, a file or another user's folder where the partial
folder, one of its sub-folders or a download goes is refused. A DEST that is, contains or lies inside a local
remote run is refused before anything is read or written. Files get the mode ``open()`` gives under the umask:
manifests record no mode, so a pulled file does not get back the one it had when pushed.

``pull_run`` of every checkpoint (``--all``) then restores the run's own files (``tiering.run_files``) from their
manifest: after the checkpoints they describe, each verified the same way, assembled in
``DEST/.run-files.ckptctl-partial`` and linked into place under its name, which never replaces a file: a local
file that is there and differs is kept and reported, never overwritten. One run file that fails verification
fails alone (the others still come).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ckptctl.errors import (
    ChecksumMismatchError,
    CkptctlError,
    IntegrityError,
    NotFoundError,
    RefusedError,
    UnsafeTargetError,
    UsageError,
)
from ckptctl.storage.atomic import (
    commit_folder,
    current_umask,
    disk_error,
    fsync_folder,
    make_folders_below,
    partial_folder,
    prepare_partial_folder,
    remove_no_follow,
)
from ckptctl.storage.location import Location, refuse_overlap
from ckptctl.storage.s3_data import S3DataPath
from ckptctl.storage.transfer import digest_local_file, download, open_data_path
from ckptctl.tiering.manifest import (
    RUN_FILES_MANIFEST,
    BadManifest,
    Manifest,
    ManifestFile,
    RemoteView,
    check_file,
    check_manifest,
    remote_view,
)
from ckptctl.tiering.pointers import PointerCopy, pull_pointers
from ckptctl.tiering.run_files import RUN_FILES_PARTIAL, refused_reason


@dataclass
class PullResult:
    manifest: Manifest
    dest: str
    downloaded_bytes: int
    reused_bytes: int
    seconds: float


@dataclass
class RunFilesPull:
    """What ``pull_run`` did with the run's own files."""

    restored: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    """Already in DEST with the pushed bytes: left as they are."""
    kept: list[tuple[str, str]] = field(default_factory=list)
    """(path, why): something else is in DEST at that name (another version, a link, a folder): kept."""
    failed: list[tuple[str, CkptctlError]] = field(default_factory=list)
    """Not restored: the store's copy does not match the manifest (or the manifest does not validate)."""
    downloaded_bytes: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "restored": list(self.restored),
            "present": list(self.present),
            "kept": [{"path": path, "reason": why} for path, why in self.kept],
            "failed": [{"path": path, "code": e.code, "message": e.message} for path, e in self.failed],
        }


@dataclass
class RunPullResult:
    """What ``pull_run`` did with each checkpoint it was asked for."""

    pulled: list[PullResult]
    present: list[tuple[Manifest, str]]  # already under the run folder: left alone
    failed: list[tuple[Manifest, CkptctlError]]  # corrupt or vanished remotely: nothing written for it
    seconds: float
    pointers: list[PointerCopy] = field(default_factory=list)  # pointer files written back (``latest``...)
    corrupt: list[BadManifest] = field(default_factory=list)
    """Checkpoints asked for whose manifest does not validate: failures too, nothing written for them."""
    run_files: RunFilesPull | None = None
    """The run's own files (``--all`` only; None when the store has no run-files manifest)."""

    @property
    def downloaded_bytes(self) -> int:
        return sum(r.downloaded_bytes for r in self.pulled) + (
            self.run_files.downloaded_bytes if self.run_files else 0
        )


def pick_manifest(view: RemoteView, step: int | None, latest: bool) -> Manifest:
    """The manifest for ``--step N`` or ``--latest`` (highest step that has one).

    A manifest that does not validate may be the one asked for (it claims that step, or no step can be read
    from it; for --latest, a higher one): then the checkpoint is corrupt (IntegrityError), not "not tiered".
    """
    if latest:
        stepped = [m for m in view.manifests.values() if m.step is not None]
        best = max(stepped, key=lambda m: m.step or 0) if stepped else None
        suspect = [
            b
            for b in view.bad_manifests.values()
            if b.step is None or best is None or b.step > (best.step or 0)
        ]
        if suspect:
            raise _corrupt(view, suspect, "the latest tiered checkpoint")
        if best is None:
            _refuse_nothing_tiered(view)
            raise NotFoundError(f"no tiered checkpoint of {view.location.url} has a step")
        return best
    matches = [m for m in view.manifests.values() if m.step == step]
    if not matches:
        suspect = [b for b in view.bad_manifests.values() if b.step in (step, None)]
        if suspect:
            raise _corrupt(view, suspect, f"step {step}")
        _refuse_nothing_tiered(view)
        steps = sorted(m.step for m in view.manifests.values() if m.step is not None)
        raise NotFoundError(
            f"step {step} is not tiered in {view.location.url} (tiered steps: "
            f"{', '.join(map(str, steps)) or 'none'})",
            url=view.location.url,
        )
    if len(matches) > 1:
        raise UsageError(f"step {step} names several checkpoints: {', '.join(m.unit for m in matches)}")
    return matches[0]


def _refuse_nothing_tiered(view: RemoteView) -> None:
    if not view.manifests and not view.bad_manifests:
        where = view.location.url
        raise NotFoundError(
            f"no tiered checkpoints in {where} (no manifests under .ckptctl-tier/)",
            url=where,
            hint="tier push writes them; a copy without a manifest is not a verified checkpoint",
        )


def _corrupt(view: RemoteView, suspect: list[BadManifest], wanted: str) -> IntegrityError:
    """The error for a pull whose checkpoint may be one with a manifest that does not validate."""
    first = suspect[0]
    claims = "is" if first.step is not None else "may be"
    more = f" (and {len(suspect) - 1} more corrupt manifest(s))" if len(suspect) > 1 else ""
    return IntegrityError(
        f"{wanted} {claims} {first.shown}, whose manifest is corrupt: {first.error.message}{more}",
        url=view.location.url_of(first.rel),
        hint="re-run tier push from a machine that still has the checkpoint to rewrite its manifest",
    )


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
    _refuse_dest_in_remote(remote, dest)
    view = _existing_view(remote)
    manifest = pick_manifest(view, step, latest)
    if on_manifest:
        on_manifest(manifest)
    return _pull_unit(remote, view, manifest, dest, jobs, on_bytes, open_data_path(remote, jobs))


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
    reported in ``failed`` (in ``corrupt`` when its manifest itself does not validate) and the others still come.
    Unknown steps are refused before anything is written.
    Pointer files (``latest``) come back where what they name is now there and no local pointer is. With every
    step (``steps`` None) the run's own files come last (``RunFilesPull``); with some steps they do not.
    """
    _refuse_dest_in_remote(remote, dest_root)
    view = _existing_view(remote)
    corrupt: list[BadManifest] = []
    if steps is None:
        chosen = list(view.manifests.values())
        corrupt = list(view.bad_manifests.values())
        if view.run_files is None and view.bad_run_files is None:
            _refuse_nothing_tiered(view)
    else:
        chosen = []
        for step in sorted(steps):
            try:
                chosen.append(pick_manifest(view, step, latest=False))
            except IntegrityError:  # a corrupt manifest claims (or may claim) that step: reported, not fatal
                corrupt += [
                    b for b in view.bad_manifests.values() if b.step in (step, None) and b not in corrupt
                ]
    chosen.sort(key=lambda m: (m.step is None, m.step or 0, m.unit))
    started = time.monotonic()
    result = RunPullResult([], [], [], 0.0, corrupt=corrupt)
    data = open_data_path(remote, jobs) if chosen or view.run_files else None  # one client for the run
    for manifest in chosen:
        dest = os.path.join(os.path.abspath(dest_root), *manifest.unit.split("/"))
        if os.path.lexists(dest):
            result.present.append((manifest, dest))
            continue
        if on_manifest:
            on_manifest(manifest)
        try:
            result.pulled.append(_pull_unit(remote, view, manifest, dest, jobs, on_bytes, data))
        except (IntegrityError, NotFoundError) as exc:
            result.failed.append((manifest, exc))
    sound = {m.unit for m in chosen} - {m.unit for m, _ in result.failed}
    result.pointers = pull_pointers(view, dest_root, sound)
    if steps is None and (view.run_files is not None or view.bad_run_files is not None):
        result.run_files = _pull_run_files(remote, view, dest_root, jobs, on_bytes, data)
    result.seconds = time.monotonic() - started
    return result


def _refuse_dest_in_remote(remote: Location, dest: str) -> None:
    """A DEST that is, contains or lies inside the remote run (both local) would be written into what is read."""
    refuse_overlap(Location.from_url(dest), remote, output_role="DEST", source_role="the remote run")


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
    data: S3DataPath | None,
) -> PullResult:
    check = check_manifest(view, manifest)  # from the listing already made: no request
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
    temp = partial_folder(dest)
    started = time.monotonic()
    progress = on_bytes or (lambda n: None)
    downloaded = reused = 0
    current_umask()  # read here, before the download threads start
    with _partial_removed_on_error(temp, dest):
        prepare_partial_folder(temp, resume=True)

        def fetch(item: ManifestFile) -> tuple[int, int]:
            target = _local_target(manifest, temp, item.path)
            return _fetch_file(remote, item, temp, target, jobs, data, progress)

        # Files side by side; a big S3 object's ranges on a pool of their own (``S3DataPath.download``), so a
        # file waiting for its ranges never holds a slot that they need.
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ckptctl-pull") as pool:
            for got, kept in pool.map(fetch, manifest.files):
                downloaded += got
                reused += kept
        _commit(manifest, temp, dest)
    return PullResult(manifest, dest, downloaded, reused, time.monotonic() - started)


@contextlib.contextmanager
def _partial_removed_on_error(temp: str, where: str) -> Iterator[None]:
    """An OSError inside removes the partial folder ``temp`` (``rmtree`` never follows a link, so never removes
    one's target) and, when it is a disk error (full, quota, read-only), becomes the one-line error naming
    ``where``."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        mapped = disk_error(exc, where)
        if mapped is not None:
            raise mapped from exc
        raise


def _fetch_file(
    remote: Location,
    item: ManifestFile,
    temp: str,
    target: str,
    jobs: int,
    data: S3DataPath | None,
    progress: Callable[[int], None],
) -> tuple[int, int]:
    """Download one file to ``target`` inside the partial folder ``temp``, hashed as it is written, and give it
    the recorded mode and time; returns (bytes downloaded, bytes reused from an interrupted pull). Bytes that do
    not match the manifest are removed and raise ChecksumMismatchError."""
    make_folders_below(temp, os.path.relpath(os.path.dirname(target), temp).split(os.sep))
    if _reusable(target, item):
        progress(item.size)
        return 0, item.size
    got = download(
        remote,
        item.path,
        target,
        size=item.size,
        md5_part_size=item.md5_part_size,
        on_bytes=progress,
        jobs=jobs,
        data=data,
    )
    if not item.matches(got):
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise ChecksumMismatchError(
            f"{remote.url_of(item.path)}: downloaded bytes have {item.shown(got)}, the manifest says "
            f"{item.shown()}",
            url=remote.url_of(item.path),
            hint="the remote copy is corrupt; re-run tier push from a machine that still has it",
        )
    if item.mode is not None:
        # As tar does for a user: the recorded bits, less the puller's umask (a manifest is remote input and
        # never makes a file writable by more people than the user's own files are).
        os.chmod(target, item.mode & ~current_umask())
    if item.mtime is not None:
        os.utime(target, (item.mtime, item.mtime), follow_symlinks=False)
    return item.size, 0


def _pull_run_files(
    remote: Location,
    view: RemoteView,
    dest_root: str,
    jobs: int,
    on_bytes: Callable[[int], None] | None,
    data: S3DataPath | None,
) -> RunFilesPull:
    """Restore the files the run-files manifest lists under ``dest_root`` (see the module docstring): each one
    checked against the listing, downloaded and verified in the partial folder, then linked to its name only
    where nothing is; a file already there is compared, never replaced."""
    result = RunFilesPull()
    if view.bad_run_files is not None:
        result.failed.append((RUN_FILES_MANIFEST, view.bad_run_files.error))
    manifest = view.run_files
    if manifest is None:
        return result
    root = os.path.abspath(dest_root)
    todo: list[ManifestFile] = []
    for item in manifest.files:
        why = refused_reason(item.path, set(view.manifests))
        check = check_file(view, item)
        if why is not None or not check.ok:
            result.failed.append((item.path, _run_file_error(remote, item, why or check.problems[0])))
            continue
        target = os.path.join(root, *item.path.split("/"))
        there = _already_there(target, item)
        if there is None:
            todo.append(item)
        elif there == "":
            result.present.append(item.path)
        else:
            result.kept.append((item.path, there))
    if not todo:
        return result
    temp = partial_folder(os.path.join(root, RUN_FILES_PARTIAL))
    progress = on_bytes or (lambda n: None)
    current_umask()  # read here, before the download threads start
    with _partial_removed_on_error(temp, root):
        prepare_partial_folder(temp, resume=True)

        def fetch(item: ManifestFile) -> tuple[ManifestFile, int | IntegrityError]:
            try:
                staged = os.path.join(temp, *item.path.split("/"))
                return item, _fetch_file(remote, item, temp, staged, jobs, data, progress)[0]
            except IntegrityError as exc:  # this file only: the others still come
                return item, exc

        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="ckptctl-pull") as pool:
            fetched = list(pool.map(fetch, todo))
        for item, got in fetched:
            if isinstance(got, IntegrityError):
                result.failed.append((item.path, got))
                continue
            result.downloaded_bytes += got
            staged = os.path.join(temp, *item.path.split("/"))
            why = _place(staged, root, item.path)
            if why is None:
                result.restored.append(item.path)
            else:
                result.kept.append((item.path, why))
        remove_no_follow(temp)
    return result


def _run_file_error(remote: Location, item: ManifestFile, why: str) -> IntegrityError:
    return IntegrityError(
        f"run file {item.path}: {why}",
        url=remote.url_of(item.path),
        hint="re-run tier push from a machine that still has the run to repair it",
    )


def _already_there(target: str, item: ManifestFile) -> str | None:
    """None when nothing is at ``target``; "" when the pushed file is (same bytes); else why what is there is
    kept (a local file is never overwritten by a pull)."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return "a file stands where one of its folders goes: kept"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link is there: kept, never written through"
    if not stat.S_ISREG(info.st_mode):
        return "something that is not a regular file is there: kept"
    if info.st_size == item.size and item.matches(digest_local_file(target, item.md5_part_size)):
        return ""
    return "the local file differs from the pushed one: kept (pull never overwrites a local file)"


def _place(staged: str, root: str, rel: str) -> str | None:
    """Give the verified ``staged`` file its name ``root/rel`` without ever replacing what is there: a hard link
    (refused by the kernel if the name exists), or where links are not supported a rename after a check. Returns
    None once placed, else why it was not (then ``staged`` is left for the partial folder's removal)."""
    parts = rel.split("/")
    try:
        folder = make_folders_below(root, parts[:-1])
    except UnsafeTargetError as exc:
        return f"{exc.message}: kept"
    target = os.path.join(folder, parts[-1])
    try:
        os.link(staged, target)
    except FileExistsError:
        return "something appeared at its name during the pull: kept"
    except OSError:  # no hard links here (some FUSE and network file systems)
        if os.path.lexists(target):
            return "something appeared at its name during the pull: kept"
        os.rename(staged, target)
    else:
        os.unlink(staged)
    fsync_folder(folder)
    return None


def _reusable(target: str, item: ManifestFile) -> bool:
    """Whether an interrupted pull left ``target`` whole and verified; a stale regular file is removed (the
    download creates it anew), anything else there (a link, a folder, a FIFO) is refused."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise UnsafeTargetError(
            f"{target} is {kind}; ckptctl never writes through it or removes it",
            url=target,
            hint="remove the partial folder yourself if it is not needed, then re-run",
        )
    if info.st_size == item.size and item.matches(digest_local_file(target, item.md5_part_size)):
        return True
    os.unlink(target)
    return False


def _commit(manifest: Manifest, temp: str, dest: str) -> None:
    """Make the verified download appear under its final name in one rename, durable once returned."""
    if manifest.kind == "file":
        only = os.path.join(temp, posixpath.basename(manifest.files[0].path))
        os.replace(only, dest)
        shutil.rmtree(temp, ignore_errors=True)
        fsync_folder(os.path.dirname(dest))
    else:
        commit_folder(temp, dest)
