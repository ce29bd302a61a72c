"""``ckptctl runs ROOT``: every run under a root, its checkpoints, bytes, newest step and leftovers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

import typer

from ckptctl.cli._options import JsonOpt, QuietOpt, SettleOpt, StorageOpt

if TYPE_CHECKING:
    from ckptctl.catalog.runs import RunsSurvey
    from ckptctl.cli._output import Cell, Output
    from ckptctl.retention.each_run import PolicyPreview


def runs(
    root: Annotated[
        str,
        typer.Argument(
            metavar="ROOT",
            help="A folder of runs: a local path or any fsspec URL (s3://bucket/ckpt, gs://bucket/ckpt).",
            show_default=False,
        ),
    ],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    sort: Annotated[
        str,
        typer.Option(
            "--sort", help="Order by size|name|age|checkpoints; add :asc or :desc (bare: ascending)."
        ),
    ] = "size:desc",
    settle: SettleOpt = "10m",
    storage_option: StorageOpt = None,
) -> None:
    """Survey every run under a root: layouts, checkpoints by status, bytes, newest step, tiering and leftovers.

    One listing of ROOT, no read per checkpoint. A run is a folder of checkpoints; a folder nesting several
    (Lightning's version_N/, HF output folders) shows each. Leftovers are what costs storage without being a
    checkpoint to resume from: in-progress saves older than --settle, conversion by-products (torchtitan's
    step-N/sharded/ beside consolidated safetensors, ds_to_universal's tmp/), .ckptctl-partial folders of a
    killed pull or consolidate, and on S3 incomplete multipart uploads. TIERED counts checkpoints with a
    `tier push` manifest in ROOT (so ROOT is the remote). Single-file checkpoints are not opened: their
    status is unknown here (`ckptctl list RUN` checks them). Nothing is written or deleted.

    Examples:

      ckptctl runs /nvme/ckpt

      ckptctl runs s3://team-ckpt --sort age --json
    """
    from ckptctl.catalog.runs import RunOrder, survey_runs
    from ckptctl.cli._output import Output
    from ckptctl.humanize import parse_duration
    from ckptctl.retention.each_run import preview_policies
    from ckptctl.storage.location import Location, parse_storage_options

    out = Output.start("runs", json_mode=json_out, quiet=quiet)
    order = RunOrder.parse(sort)
    location = Location.from_url(root, parse_storage_options(storage_option or []))
    survey = survey_runs(location, settle_seconds=parse_duration(settle)).ordered(order)
    # Rules are looked up from where the checkpoints are, as prune --each-run does (a Lightning run's
    # checkpoints/.ckptctl.toml applies to it).
    by_folder = preview_policies(
        location, {run.checkpoint_folder: run.units for run in survey.runs}, survey.policy_files
    )
    previews = {run.path: by_folder[run.checkpoint_folder] for run in survey.runs}
    data = survey.to_dict()
    for record in data["runs"]:
        record["policy"] = previews[record["path"]].to_dict()
    out.result(data)
    if not json_out:
        _render(out, survey, previews)


def _render(out: Output, survey: RunsSurvey, previews: Mapping[str, PolicyPreview]) -> None:
    from ckptctl.humanize import format_age, format_bytes

    rows: list[list[Cell]] = []
    for run in survey.runs:
        counts = run.by_status
        age = survey.now - run.newest_mtime if run.newest_mtime is not None else None
        waste = f"{len(run.leftovers)} ({format_bytes(run.leftover_bytes)})" if run.leftovers else ""
        rows.append(
            [
                run.path or ".",
                ",".join(run.layouts),
                str(run.checkpoints),
                (str(counts["complete"]), "green"),
                (str(counts["incomplete"]), "red" if counts["incomplete"] else ""),
                (str(counts["in-progress"]), "yellow" if counts["in-progress"] else ""),
                str(counts["unknown"]),
                format_bytes(run.bytes),
                str(run.newest_step) if run.newest_step is not None else "-",
                format_age(age),
                str(run.tiered) if run.tiered else "",
                (waste, "red") if waste else "",
                _policy_cell(previews[run.path]),
            ]
        )
    columns: tuple[str, ...] = ("RUN", "LAYOUT", "CKPTS", "COMPLETE", "INCOMPLETE", "IN-PROGRESS", "UNKNOWN")
    columns += ("SIZE", "NEWEST", "AGE", "TIERED", "LEFTOVERS", "POLICY FREES")
    out.table(columns, rows, right=columns[2:-2])
    if survey.leftovers:
        out.print()
        out.table(
            ("LEFTOVER", "KIND", "SIZE", "AGE", "WHY"),
            [
                [
                    item.path,
                    item.kind,
                    format_bytes(item.bytes) if item.bytes is not None else "-",
                    format_age(survey.now - item.newest_mtime if item.newest_mtime is not None else None),
                    item.reason,
                ]
                for item in survey.leftovers
            ],
            right=("SIZE", "AGE"),
        )
    totals = survey.totals
    status = totals["by_status"]
    out.info(
        f"{totals['runs']} runs, {totals['checkpoints']} checkpoints ({status['complete']} complete, "
        f"{status['incomplete']} incomplete, {status['in-progress']} in progress, {status['unknown']} unknown), "
        f"{format_bytes(totals['bytes'])} in {survey.url}; {totals['leftovers']} leftovers "
        f"({format_bytes(totals['leftover_bytes'])}), {totals['tiered']} checkpoints tiered"
    )
    for warning in survey.warnings:
        out.warn(warning)
    for path, preview in previews.items():
        if preview.error is not None:
            out.warn(f"run {path or '.'}: {preview.error.message}")


def _policy_cell(preview: PolicyPreview) -> Cell:
    """``3 (1.2 GiB)`` by the run's .ckptctl.toml rules; ``-`` without rules; ``error`` for a broken file."""
    from ckptctl.humanize import format_bytes

    if preview.error is not None:
        return ("error", "red")
    if preview.rules is None or not preview.rules.has_keep_rule:
        return "-"
    return f"{preview.checkpoints} ({format_bytes(preview.bytes)})"
