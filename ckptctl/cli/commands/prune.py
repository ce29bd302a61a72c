"""``ckptctl prune RUN --keep-last K``: delete old checkpoints, never the wrong one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ckptctl.cli._options import (
    DryRunOpt,
    JsonOpt,
    MetricFileOpt,
    MetricOpt,
    QuietOpt,
    RunArg,
    StorageOpt,
    YesOpt,
)

if TYPE_CHECKING:
    from ckptctl.catalog.model import Unit
    from ckptctl.cli._output import Cell, Output
    from ckptctl.retention.each_run import PruneSettings, RunOutcome
    from ckptctl.retention.plan import PrunePlan, PruneResult
    from ckptctl.retention.policy_files import RunRules
    from ckptctl.storage.location import Location

# How prune spells each keep rule (the core names rules, the command names its flags).
PRUNE_FLAGS = {
    "keep_last": "--keep-last",
    "keep_total": "--keep-total",
    "keep_best": "--keep-best",
    "metric": "--metric",
    "keep_every_steps": "--keep-every-steps",
    "keep_within": "--keep-within",
    "keep_steps": "--keep-steps",
    "pin": "--pin",
    "metric_file": "--metric-file",
    "step_key": "--step-key",
    "max_delete": "--max-delete",
    "max_delete_bytes": "--max-delete-bytes",
    "ignore_time_order": "--ignore-time-order",
}


def prune(
    run: RunArg,
    keep_last: Annotated[
        int | None,
        typer.Option("--keep-last", metavar="K", help="Keep the newest K complete checkpoints (by step)."),
    ] = None,
    keep_total: Annotated[
        int | None,
        typer.Option(
            "--keep-total",
            metavar="K",
            help="Keep K checkpoints in all: the best (--keep-best), the protected ones and then the newest, "
            "like HF save_total_limit or Orbax max_to_keep.",
        ),
    ] = None,
    keep_best: Annotated[
        int | None,
        typer.Option("--keep-best", metavar="M", help="Keep the M best complete checkpoints by --metric."),
    ] = None,
    metric: MetricOpt = None,
    metric_file: MetricFileOpt = None,
    step_key: Annotated[
        str | None, typer.Option("--step-key", help="The step column of --metric-file (default: step).")
    ] = None,
    keep_every_steps: Annotated[
        int | None,
        typer.Option(
            "--keep-every-steps", metavar="N", help="Keep every checkpoint whose step is a multiple of N."
        ),
    ] = None,
    keep_within: Annotated[
        str | None,
        typer.Option(
            "--keep-within",
            metavar="DURATION",
            help="Keep checkpoints written within DURATION of the newest one (e.g. 1d).",
        ),
    ] = None,
    keep_steps: Annotated[
        str | None, typer.Option("--keep-steps", metavar="S1,S2", help="Keep these steps.")
    ] = None,
    pin: Annotated[
        list[int] | None,
        typer.Option(
            "--pin",
            metavar="STEP",
            help="Keep this step (repeatable). A .ckptctl-keep file inside a checkpoint pins it too.",
        ),
    ] = None,
    keep_without_metric: Annotated[
        bool,
        typer.Option(
            "--keep-without-metric/--no-keep-without-metric",
            help="Keep checkpoints that have no value for --metric.",
        ),
    ] = True,
    max_delete: Annotated[
        int | None,
        typer.Option(
            "--max-delete", metavar="N", help="Refuse (exit 4) if the plan deletes more than N checkpoints."
        ),
    ] = None,
    max_delete_bytes: Annotated[
        str | None,
        typer.Option(
            "--max-delete-bytes",
            metavar="SIZE",
            help="Refuse (exit 4) if the plan frees more than SIZE (e.g. 2TB).",
        ),
    ] = None,
    ignore_time_order: Annotated[
        bool,
        typer.Option(
            "--ignore-time-order", help="Do not refuse when step order and file times disagree (copied runs)."
        ),
    ] = False,
    incomplete: Annotated[
        bool,
        typer.Option(
            "--incomplete",
            help="Instead of keep rules: delete half-written checkpoints (incomplete or in progress) older than --older-than.",
        ),
    ] = False,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="With --incomplete: only those whose newest file is older than this (e.g. 1d).",
        ),
    ] = None,
    each_run: Annotated[
        bool,
        typer.Option(
            "--each-run",
            help="RUN is a root: prune every run under it by its own .ckptctl.toml rules and the flags given.",
        ),
    ] = False,
    settle: Annotated[
        str | None,
        typer.Option(
            "--settle",
            metavar="DURATION",
            help="A checkpoint whose newest file is younger than this is in progress and kept (default 10m).",
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Delete the checkpoints of a run that no keep rule protects.

    The kept set is the union of every rule given. Whatever the rules, prune never deletes: the newest complete
    checkpoint, one that is incomplete, in progress, settling or of an unknown layout, one a pointer names
    (latest, Megatron tracker, last.ckpt, HF best_model_checkpoint), or one that is pinned. It shows the plan
    first; on a terminal it asks before deleting (--yes skips that); without a terminal (cron) it deletes.
    --json prints JSON Lines events: planned, deleted, skipped, error, and a final summary.

    A folder that holds several runs (Lightning's version_N/, sibling HF output folders) is refused: prune
    each run on its own. Lightning's CSVLogger metrics.csv is joined by Lightning's rule (its row at step s
    holds the validation of the checkpoint at step s+1).

    Exit codes: 0 done or nothing to do, 2 usage (no keep rule), 3 no checkpoint with a step to rank,
    4 refused (--max-delete, several runs in one folder), 5 some deletions failed (re-run finishes them),
    6 another prune holds the run, 7 metric missing or matching no checkpoint.

    Examples:

      ckptctl prune /data/run42 --keep-last 3

      ckptctl prune s3://bucket/run42 --keep-last 2 --keep-best 3 --metric eval_loss --dry-run

      ckptctl prune /data/run42 --keep-last 5 --keep-every-steps 10000 --max-delete 20 --json

      ckptctl prune /data/run42 --incomplete --older-than 1d      # clean up crashed, half-written saves
    """
    from ckptctl.catalog.scan import DEFAULT_SETTLE_SECONDS
    from ckptctl.cli._output import Output
    from ckptctl.errors import UsageError
    from ckptctl.humanize import parse_duration, parse_size, parse_steps
    from ckptctl.retention.each_run import PruneSettings, plan_run, rules_for_run, settle_seconds
    from ckptctl.retention.plan import execute, plan_prune
    from ckptctl.retention.policy import Policy
    from ckptctl.retention.policy_files import PolicyFinder, Setting
    from ckptctl.storage.location import Location, parse_storage_options
    from ckptctl.storage.lock import run_lock

    out = Output.start("prune", json_mode=json_out, quiet=quiet, flags=PRUNE_FLAGS)
    if incomplete != (older_than is not None):
        raise UsageError("--incomplete and --older-than go together (e.g. --incomplete --older-than 1d)")
    if each_run and incomplete:
        raise UsageError("--each-run prunes by keep rules; clean up half-written saves one run at a time")
    settle_given = parse_duration(settle) if settle is not None else None
    limit_bytes = parse_size(max_delete_bytes) if max_delete_bytes else None
    given: dict[str, object] = {
        "keep-last": keep_last,
        "keep-total": keep_total,
        "keep-best": keep_best,
        "metric": metric,
        "metric-file": metric_file,
        "step-key": step_key,
        "keep-every-steps": keep_every_steps,
        "keep-within": parse_duration(keep_within) if keep_within else None,
        "keep-steps": tuple(parse_steps(keep_steps)) if keep_steps else None,
        "max-delete": max_delete,
        "max-delete-bytes": limit_bytes,
        "settle": settle_given,
    }
    options = parse_storage_options(storage_option or [])
    settings = PruneSettings(
        flags={key: Setting(value, f"--{key}") for key, value in given.items() if value is not None},
        flag_names=PRUNE_FLAGS,
        pinned_steps=tuple(pin or ()),
        keep_without_metric=keep_without_metric,
        check_time_order=not ignore_time_order,
        storage_options=options,
    )
    location = Location.from_url(run, options)
    if each_run:
        _prune_each_run(out, location, settings, dry_run=dry_run, yes=yes)
        return
    if incomplete:
        settle_for = settle_given if settle_given is not None else DEFAULT_SETTLE_SECONDS

        def make_plan() -> PrunePlan:
            return plan_prune(
                location,
                Policy(),
                settle_seconds=settle_for,
                max_delete=max_delete,
                max_delete_bytes=limit_bytes,
                incomplete_older_than=parse_duration(older_than or "0"),
            )

    else:
        rules = rules_for_run(location, settings, PolicyFinder())
        out.flags = rules.names(PRUNE_FLAGS)
        rules.policy()  # a rule that cannot be built is refused before the run is locked
        _show_rules(out, rules)
        settle_for = settle_seconds(rules)

        def make_plan() -> PrunePlan:
            return plan_run(location, rules, settings)

    if dry_run:
        plan = make_plan()
        _show_plan(out, plan)
        _summary(out, plan, None, dry_run=True)
        return
    with run_lock(location) as lease:
        plan = make_plan()
        _show_plan(out, plan)
        count = len(plan.to_delete) + len(plan.resume)
        if count == 0:
            _summary(out, plan, None, dry_run=False)
            return
        from ckptctl.cli._confirm import confirm_deletion
        from ckptctl.humanize import format_bytes

        confirm_deletion(f"delete {count} checkpoint(s), {format_bytes(plan.bytes_to_free)}?", yes=yes)

        def on_event(kind: str, unit: Unit, detail: str) -> None:
            out.event(kind, path=unit.path, step=unit.step, bytes=unit.total_bytes, detail=detail)
            if kind == "deleted":
                out.info(f"deleted {unit.path}")
            elif kind in ("skipped", "error"):
                out.warn(f"{kind} {unit.path}: {detail}")

        lease.check()  # a prompt may have outlasted the lease: never delete without it
        result = execute(plan, location, settle_seconds=settle_for, on_event=on_event)
        _summary(out, plan, result, dry_run=False)
        if result.failed:
            from ckptctl.errors import PartialFailureError

            raise PartialFailureError(
                f"{len(result.failed)} checkpoint(s) could not be fully deleted; they stay marked and a re-run "
                "finishes them",
                url=location.url,
            )


