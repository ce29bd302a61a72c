"""``ckptctl inspect PATH``: tensors, totals, ZeRO/DCP/PEFT facts and completeness, from headers only."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ckptctl.cli._options import JsonOpt, LatestOpt, QuietOpt, StepOpt, StorageOpt

if TYPE_CHECKING:
    from ckptctl.cli._output import Output
    from ckptctl.formats.model import Inspection

Matcher = Callable[[str], bool]

_SHOWN_BY_DEFAULT = 20
# Tensor roles that are not model weights, as the summary names them.
_NOT_PARAMETERS = {"optimizer": "optimizer", "scheduler": "scheduler", "rng": "rng state", "other": "other"}


def inspect_checkpoint(
    target: Annotated[
        str,
        typer.Argument(
            metavar="PATH_OR_URL",
            help="A checkpoint file or folder, or a run with --step/--latest: a local path or any fsspec URL.",
            show_default=False,
        ),
    ],
    step: StepOpt = None,
    latest: LatestOpt = False,
    tensors: Annotated[
        bool, typer.Option("--tensors", help="List every tensor (default: the first 20).")
    ] = False,
    filter_glob: Annotated[
        str | None,
        typer.Option(
            "--filter", metavar="GLOB", help="List only tensors whose name matches, e.g. 'layers.0.*'."
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Run every structural check (every file of the folder, every rank file, zip member, shard); exit 8 on a defect.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Show what a checkpoint holds: format, parameter totals, bytes by dtype, tensors, metadata, ZeRO / DCP /
    PEFT facts and whether it is whole.

    Reads headers only (safetensors header, torch zip directory and pickle, torch legacy pickles, DeepSpeed model
    states, DCP .metadata): tensor data is never loaded, torch is not needed, and no pickle code is ever run.
    Optimizer moments, scheduler and RNG state are shown as such, never counted as parameters. Over S3/GCS a file
    costs two or three small ranged reads. On a run, --latest takes the checkpoint its `latest` pointer names,
    else the highest complete step. Exits 8 when a defect is found (a truncated file, a missing rank file
    or shard; with --verify on a folder, any of its files), naming the file.

    Examples:

      ckptctl inspect /data/run42/checkpoint-300/model.safetensors

      ckptctl inspect s3://bucket/run42 --latest --filter 'model.layers.0.*'

      ckptctl inspect gs://bucket/run42/global_step3 --verify --json
    """
    from ckptctl.cli._output import Output
    from ckptctl.errors import IntegrityError, UsageError
    from ckptctl.inspect import inspect_checkpoint as run_inspect
    from ckptctl.storage.location import parse_storage_options

    out = Output.start("inspect", json_mode=json_out, quiet=quiet)
    if step is not None and latest:
        raise UsageError("--step and --latest are exclusive")
    result = run_inspect(
        target,
        storage_options=parse_storage_options(storage_option or []),
        step=step,
        latest=latest,
        verify=verify,
    )
    matcher = _matcher(filter_glob)
    data = result.to_dict(tensor_filter=matcher)
    if not json_out:
        _render(out, result, matcher, show_all=tensors or filter_glob is not None)
    if result.defects:
        first = result.defects[0]
        more = f" (and {len(result.defects) - 1} more defect(s))" if len(result.defects) > 1 else ""
        out.fail(IntegrityError(f"{result.url}: {first}{more}", url=result.url), data)
    out.result(data)


def _matcher(pattern: str | None) -> Matcher | None:
    if pattern is None:
        return None
    import fnmatch

    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fact_text(value: Any) -> str:
    """A fact on one line: long lists cut to their first entries, dicts as key=value."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fact_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        shown = ", ".join(str(v) for v in value[:6])
        return f"[{shown}{f', … {len(value)} in all' if len(value) > 6 else ''}]"
    return str(value)


def _render(out: Output, result: Inspection, matcher: Matcher | None, *, show_all: bool) -> None:
    from rich.text import Text

    from ckptctl.humanize import format_bytes

    def line(text: str) -> None:
        # Text, not markup: names, URLs and lists may hold square brackets.
        out.print(Text(text))

    totals = result.totals()
    status = "complete" if result.complete else "DEFECTIVE"
    checked = " (verified)" if result.verified else ""
    line(f"{result.url}\n  format      {result.format}\n  status      {status}{checked}")
    trainable = totals["trainable_parameters"]
    line(
        f"  parameters  {totals['parameters']:,}"
        + (f" ({trainable:,} trainable)" if trainable != totals["parameters"] else "")
        + f"\n  tensors     {totals['tensors']:,}, {format_bytes(totals['tensor_bytes'])} of tensor data in "
        f"{len(result.files)} file(s), {format_bytes(totals['file_bytes'])} on disk"
    )
    for role, entry in totals["by_role"].items():
        if role in _NOT_PARAMETERS:
            line(
                f"  {_NOT_PARAMETERS[role]:<11} {entry['tensors']:,} tensors, {entry['elements']:,} elements, "
                f"{format_bytes(entry['bytes'])} (not counted as parameters)"
            )
    for dtype, entry in totals["by_dtype"].items():
        line(
            f"    {dtype:<12} {entry['tensors']:>6,} tensors {entry['elements']:>16,} elements  {format_bytes(entry['bytes'])}"
        )
    for section, facts in result.facts.items():
        if isinstance(facts, dict):
            line(f"  {section}")
            for key, value in facts.items():
                if value not in (None, [], {}, ""):
                    line(f"    {key:<22} {_fact_text(value)}")
        else:
            line(f"  {section:<11} {facts}")
    meta = {
        k: v for k, v in result.metadata.items() if k not in ("ds_config", "top_level_keys", "bytes_items")
    }
    if meta:
        line("  metadata    " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    selected = [t for t in result.tensors if matcher is None or matcher(t.name)]
    shown = selected if show_all else selected[:_SHOWN_BY_DEFAULT]
    if shown:
        out.table(
            ("NAME", "DTYPE", "SHAPE", "BYTES", "ROLE"),
            (
                (
                    t.name,
                    t.dtype,
                    _shape(t.shape),
                    format_bytes(t.nbytes),
                    t.role + (f" = {t.alias_of}" if t.alias_of else ""),
                )
                for t in shown
            ),
            right=("BYTES",),
        )
    if len(shown) < len(selected):
        out.info(f"{len(shown)} of {len(selected)} tensors shown; --tensors lists all, --filter GLOB selects")
    for note in result.notes:
        out.info(f"note: {note}")
    for defect in result.defects:
        line(f"  defect: {defect}")
