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