def _show_plan(out: Output, plan: PrunePlan) -> None:
    from ckptctl.humanize import format_bytes

    for decision in plan.decisions:
        out.event(
            "planned",
            path=decision.unit.path,
            step=decision.unit.step,
            action=decision.action,
            reasons=list(decision.reasons),
            bytes=decision.unit.total_bytes,
        )
    for unit in plan.resume:
        out.event(
            "planned",
            path=unit.path,
            step=unit.step,
            action="delete",
            reasons=["finishing an interrupted prune"],
            bytes=unit.total_bytes,
        )
    if out.json_mode or out.quiet:
        return
    colours = {"keep": "green", "delete": "red", "skip": "yellow"}
    rows: list[list[Cell]] = [
        [
            str(d.unit.step) if d.unit.step is not None else "-",
            (d.action, colours[d.action]),
            format_bytes(d.unit.total_bytes),
            d.unit.status.value,
            ", ".join(d.reasons),
            d.unit.path or ".",
        ]
        for d in plan.decisions
    ]
    rows += [
        [
            str(u.step),
            ("delete", "red"),
            format_bytes(u.total_bytes),
            u.status.value,
            "finishing an interrupted prune",
            u.path,
        ]
        for u in plan.resume
    ]
    out.table(("STEP", "ACTION", "SIZE", "STATUS", "REASONS", "PATH"), rows, right=("STEP", "SIZE"))
    for note in plan.notes:
        out.warn(note)


