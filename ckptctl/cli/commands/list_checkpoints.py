"""``ckptctl list RUN``: the checkpoints of a run, with step, status, size, age, metrics and pointers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ckptctl.cli._options import JsonOpt, QuietOpt, RunArg, SettleOpt, StorageOpt

if TYPE_CHECKING:
    from ckptctl.catalog.listing import Listing
    from ckptctl.catalog.model import Unit
    from ckptctl.cli._output import Cell, Output
    from ckptctl.retention.policy_files import RunRules


def list_checkpoints(
    run: RunArg,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    sort: Annotated[
        str,
        typer.Option("--sort", help="Order by step|size|age|name|status, ascending; add :desc to reverse."),
    ] = "step",
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Show at most N checkpoints.")] = None,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="Only these statuses (complete, incomplete, in-progress, unknown); repeatable or comma-separated.",
        ),
    ] = None,
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics",
            metavar="all|NAME,...",
            help="Metrics to show: by default evaluation results (eval_*, val*, test*) and name=value in names; "
            "'all' for every logged number, or a comma-separated list of names.",
        ),
    ] = "",
    chart: Annotated[
        str | None,
        typer.Option(
            "--chart",
            metavar="NAME[:min|max]",
            help="Draw this metric by step, the best checkpoint and those the run's rules keep marked.",
        ),
    ] = None,
    settle: SettleOpt = "10m",
    storage_option: StorageOpt = None,
) -> None:
    """List the checkpoints of a run: step, status, size, age, layout, metrics and pointers.

    A run is a folder of checkpoints written by a trainer (HF Trainer, DeepSpeed, torchtitan/DCP, Lightning,
    Megatron, Orbax, OLMo-core, NeMo, open-instruct, or plain .pt/.safetensors files). Status tells whether a
    checkpoint is whole: complete, incomplete (its layout's completion marker is missing, or the file is
    truncated), in-progress (a temporary name, newer than the run's `latest` pointer, or written less than
    --settle ago), or unknown. Entries ckptctl does not recognise are listed as unknown and never guessed.
    A folder that holds several runs (Lightning's version_N/, sibling HF output folders) is shown run by run.

    Examples:

      ckptctl list /data/run42

      ckptctl list s3://bucket/run42 --sort step:desc --limit 5

      ckptctl list gs://bucket/run42 --status incomplete,in-progress --json
    """
    from ckptctl.catalog.listing import ListOptions, list_run
    from ckptctl.cli._output import Output
    from ckptctl.errors import CkptctlError
    from ckptctl.retention.each_run import PruneSettings, rules_for_run
    from ckptctl.retention.policy_files import PolicyFinder
    from ckptctl.storage.location import Location, parse_storage_options

    out = Output.start("list", json_mode=json_out, quiet=quiet)
    options = ListOptions.parse(sort=sort, limit=limit, statuses=status or [], settle=settle, metrics=metrics)
    location = Location.from_url(run, parse_storage_options(storage_option or []))
    listing = list_run(location, options)
    # The rules a prune of this run would follow, and where each is written (a broken file is said, not fatal).
    data = listing.to_dict()
    rules = None
    try:
        rules = rules_for_run(location, PruneSettings(), PolicyFinder())
        data["policy"] = rules.describe()
    except CkptctlError as exc:
        data["policy"] = []
        data["warnings"].append(f"policy file: {exc.message}")
        out.warn(f"policy file: {exc.message}")
    out.result(data)
    if not json_out:
        _render(out, listing)
        for rule in data["policy"]:
            out.info(f"rule {rule['setting']} = {rule['value']} (from {rule['from']})")
        if chart:
            _chart(out, listing, chart, rules)


def _render(out: Output, listing: Listing) -> None:
    from rich.text import Text

    from ckptctl.catalog.metrics import format_metric
    from ckptctl.humanize import format_age, format_bytes

    colours = {"complete": "green", "incomplete": "red", "in-progress": "yellow", "unknown": "magenta"}
    runs = listing.scan.runs
    groups: list[tuple[str | None, list[Unit]]] = (
        [(run, [u for u in listing.units if u.run == run]) for run in runs] if len(runs) > 1 else []
    )
    ranked_elsewhere = {u.path for _, units in groups for u in units}
    rest = [u for u in listing.units if u.path not in ranked_elsewhere]
    if groups and rest:
        groups.append((None, rest))
    for run, units in groups or [(None, list(listing.units))]:
        rows: list[list[Cell]] = []
        for unit in units:
            if unit.step is not None:
                step = f"save {unit.step}" if unit.ordinal == "save" else str(unit.step)
            else:
                step = f"ep{unit.epoch}" if unit.epoch is not None else "-"
            age = listing.now - unit.newest_mtime if unit.newest_mtime is not None else None
            shown = listing.options.shown_metrics(unit)
            metrics = " ".join(f"{k}={format_metric(v)}" for k, v in sorted(shown.items(), key=_metric_order))
            note = "" if unit.status.value == "complete" else unit.reason
            rows.append(
                [
                    step,
                    (unit.status.value, colours[unit.status.value]),
                    format_bytes(unit.total_bytes),
                    format_age(age),
                    unit.layout.value,
                    metrics,
                    ",".join(unit.pointers),
                    unit.path or ".",
                    note,
                ]
            )
        if groups:
            label = f"run {run or '.'}" if run is not None else "not in any run"
            out.print(Text(f"{label} ({len(units)} shown)", style="bold"))
        out.table(
            ("STEP", "STATUS", "SIZE", "AGE", "LAYOUT", "METRICS", "POINTERS", "PATH", "NOTE"),
            rows,
            right=("STEP", "SIZE", "AGE"),
        )
    summary = listing.summary
    several = f" ({len(runs)} runs)" if len(runs) > 1 else ""
    out.info(
        f"{summary['shown']} of {summary['units']} checkpoints shown; {summary['complete']} complete, "
        f"{format_bytes(summary['bytes'])} in {listing.url}{several}"
    )
    for warning in listing.warnings:
        out.warn(warning)


def _metric_order(item: tuple[str, float]) -> tuple[int, str]:
    name = item[0]
    return (0 if name.startswith("eval") else 1 if "loss" in name else 2, name)


def _chart(out: Output, listing: Listing, metric: str, rules: RunRules | None) -> None:
    """The metric curve: the best complete checkpoint by ``metric`` (``B``), those the run's rules would keep
    (``k``; none without rules). Drawn after the table; ``--json`` carries the numbers instead."""
    from rich.text import Text

    from ckptctl.catalog.model import Status
    from ckptctl.cli._chart import BEST, KEPT, OTHER, Point, metric_chart
    from ckptctl.errors import CkptctlError
    from ckptctl.retention.policy import Policy, decide

    ranking = Policy.build(keep_best=1, metric=metric)  # the metric's name and whether lower is better
    name = ranking.metric or metric
    drawn = [
        u
        for u in listing.scan.units
        if u.status is Status.COMPLETE and u.step is not None and name in u.metrics
    ]
    if not drawn:
        out.warn(f"--chart {metric}: no complete checkpoint has a value for {name!r}")
        return
    best = {d.unit.path for d in decide(drawn, ranking) if any(r.startswith("best#") for r in d.reasons)}
    kept: set[str] = set()
    if rules is not None and rules.has_keep_rule:
        try:
            kept = {d.unit.path for d in decide(listing.scan.units, rules.policy()) if d.action == "keep"}
        except CkptctlError as exc:
            out.warn(f"--chart: the run's rules cannot be used ({exc.message})")
    points = [
        Point(u.step or 0, u.metrics[name], BEST if u.path in best else KEPT if u.path in kept else OTHER)
        for u in drawn
    ]
    for line in metric_chart(points, name=name):
        out.print(Text(line))
