"""Options shared by several commands, as ``Annotated`` aliases so each is declared once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON result (see README: the --json format).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or informational messages.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", "-n", help="Show what would be done; change nothing.")]
StorageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-o",
        metavar="KEY=VALUE",
        help="Passed to fsspec for the run's filesystem, e.g. -o endpoint_url=http://127.0.0.1:9000 "
        "-o anon=true. Repeatable; credentials come from the usual AWS/Google environment and config.",
    ),
]
RunArg = Annotated[
    str,
    typer.Argument(
        metavar="RUN",
        help="The run folder: a local path or any fsspec URL (s3://bucket/run, gs://bucket/run, memory://run).",
        show_default=False,
    ),
]
SettleOpt = Annotated[
    str,
    typer.Option(
        "--settle",
        metavar="DURATION",
        help="A checkpoint whose newest file is younger than this is reported in-progress (e.g. 10m, 90s, 0).",
    ),
]
StepOpt = Annotated[
    int | None, typer.Option("--step", metavar="N", min=0, help="The run's checkpoint of this step.")
]
LatestOpt = Annotated[
    bool, typer.Option("--latest", help="The run's newest checkpoint: the highest step (see each command).")
]
StepsOpt = Annotated[
    str | None,
    typer.Option("--steps", metavar="S1,S2", help="Only these steps, separated by commas (e.g. 800,900)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output if it exists (never an input).")]
JobsOpt = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        metavar="N",
        min=1,
        help="Parallel streams (files and parts); default 2 per core, 4-16.",
    ),
]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        "--metric",
        metavar="NAME[:min|max]",
        help="The metric that ranks checkpoints for --keep-best, e.g. eval_loss (names ending in 'loss' default "
        "to min) or eval_acc:max.",
    ),
]
MetricFileOpt = Annotated[
    str | None,
    typer.Option(
        "--metric-file",
        metavar="PATH",
        help="CSV or JSON Lines file of metrics by step (else HF trainer_state.json and name=value in "
        "checkpoint names are used).",
    ),
]