def _summary(out: Output, plan: PrunePlan, result: PruneResult | None, *, dry_run: bool) -> None:
    from ckptctl.humanize import format_bytes

    kept = sum(1 for d in plan.decisions if d.action != "delete")
    if result is None:
        count = len(plan.to_delete) + len(plan.resume)
        out.event(
            "summary",
            dry_run=dry_run,
            kept=kept,
            to_delete=count,
            deleted=0,
            freed_bytes=0,
            bytes_to_free=plan.bytes_to_free,
        )
        verb = "would delete" if dry_run else "nothing to delete;"
        text = (
            f"{verb} {count} checkpoint(s), {format_bytes(plan.bytes_to_free)}; keeping {kept}"
            if count
            else (f"nothing to delete; keeping {kept}")
        )
        out.info(text + (" (dry run: nothing changed)" if dry_run else ""))
        return
    out.event(
        "summary",
        dry_run=False,
        kept=kept,
        deleted=len(result.deleted),
        skipped=len(result.skipped),
        failed=len(result.failed),
        freed_bytes=result.freed_bytes,
    )
    out.info(
        f"deleted {len(result.deleted)} checkpoint(s), freed {format_bytes(result.freed_bytes)}; kept {kept}"
    )


def _show_rules(out: Output, rules: RunRules) -> None:
    """Which rule came from where: a policy file's line, or a flag."""
    described = rules.describe()
    out.event("rules", rules=described)
    for entry in described:
        if not entry["from"].startswith("--"):
            out.info(f"rule {entry['setting']} = {entry['value']} (from {entry['from']})")


