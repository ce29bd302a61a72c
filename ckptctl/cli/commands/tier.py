"""``ckptctl tier push|pull|status``: move checkpoints between local disk and an object store, verified."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ckptctl.cli._options import (
    DryRunOpt,
    JobsOpt,
    JsonOpt,
    LatestOpt,
    MetricFileOpt,
    MetricOpt,
    QuietOpt,
    RunArg,
    SettleOpt,
    StepOpt,
    StepsOpt,
    StorageOpt,
    YesOpt,
)

if TYPE_CHECKING:
    from ckptctl.cli._output import Output
    from ckptctl.retention.plan import PrunePlan

tier_app = typer.Typer(
    name="tier",
    help="Move checkpoints between local disk and an object store: push (and free local space), pull, status.\n\n"
    "A checkpoint is on the remote only when its manifest (.ckptctl-tier/<checkpoint>.json, written last, "
    "after every file is verified) is there.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

# How tier push spells the keep rules and settings of its freeing of local copies (prune's rules).
FREE_FLAGS = {
    "keep_last": "--keep-local-last",
    "keep_best": "--keep-local-best",
    "metric": "--metric",
    "metric_file": "--metric-file",
}


@contextlib.contextmanager
def _bars(out: Any, total: int) -> Iterator[Any]:
    """A total bar plus one bar per checkpoint; yields ``advance(path, n)`` (a no-op without a terminal)."""
    with out.progress("total", total or None) as bar:
        tasks: dict[str, Any] = {}

        def advance(path: str, n: int) -> None:
            if bar is None:
                return
            if path not in tasks:
                tasks[path] = bar.add_task(path or ".", total=None)
            bar.advance(tasks[path], n)
            bar.advance(bar.task_ids[0], n)

        yield advance


@tier_app.command("push")
def push(
    run: RunArg,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="The remote run folder, e.g. s3://bucket/runs/run42 (mirrors RUN's layout).",
        ),
    ],
    steps: StepsOpt = None,
    min_age: Annotated[
        str | None,
        typer.Option(
            "--min-age", metavar="DURATION", help="Only checkpoints whose newest file is older than this."
        ),
    ] = None,
    keep_local_last: Annotated[
        int | None,
        typer.Option(
            "--keep-local-last",
            metavar="K",
            help="After upload, free the local copy of verified checkpoints except the newest K.",
        ),
    ] = None,
    keep_local_best: Annotated[
        int | None,
        typer.Option("--keep-local-best", metavar="M", help="... and except the M best by --metric."),
    ] = None,
    metric: MetricOpt = None,
    metric_file: MetricFileOpt = None,
    jobs: JobsOpt = None,
    part_size: Annotated[
        str, typer.Option("--part-size", metavar="SIZE", help="S3 multipart part size (at least 5MiB).")
    ] = "16MiB",
    settle: SettleOpt = "10m",
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Upload complete checkpoints of a local run that are not yet on the remote, each verified, manifest last.

    Each file is hashed while it is read, compared with what the store reports (S3 ETag, GCS md5Hash; a re-read
    where the store reports nothing), then the checkpoint's manifest is written. A re-run skips what is already
    there and verified and finishes the rest; multipart uploads an interrupted run left are aborted. The run's
    pointer files (DeepSpeed latest, Megatron's tracker) follow once the checkpoint they name is tiered.

    Then the run's own files (every regular file in no checkpoint: config.json, tokenizer files, eval.jsonl,
    logs/...) go the same verified way, only those new or changed since the last push, and their manifest
    (.ckptctl-tier/run-files.manifest) last. ckptctl's own files and pointer files are not among them; links and
    special files are skipped and reported, and so is a top-level folder of more than 2,000 files or 2 GiB (and
    whatever would take the run past 10,000 files or 8 GiB). Run files are never freed locally, and one removed
    locally stays on the remote.

    With --keep-local-last/--keep-local-best, local copies are then freed, but only of checkpoints whose remote
    copy a fresh listing verifies, and never the newest complete one, one a pointer names, a pinned or an
    incomplete one (prune's rules and its crash-safe deletion). At a terminal it asks before freeing (--yes
    skips the question); without one (cron) it frees without asking.

    Exit codes: 0 done, 1 store unreachable, 2 the remote is, contains or lies inside RUN, 3 bucket or run
    missing, 4 a link or foreign file where the run lock goes, 5 some checkpoints failed (re-run), 6 the run is
    locked by another ckptctl, 8 the store holds different bytes than were sent.

    Examples:

      ckptctl tier push /nvme/run42 --to s3://bucket/runs/run42

      ckptctl tier push /nvme/run42 --to gs://bucket/run42 --min-age 30m --keep-local-last 2 --json
    """
    from ckptctl.cli._output import Output
    from ckptctl.errors import PartialFailureError, UsageError
    from ckptctl.humanize import format_bytes, parse_duration, parse_size, parse_steps
    from ckptctl.retention.policy import Policy
    from ckptctl.storage.location import Location, parse_storage_options
    from ckptctl.storage.transfer import MIN_PART_SIZE
    from ckptctl.tiering.manifest import MAX_PART_SIZE
    from ckptctl.tiering.push import PushOptions, check_target, default_jobs, push_locks
    from ckptctl.tiering.push import push as run_push

    out = Output.start("tier push", json_mode=json_out, quiet=quiet, flags=FREE_FLAGS)
    options = parse_storage_options(storage_option or [])
    local = Location.from_url(run)
    remote = Location.from_url(to, options)
    policy = None
    if keep_local_last is not None or keep_local_best is not None:
        policy = Policy.build(keep_last=keep_local_last, keep_best=keep_local_best, metric=metric)
    elif metric or metric_file:
        raise UsageError("--metric and --metric-file go with --keep-local-best")
    parts = parse_size(part_size)
    if not MIN_PART_SIZE <= parts <= MAX_PART_SIZE:
        raise UsageError(f"--part-size must be 5MiB to 5GiB (S3's limits), got {part_size}")
    push_options = PushOptions(
        steps=frozenset(parse_steps(steps, allow_empty=False)) if steps is not None else None,
        min_age_seconds=parse_duration(min_age) if min_age else None,
        settle_seconds=parse_duration(settle),
        jobs=jobs or default_jobs(),
        part_size=parts,
        free_policy=policy,
        metric_file=Location.from_url(metric_file, options) if metric_file else None,
        dry_run=dry_run,
        confirm_free=None if yes else lambda plan: _confirm_free(out, plan),
    )

    def on_event(kind: str, *, unit: Any, bytes: int = 0, seconds: float = 0.0, detail: str = "") -> None:
        if kind == "start":
            return
        if unit is None:  # the run's own files
            if kind == "run-file":
                out.event(kind, path=detail, bytes=bytes)
                out.info(f"uploaded run file {detail} ({format_bytes(bytes)})")
            else:
                out.warn(f"{kind} {detail}")
            return
        if kind == "pointer":
            out.event(kind, path=detail, target=unit.path, dry_run=dry_run)
            out.info(f"{'would point' if dry_run else 'pointed'} {detail} at {unit.path}")
            return
        rate = bytes / seconds / 1e6 if seconds > 0 else None
        out.event(
            kind,
            path=unit.path,
            step=unit.step,
            bytes=bytes or unit.total_bytes,
            seconds=round(seconds, 3),
            mb_per_s=round(rate, 1) if rate else None,
            detail=detail,
        )
        if kind == "uploaded":
            speed = f", {rate:.0f} MB/s" if rate else ""
            out.info(f"uploaded {unit.path}: {format_bytes(bytes)} in {seconds:.1f}s{speed}")
        elif kind == "already":
            out.info(f"already tiered {unit.path}")
        elif kind == "would-upload":
            out.info(f"would upload {unit.path} ({format_bytes(unit.total_bytes)})")
        elif kind == "freed":
            out.info(f"freed local {unit.path} ({format_bytes(unit.total_bytes)})")
        elif kind in ("failed", "skipped", "error"):
            out.warn(f"{kind} {unit.path}: {detail}")

    check_target(local, remote)  # before the lock: a refused push leaves the run as it was
    # A dry run takes no lock (it writes nothing); a push holds the local run's lock and the remote run's lease.
    locks = contextlib.nullcontext() if dry_run else push_locks(local, remote)
    with locks as held, _bars(out, 0) as advance:
        lease = getattr(held, "lease", None)
        result = run_push(local, remote, push_options, on_event=on_event, on_bytes=advance, lease=lease)
    for note in result.notes:  # said once per run, e.g. a store that refuses checksum headers
        out.warn(note)
    run_files = result.run_files
    for skipped in run_files.skipped:
        out.warn(f"run file {skipped.path} not pushed: {skipped.reason}")
    if dry_run and run_files.would_send:
        shown = ", ".join(run_files.would_send[:5]) + (", ..." if len(run_files.would_send) > 5 else "")
        out.info(f"would upload {len(run_files.would_send)} run file(s): {shown}")
    plan = result.free_plan
    if plan is not None:
        for decision in plan.decisions:
            out.event(
                "free-plan",
                path=decision.unit.path,
                step=decision.unit.step,
                action=decision.action,
                reasons=list(decision.reasons),
            )
        if dry_run:
            for unit in plan.to_delete:
                out.info(f"would free local {unit.path} ({format_bytes(unit.total_bytes)})")
    counts = result.counts
    freed = result.freed_units
    out.event(
        "summary",
        dry_run=dry_run,
        **{k.replace("-", "_"): v for k, v in counts.items()},
        uploaded_bytes=result.uploaded_bytes,
        freed=len(freed),
        freed_bytes=sum(u.total_bytes for u in freed),
        aborted_uploads=result.aborted_uploads,
        pointers=[p.source for p in result.pointers],
        store_level=result.store_level,
        body_guard=result.body_guard,
        notes=list(result.notes),
        run_files=run_files.to_dict(),
    )
    if dry_run:
        out.info(
            f"would upload {counts['would-upload']} checkpoint(s); {counts['already']} already tiered "
            "(dry run: nothing changed)"
        )
    else:
        out.info(
            f"{counts['uploaded']} uploaded ({format_bytes(result.uploaded_bytes)}), {counts['already']} already "
            f"tiered, {len(freed)} freed locally"
            + (f", {counts['failed']} failed" if counts["failed"] else "")
            + f"; run files: {len(run_files.sent)} uploaded, {run_files.unchanged} unchanged"
        )
    failed_frees = result.freed.failed if result.freed else []
    if result.failed or failed_frees or run_files.failed:
        raise PartialFailureError(
            f"{len(result.failed)} checkpoint(s) not tiered, {len(failed_frees)} not fully freed"
            + (f", run files not recorded ({run_files.failed})" if run_files.failed else "")
            + "; a re-run finishes them",
            url=remote.url,
        )


