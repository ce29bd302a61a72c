"""``ckptctl advise RUN``: how often to save, from the run's own files and stated failure assumptions."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Annotated

import typer

from ckptctl.cli._options import JsonOpt, QuietOpt, RunArg, SettleOpt, StorageOpt

if TYPE_CHECKING:
    from ckptctl.cli._output import Output
    from ckptctl.planning.advice import Advice

_TIMELINE_ROWS = 20
_BAR_WIDTH = 40


def advise(
    run: RunArg,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    mtbf: Annotated[
        str | None,
        typer.Option(
            "--mtbf", metavar="DURATION", help="The job's mean time between failures (e.g. 12h, 3d)."
        ),
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus",
            metavar="N",
            help="Derive the MTBF from the job's GPU count at Llama 3's failure rate (about one per 50,700 "
            "GPU-hours).",
        ),
    ] = None,
    restart_cost: Annotated[
        str | None,
        typer.Option(
            "--restart-cost", metavar="DURATION", help="Time from a failure to training again (default: 0)."
        ),
    ] = None,
    save_cost: Annotated[
        str | None,
        typer.Option(
            "--save-cost",
            metavar="DURATION",
            help="Time one save blocks training, instead of the measured write time (async saves, one-file "
            "checkpoints).",
        ),
    ] = None,
    max_overhead: Annotated[
        str | None,
        typer.Option(
            "--max-overhead",
            metavar="SHARE",
            help="Budget for time spent saving, e.g. 5% (the default) or 0.1.",
        ),
    ] = None,
    keep_last: Annotated[
        int | None,
        typer.Option(
            "--keep-last", min=1, help="Show what keeping the newest N checkpoints occupies and spans."
        ),
    ] = None,
    capacity: Annotated[
        str | None,
        typer.Option(
            "--capacity",
            metavar="SIZE",
            help="Space for this run's checkpoints (default: the free space of a local disk).",
        ),
    ] = None,
    settle: SettleOpt = "10m",
    storage_option: StorageOpt = None,
) -> None:
    """Advise how often a run should save: Young's and Daly's intervals, the time lost, the storage it takes.

    Measured from the run's files (sizes and times): checkpoint size, write time (the spread of file times in
    a checkpoint, marker last), write bandwidth, time per step and the current interval. Inferred: signs of
    failure (saves cut short, stretches far slower than usual, a step written after a higher one). Assumed
    unless given: the MTBF (--mtbf, or --gpus N at Llama 3's failure rate) and the restart cost. Needs at least
    two complete checkpoints with steps.

    Examples:

      ckptctl advise /data/run42 --gpus 1024

      ckptctl advise s3://bucket/run42 --mtbf 12h --restart-cost 15m --keep-last 5

      ckptctl advise gs://bucket/run42 --save-cost 40s --max-overhead 2% --json
    """
    from ckptctl.cli._output import Output
    from ckptctl.planning.advice import AdviceOptions, advise_run

    out = Output.start("advise", json_mode=json_out, quiet=quiet)
    options = AdviceOptions.parse(
        mtbf=mtbf,
        gpus=gpus,
        restart_cost=restart_cost,
        save_cost=save_cost,
        max_overhead=max_overhead,
        keep_last=keep_last,
        capacity=capacity,
        settle=settle,
    )
    advice = advise_run(run, options, storage_options=storage_option or [])
    out.result(advice.to_dict())
    if not json_out:
        _render(out, advice)


def _minutes(seconds: float) -> str:
    """Minutes for the interval table: one decimal, as Daly's figures are published, more below a minute."""
    minutes = seconds / 60
    return f"{minutes:.1f}" if minutes >= 1 else f"{minutes:.2g}"


def _value(value: float | None, unit: str) -> str:
    from ckptctl.humanize import format_bytes

    if value is None:
        return "-"
    if unit == "B":
        return format_bytes(value)
    if unit == "B/s":
        return f"{format_bytes(value)}/s"
    if unit == "fraction":
        return f"{value:+.1%}" if value < 0 else f"{value:.1%}"
    if unit == "steps":
        return f"{value:g} steps"
    if value >= 7200:
        return f"{value / 3600:.3g} h"
    return f"{value:.3g} s" if value < 120 else f"{value / 60:.1f} min"


def _render(out: Output, advice: Advice) -> None:
    from rich.table import Table
    from rich.text import Text

    from ckptctl.humanize import format_bytes

    m = advice.measurement
    incomplete = len(m.saves) - len(m.complete)
    out.print(
        Text(
            f"{advice.url}: {len(m.saves)} checkpoints ({len(m.complete)} complete, {incomplete} not) over "
            f"{m.span_seconds / 3600:.3g} h",
            style="bold",
        )
    )
    inputs = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("INPUT", "VALUE", "HOW", "BASIS"):
        inputs.add_column(column, justify="right" if column == "VALUE" else "left", overflow="fold")
    for name, found in advice.inputs.items():
        inputs.add_row(name, _value(found.value, found.unit), found.label, Text(found.basis))
    out.print(inputs)
    if m.evidence:
        out.print(Text("signs of failure (inferred)", style="bold"))
        for sign in m.evidence:
            out.print(Text(f"  {sign.kind:<16} {sign.path}: {sign.detail}"))
    intervals = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("INTERVAL", "MINUTES", "STEPS", "TIME LOST"):
        intervals.add_column(column, justify="left" if column == "INTERVAL" else "right")
    for candidate in (advice.current, advice.young, advice.daly, advice.overhead):
        if candidate is not None:
            lost = "-" if candidate.loss is None else f"{candidate.loss:.1%}"
            intervals.add_row(candidate.rule, _minutes(candidate.seconds), str(candidate.steps), lost)
    out.print(intervals)
    if advice.suggested is not None:
        s = advice.suggested
        out.print(
            Text(
                f"suggested: save every {s.steps} steps ({_value(s.seconds, 's')}, {s.rule})",
                style="bold green",
            )
        )
    storage = advice.storage
    fits = storage["checkpoints_that_fit"]
    lines = [f"the run holds {format_bytes(storage['run_bytes'])}"]
    if fits is not None:
        lines.append(f"{fits} checkpoints of {format_bytes(m.size.value or 0)} fit in the capacity")
    for key, per_day in storage["written_per_day"].items():
        lines.append(f"{key} interval writes {format_bytes(per_day)} a day")
    keep = storage.get("keep_last")
    if keep is not None:
        spans = ", ".join(f"{_value(v, 's')} at the {k} interval" for k, v in keep["history_seconds"].items())
        lines.append(f"keep-last {keep['count']} holds {format_bytes(keep['bytes'])}, spanning {spans}")
    out.print(Text("storage", style="bold"))
    for line in lines:
        out.print(Text(f"  {line}"))
    _timeline(out, advice)
    for note in advice.notes:
        out.print(Text(f"note: {note}"))
    for need in advice.needs:
        out.warn(f"advise needs {need}")


def _timeline(out: Output, advice: Advice) -> None:
    """Each save as a bar: training since the previous save ('-') and the save's own write ('#'), to scale."""
    from rich.text import Text

    saves = sorted(advice.measurement.saves, key=lambda s: s.finished)[-_TIMELINE_ROWS:]
    rows = []
    for before, save in itertools.pairwise(saves):
        write = save.write_seconds or 0.0
        rows.append((save, max(save.finished - before.finished - write, 0.0), write))
    longest = max((train + write for _, train, write in rows), default=0.0)
    if not rows or longest <= 0:
        return
    out.print(Text("timeline ('-' training since the previous save, '#' writing)", style="bold"))
    for save, train, write in rows:
        dashes = round(_BAR_WIDTH * train / longest)
        hashes = max(1, round(_BAR_WIDTH * write / longest)) if write else 0
        bar = "-" * dashes + "#" * hashes
        status = "" if save.status.value == "complete" else f" {save.status.value}"
        out.print(
            Text(
                f"  {save.step:>10} {bar:<{_BAR_WIDTH + 1}} {_value(train, 's')} + {_value(write, 's')}{status}"
            )
        )