def _prune_each_run(
    out: Output, root: Location, settings: PruneSettings, *, dry_run: bool, yes: bool
) -> None:
    """``--each-run``: every run by its own rules; one run's failure is reported and the rest still done."""
    from collections import Counter

    from ckptctl.cli._confirm import confirm_deletion, stdin_is_terminal
    from ckptctl.errors import PartialFailureError
    from ckptctl.humanize import format_bytes
    from ckptctl.retention.each_run import prune_each_run

    # The preview costs a walk: only when someone is asked.
    if not dry_run and not yes and stdin_is_terminal():
        preview = prune_each_run(root, settings, dry_run=True)
        _show_runs(out, preview.outcomes, dry_run=True)
        count = sum(len(o.plan.to_delete) + len(o.plan.resume) for o in preview.outcomes if o.plan)
        confirm_deletion(
            f"delete {count} checkpoint(s) in {len(preview.outcomes)} run(s) by their rules?", yes=yes
        )

    def on_outcome(outcome: RunOutcome) -> None:
        out.event("run", **outcome.to_dict())
        if dry_run and outcome.plan is not None:
            for unit in outcome.plan.to_delete:
                out.info(
                    f"would delete {outcome.run}/{unit.path}" if outcome.run else f"would delete {unit.path}"
                )
        if outcome.action == "failed" and outcome.error is not None:
            out.warn(f"run {outcome.run or '.'}: {outcome.error.message}")

    def on_event(kind: str, run: str, unit: Unit, detail: str) -> None:
        path = f"{run}/{unit.path}" if run else unit.path
        out.event(kind, run=run, path=unit.path, step=unit.step, bytes=unit.total_bytes, detail=detail)
        if kind == "deleted":
            out.info(f"deleted {path}")
        elif kind in ("skipped", "error"):
            out.warn(f"{kind} {path}: {detail}")

    result = prune_each_run(root, settings, dry_run=dry_run, on_outcome=on_outcome, on_event=on_event)
    _show_runs(out, result.outcomes, dry_run=dry_run)
    by_action = Counter(o.action.replace("-", "_") for o in result.outcomes)
    freed = sum(o.result.freed_bytes for o in result.outcomes if o.result)
    summary: dict[str, object] = {
        "root": root.url,
        "dry_run": dry_run,
        "runs": len(result.outcomes),
        **by_action,
    }
    out.event("summary", **summary, freed_bytes=freed)
    out.info(
        f"{len(result.outcomes)} run(s): "
        + ", ".join(f"{n} {action}" for action, n in sorted(by_action.items()))
        + ("" if dry_run else f"; freed {format_bytes(freed)}")
        + (" (dry run: nothing changed)" if dry_run else "")
    )
    if result.failed:
        out.fail(
            PartialFailureError(
                f"{len(result.failed)} of {len(result.outcomes)} run(s) failed ("
                + ", ".join(o.run or "." for o in result.failed[:5])
                + (", ..." if len(result.failed) > 5 else "")
                + f"; each is named above); the others were {'planned' if dry_run else 'done'}",
                url=root.url,
            ),
            {**summary, "outcomes": [o.to_dict() for o in result.outcomes]},
            errors=[
                {"run": o.run, "code": o.error.code, "message": o.error.message}
                for o in result.failed
                if o.error is not None
            ],
        )


def _show_runs(out: Output, outcomes: list[RunOutcome], *, dry_run: bool) -> None:
    """One row per run: what was (or would be) done, and which rules from where."""
    from ckptctl.humanize import format_bytes

    if out.quiet:
        return
    colours = {"pruned": "red", "planned": "yellow", "failed": "red", "no-policy": "magenta"}
    rows: list[list[Cell]] = []
    for o in outcomes:
        doomed = (o.result.deleted if o.result else list(o.plan.to_delete) if o.plan else []) or []
        size = o.result.freed_bytes if o.result else o.plan.bytes_to_free if o.plan else 0
        rules = ", ".join(f"{r['setting']}={r['value']}" for r in (o.rules.describe() if o.rules else []))
        note = (
            o.error.message
            if o.error
            else ("no rule in a policy file or a flag: left alone" if o.action == "no-policy" else "")
        )
        rows.append(
            [
                o.run or ".",
                (o.action, colours.get(o.action, "green")),
                str(len(doomed)),
                format_bytes(size),
                rules,
                note,
            ]
        )
    verb = "TO DELETE" if dry_run else "DELETED"
    out.table(("RUN", "ACTION", verb, "SIZE", "RULES", "NOTE"), rows, right=(verb, "SIZE"))