@tier_app.command("pull")
def pull(
    url: Annotated[str, typer.Argument(metavar="URL", help="The remote run folder that tier push wrote.")],
    dest: Annotated[
        str,
        typer.Argument(
            metavar="DEST",
            help="--step/--latest: the new folder (or file) to create. --steps/--all: the run folder to fill.",
        ),
    ],
    step: StepOpt = None,
    latest: LatestOpt = False,
    steps: StepsOpt = None,
    all_steps: Annotated[
        bool, typer.Option("--all", help="Fetch every tiered checkpoint into DEST at its path in the run.")
    ] = False,
    jobs: JobsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Download tiered checkpoints, verify every file against its manifest, then rename each into place.

    With --step or --latest (the highest tiered step), DEST is the checkpoint itself (it must not exist). With --steps or --all, DEST is a
    run folder: each checkpoint lands at its path in the run (DEST/checkpoint-900/...), and one already there is
    left alone, so a re-run finishes an interrupted restore. The remote run's pointer files (DeepSpeed latest)
    come too where the checkpoint they name is now in DEST and DEST has no such pointer of its own.

    --all then restores the run's own files that push recorded (config.json, tokenizer files, eval.jsonl,
    logs/...), after the checkpoints, each verified. A local file already at one of their names is never
    overwritten: if it differs it is kept and reported (a warning, not a failure). --step, --latest and --steps
    restore no run files.

    Each download goes to a hidden .NAME.ckptctl-partial folder beside its final name, which appears only once
    every file matches the manifest. A re-run after an interruption keeps the files already verified. A remote
    copy that does not match its manifest, or whose manifest does not validate, is refused (exit 8; with
    --steps/--all it is reported and the others still come, exit 5) before or while downloading; so is a run
    file (--all: exit 5).

    Exit codes: 0 done, 1 disk full or store unreachable, 2 DEST is, contains or lies inside a local remote run,
    3 not tiered / not found, 4 DEST exists (or a link or foreign file where a partial file goes), 5 some of
    --steps/--all failed, 6 another ckptctl holds the local run (the lock of DEST, or of the folder DEST is
    created in), 8 corrupt.

    Examples:

      ckptctl tier pull s3://bucket/runs/run42 /nvme/run42/checkpoint-900 --step 900

      ckptctl tier pull gs://bucket/run42 ./latest-ckpt --latest --json

      ckptctl tier pull s3://bucket/runs/run42 /nvme/run42 --steps 800,900
    """
    from ckptctl.cli._output import Output
    from ckptctl.errors import UsageError
    from ckptctl.humanize import parse_steps
    from ckptctl.storage.location import Location, parse_storage_options
    from ckptctl.storage.lock import run_lock
    from ckptctl.tiering.pull import pull as run_pull
    from ckptctl.tiering.pull import pull_run
    from ckptctl.tiering.push import default_jobs

    out = Output.start("tier pull", json_mode=json_out, quiet=quiet)
    if sum((step is not None, latest, steps is not None, all_steps)) != 1:
        raise UsageError("give exactly one of --step N, --latest, --steps S1,S2 and --all")
    remote = Location.from_url(url, parse_storage_options(storage_option or []))
    with (
        run_lock(Location.from_url(_pull_lock_folder(dest, into_run=step is None and not latest))),
        _bars(out, 0) as advance,
    ):
        current = [""]

        def on_manifest(manifest: Any) -> None:
            current[0] = manifest.unit

        def on_bytes(n: int) -> None:
            advance(current[0], n)

        if step is not None or latest:
            result = run_pull(
                remote,
                dest,
                step=step,
                latest=latest,
                jobs=jobs or default_jobs(),
                on_bytes=on_bytes,
                on_manifest=on_manifest,
            )
        else:
            chosen = frozenset(parse_steps(steps, allow_empty=False)) if steps is not None else None
            many = pull_run(
                remote,
                dest,
                steps=chosen,
                jobs=jobs or default_jobs(),
                on_bytes=on_bytes,
                on_manifest=on_manifest,
            )
    if step is not None or latest:
        _report_pulled(out, result)
        return
    _report_run_pull(out, remote.url, dest, many)


def _pull_lock_folder(dest: str, *, into_run: bool) -> str:
    """The local folder whose run lock a pull holds: the run it fills (--steps/--all: DEST once it exists), else
    the folder the new DEST appears in (usually the run the checkpoint belongs to). The remote run is not
    locked: a pull only reads it, so many machines may restore from one run at once, and a push or prune that
    changes it meanwhile makes the pull fail verification (exit 8/5), never land wrong bytes."""
    import os

    dest = os.path.abspath(dest)
    if into_run and os.path.isdir(dest):
        return dest
    parent = os.path.dirname(dest)
    while parent != os.path.dirname(parent) and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def _pulled_record(result: Any) -> dict[str, Any]:
    manifest = result.manifest
    rate = result.downloaded_bytes / result.seconds / 1e6 if result.seconds > 0 else 0.0
    return {
        "unit": manifest.unit,
        "step": manifest.step,
        "dest": result.dest,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        "downloaded_bytes": result.downloaded_bytes,
        "reused_bytes": result.reused_bytes,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(rate, 1),
    }


def _pulled_line(record: dict[str, Any]) -> str:
    from ckptctl.humanize import format_bytes

    rate = record["mb_per_s"]
    return (
        f"pulled {record['unit']} (step {record['step']}) to {record['dest']}: {format_bytes(record['bytes'])} "
        f"verified in {record['seconds']:.1f}s" + (f" ({rate:.0f} MB/s)" if rate else "")
    )


def _report_pulled(out: Any, result: Any) -> None:
    record = _pulled_record(result)
    out.result(record)
    out.info(_pulled_line(record))


def _report_run_pull(out: Any, url: str, dest: str, many: Any) -> None:
    from ckptctl.errors import PartialFailureError
    from ckptctl.humanize import format_bytes

    pulled = [_pulled_record(r) for r in many.pulled]
    present = [{"unit": m.unit, "step": m.step, "dest": d} for m, d in many.present]
    failed = [{"unit": m.unit, "step": m.step, "code": e.code, "message": e.message} for m, e in many.failed]
    failed += [
        {"unit": b.shown, "step": b.step, "code": b.error.code, "message": b.error.message}
        for b in many.corrupt
    ]
    run_files = many.run_files
    if run_files is not None:
        failed += [
            {"unit": path, "step": None, "code": e.code, "message": e.message, "run_file": True}
            for path, e in run_files.failed
        ]
    data = {
        "remote": url,
        "dest": dest,
        "pulled": pulled,
        "present": present,
        "failed": failed,
        "pointers": [{"path": p.source, "target": p.target} for p in many.pointers],
        "run_files": run_files.to_dict() if run_files is not None else None,
        "downloaded_bytes": many.downloaded_bytes,
        "seconds": round(many.seconds, 3),
    }
    for record in pulled:
        out.info(_pulled_line(record))
    for record in present:
        out.info(f"already present {record['unit']} (left alone)")
    for copy in many.pointers:
        out.info(f"wrote {copy.source} (names {copy.target})")
    if run_files is not None:
        for path, why in run_files.kept:
            out.warn(f"run file {path}: {why}")
        out.info(
            f"run files: {len(run_files.restored)} restored, {len(run_files.present)} already there"
            + (f", {len(run_files.kept)} kept as they were" if run_files.kept else "")
        )
    rate = many.downloaded_bytes / many.seconds / 1e6 if many.seconds > 0 else 0.0
    out.info(
        f"{len(pulled)} pulled ({format_bytes(many.downloaded_bytes)}"
        + (f", {rate:.0f} MB/s" if rate else "")
        + f"), {len(present)} already present"
        + (f", {len(failed)} failed" if failed else "")
    )
    if failed:
        out.fail(
            PartialFailureError(
                f"{len(failed)} checkpoint(s) not pulled (first: {failed[0]['unit']}: {failed[0]['message']})",
                url=url,
            ),
            data,
            errors=failed,
        )
    out.result(data)


@tier_app.command("status")
def status(
    run: RunArg,
    remote_url: Annotated[str, typer.Option("--remote", metavar="URL", help="The remote run folder.")],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Re-read remote files the store has no checksum for (local, memory://)."
        ),
    ] = False,
    settle: SettleOpt = "10m",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Show each checkpoint: local, remote or both, and whether the remote copy matches its manifest.

    REMOTE is one of: verified (sizes and the store's checksums match the manifest), size-only (the store keeps
    no checksums; --verify re-reads), corrupt (exit 8: objects that do not match the manifest, or a manifest
    that does not validate; a re-run of push rewrites it), partial (objects without a manifest: an interrupted
    push; a re-run of push finishes it), or - (not there). CHECKS is what the store did with our checksums when
    the checkpoint was pushed: A (S3 checks or computes CRC64NVME), B (ignored them: every body signed or with
    Content-MD5, verified on pull), C (refused them: sent as B), crc32c (GCS), or - (local folders and memory://: re-read).

    A last row, "run files (N)", sums up the run's own files (config.json, eval.jsonl, logs/...): REMOTE for
    the copies the run-files manifest lists (corrupt: exit 8), LOCAL how many changed since they were pushed (by
    size or time) or are not pushed yet.

    Examples:

      ckptctl tier status /nvme/run42 --remote s3://bucket/runs/run42
    """
    from ckptctl.cli._output import Output
    from ckptctl.errors import IntegrityError
    from ckptctl.humanize import format_bytes, parse_duration
    from ckptctl.storage.location import Location, parse_storage_options
    from ckptctl.tiering.status import run_status

    out = Output.start("tier status", json_mode=json_out, quiet=quiet)
    options = parse_storage_options(storage_option or [])
    found = run_status(
        Location.from_url(run),
        Location.from_url(remote_url, options),
        reread=verify,
        settle_seconds=parse_duration(settle),
    )
    rows, run_files = found.units, found.run_files
    corrupt: list[tuple[str, tuple[str, ...]]] = [
        (r.path or ".", r.problems) for r in rows if r.remote == "corrupt"
    ]
    if run_files is not None and run_files.remote == "corrupt":
        corrupt.append(("run files", run_files.problems))
    error = None
    if corrupt:
        first, problems = corrupt[0]
        error = IntegrityError(
            f"{len(corrupt)} remote cop{'y is' if len(corrupt) == 1 else 'ies are'} corrupt: a manifest that does "
            f"not validate, or objects that do not match it (first: {first}: "
            f"{problems[0] if problems else 'corrupt'})",
            url=remote_url,
        )
    data = {
        "run": run,
        "remote": remote_url,
        "units": [r.to_dict() for r in rows],
        "run_files": run_files.to_dict() if run_files is not None else None,
    }
    table = [
        (
            str(row.step) if row.step is not None else "-",
            row.where,
            row.local or "-",
            row.remote,
            row.store_level or "-",
            format_bytes(max(row.local_bytes, row.remote_bytes)),
            row.path or ".",
        )
        for row in rows
    ]
    if run_files is not None:
        table.append(
            (
                "-",
                run_files.where,
                run_files.local_state,
                run_files.remote,
                run_files.store_level or "-",
                format_bytes(max(run_files.local_bytes, run_files.remote_bytes)),
                f"run files ({max(run_files.files, run_files.local_files)})",
            )
        )
    out.table(("STEP", "WHERE", "LOCAL", "REMOTE", "CHECKS", "SIZE", "PATH"), table, right=("STEP", "SIZE"))
    for row in rows:
        for problem in row.problems[:3]:
            out.warn(f"{row.path}: {problem}")
    if run_files is not None:
        for problem in run_files.problems[:3]:
            out.warn(f"run files: {problem}")
        for skipped in run_files.skipped[:3]:
            out.warn(f"run file {skipped.path} not pushed: {skipped.reason}")
    if error is not None:
        out.fail(error, data)
    out.result(data)


def _confirm_free(out: Output, plan: PrunePlan) -> bool:
    """Ask at a terminal before local copies are freed, as prune asks, once the plan (verified remote copies
    only) is known; without one (cron) freeing goes on, as before. A "no" keeps them (the uploads stand)."""
    from ckptctl.cli._confirm import confirm_deletion
    from ckptctl.errors import RefusedError
    from ckptctl.humanize import format_bytes

    try:
        confirm_deletion(
            f"free {len(plan.to_delete)} local checkpoint(s), {format_bytes(plan.bytes_to_free)} "
            f"({', '.join(u.path for u in plan.to_delete[:3])}{', ...' if len(plan.to_delete) > 3 else ''})?",
            yes=False,
        )
    except RefusedError:
        return False
    return True
