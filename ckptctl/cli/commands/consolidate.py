"""``ckptctl consolidate SRC OUT``: DeepSpeed ZeRO shards -> one safetensors file."""

from __future__ import annotations

from typing import Annotated

import typer

from ckptctl.cli._options import JsonOpt, QuietOpt, StorageOpt


def consolidate(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="DeepSpeed save dir (uses latest), tag dir, or HF checkpoint-N holding one; local or URL.",
        ),
    ],
    out: Annotated[
        str,
        typer.Argument(
            metavar="OUT", help="Output .safetensors file, or a folder for model.safetensors (local)."
        ),
    ],
    tag: Annotated[
        str | None, typer.Option("--tag", help="Tag to convert instead of the one latest names.")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="fp32 (as DeepSpeed's zero_to_fp32), bf16 or fp16.")
    ] = "fp32",
    exclude_frozen: Annotated[
        bool, typer.Option("--exclude-frozen", help="Leave frozen parameters out.")
    ] = False,
    keep_tied: Annotated[
        bool,
        typer.Option(
            "--keep-tied",
            help="Write each tied alias as its own copy (default: owner once, aliases in metadata).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            "--max-shard-size",
            metavar="SIZE",
            help="Write HF shards (model-0000i-of-0000N.safetensors + index) of at most SIZE, e.g. 5GB; OUT is a folder.",
        ),
    ] = None,
    copy_configs: Annotated[
        bool,
        typer.Option(
            "--copy-configs/--no-copy-configs",
            help="Copy config.json and tokenizer files found beside SRC next to the output.",
        ),
    ] = True,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Merge DeepSpeed ZeRO (stage 1, 2 or 3) shards into one safetensors file, bit-identical to zero_to_fp32.

    Reads only the fp32 master weights from the optimizer files (never the Adam moments), without DeepSpeed or
    torch, writing each tensor as it is assembled; the output appears under its name only when complete. Tied
    weights are written once, with the aliases recorded in the header's metadata (--keep-tied writes copies).

    Examples:

      ckptctl consolidate /data/run42/checkpoint-900 model.safetensors

      ckptctl consolidate s3://bucket/run42 out/ --tag global_step900 --dtype bf16
    """
    from ckptctl.cli._output import Output
    from ckptctl.convert.consolidate import consolidate as run
    from ckptctl.humanize import format_bytes, parse_size
    from ckptctl.storage.location import Location, parse_storage_options

    output = Output.start("consolidate", json_mode=json_out, quiet=quiet)
    options = parse_storage_options(storage_option or [])
    location = Location.from_url(src, options)
    shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    with output.progress("consolidate", None) as bar:
        result = run(
            location,
            out,
            tag=tag,
            dtype=dtype,
            exclude_frozen=exclude_frozen,
            keep_tied=keep_tied,
            force=force,
            max_shard_bytes=shard_bytes,
            copy_configs=copy_configs,
            out_options=options,
            on_bytes=(lambda n: bar.advance(bar.task_ids[0], n)) if bar is not None else None,
        )
    output.result(result.to_dict())
    for warning in result.warnings:
        output.warn(warning)
    output.info(
        f"wrote {result.output}: {result.tensors} tensors, {result.parameters:,} parameters, "
        f"{format_bytes(result.bytes_written)} (ZeRO stage {result.stage}, {result.world_size} ranks) "
        f"in {result.seconds:.2f}s"
    )
