"""``ckptctl consolidate SRC OUT``: DeepSpeed ZeRO shards or a PyTorch DCP folder -> safetensors."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ckptctl.cli._options import ForceOpt, JsonOpt, QuietOpt, StorageOpt


class OutputDtype(str, Enum):
    """What ``--dtype`` may cast floating tensors to (convert.consolidate.OUTPUT_DTYPES)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def consolidate(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="DeepSpeed save dir (uses latest), tag dir, HF checkpoint-N holding one, a DCP folder "
            "(.metadata + *.distcp, or a folder holding one: torchtitan step-N, Accelerate "
            "pytorch_model_fsdp_0), a torch .pt/.bin or Lightning .ckpt file, or an HF weights folder; "
            "local or URL.",
        ),
    ],
    out: Annotated[
        str,
        typer.Argument(
            metavar="OUT",
            help="Output .safetensors file, or a folder (model.safetensors; HF shards + index with "
            "--max-shard-size); local or URL.",
        ),
    ],
    tag: Annotated[
        str | None,
        typer.Option("--tag", help="Tag (or DCP step folder) to convert instead of the one latest names."),
    ] = None,
    dtype: Annotated[
        OutputDtype | None,
        typer.Option(
            "--dtype",
            help="Cast floating tensors to fp32, bf16 or fp16. Default: fp32 for ZeRO (as zero_to_fp32), "
            "as stored for DCP.",
        ),
    ] = None,
    prefix: Annotated[
        list[str] | None,
        typer.Option(
            "--prefix",
            metavar="P",
            help="Write only the sub-tree P (whole dotted components: v_head matches v_head.weight, not "
            "xv_head.weight) and strip P from the names. Repeatable.",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="P", help="Leave the sub-tree P out. Repeatable."),
    ] = None,
    keep_prefix: Annotated[
        bool, typer.Option("--keep-prefix", help="With --prefix, keep the names as they are.")
    ] = False,
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
    force: ForceOpt = False,
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
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            metavar="N",
            help="Split the sharded output over N processes (a Slurm job array, a Kubernetes Indexed Job): each "
            "makes the same shard plan and writes only its own shards, never the index. Needs --max-shard-size; "
            "run --finalize once after all of them.",
        ),
    ] = None,
    worker_index: Annotated[
        int | None,
        typer.Option(
            "--worker-index",
            metavar="I",
            help='This worker\'s number, 0..N-1: --worker-index "$SLURM_ARRAY_TASK_ID" (sbatch --array=0-N-1) '
            'or "$JOB_COMPLETION_INDEX" (Kubernetes). Shards it finds complete from the same plan are skipped, '
            "so a requeued task resumes; a shard of another plan is refused (--force replaces it).",
        ),
    ] = None,
    finalize: Annotated[
        bool,
        typer.Option(
            "--finalize",
            help="Run once after all workers, with their SRC, OUT and options: check every shard's header and "
            "size against the plan (no tensor data is read), then copy the configs and write the index, last. "
            "A missing or wrong shard is refused (exit 4) naming the --worker-index to rerun (with --workers N).",
        ),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Merge a sharded checkpoint (DeepSpeed ZeRO, PyTorch DCP/FSDP2) or a torch state dict into safetensors.

    ZeRO (stage 1, 2 or 3): reads only the fp32 master weights from the optimizer files (never the Adam moments), bit-identical
    to zero_to_fp32. DCP (torchtitan, FSDP2, Accelerate FSDP, use_collectives=False saves): each tensor is
    assembled from its chunks, which must tile it exactly; only the model weights are written (optimizer and
    train state left out, a {"model": ...} wrapper dropped), non-tensor items are listed, never unpickled. No
    DeepSpeed or torch needed; each tensor is written as it is assembled and the output appears under its name
    only when complete. Tied weights are written once, with the aliases recorded in the header's metadata
    (--keep-tied writes copies). Also reads torch state dicts (.pt/.bin, Lightning .ckpt: its state_dict) and
    HF weights folders (pytorch_model*.bin or model*.safetensors, single or sharded).

    Examples:

      ckptctl consolidate /data/run42/checkpoint-900 model.safetensors

      ckptctl consolidate s3://bucket/run42 out/ --tag global_step900 --dtype bf16

      ckptctl consolidate outputs/checkpoint/step-1000 policy.safetensors --prefix policy

    Split one conversion over a Slurm job array (sbatch --array=0-7; a Kubernetes Indexed Job passes
    $JOB_COMPLETION_INDEX): each task writes its shards, then one job after them all (--dependency=afterok)
    finalizes. All take the same SRC, OUT and options; pin the step with --tag so a moving latest cannot
    split them:

      ARGS="s3://b/run42 s3://b/hf/ --tag global_step900 --max-shard-size 5GB"

      ckptctl consolidate $ARGS --workers 8 --worker-index $SLURM_ARRAY_TASK_ID

      ckptctl consolidate $ARGS --workers 8 --finalize
    """
    from ckptctl.cli._output import Output
    from ckptctl.convert.consolidate import consolidate as run
    from ckptctl.convert.selection import Selection
    from ckptctl.humanize import format_bytes, parse_size
    from ckptctl.storage.location import Location, parse_storage_options

    output = Output.start("consolidate", json_mode=json_out, quiet=quiet)
    options = parse_storage_options(storage_option or [])
    location = Location.from_url(src, options)
    shard_bytes = parse_size(max_shard_size) if max_shard_size else None
    selection = Selection.build(prefix or [], exclude or [], keep_prefix=keep_prefix)
    with output.progress("consolidate", None) as bar:
        result = run(
            location,
            out,
            tag=tag,
            dtype=dtype.value if dtype is not None else None,
            exclude_frozen=exclude_frozen,
            keep_tied=keep_tied,
            force=force,
            max_shard_bytes=shard_bytes,
            copy_configs=copy_configs,
            out_options=options,
            selection=selection,
            on_bytes=(lambda n: bar.advance(bar.task_ids[0], n)) if bar is not None else None,
            workers=workers,
            worker_index=worker_index,
            finalize=finalize,
        )
    output.result(result.to_dict())
    for warning in result.warnings:
        output.warn(warning)
    source = (
        f"ZeRO stage {result.stage}, {result.world_size} ranks"
        if result.format == "zero"
        else result.format.upper()
    )
    shards = result.shards
    if shards is not None and shards.mode == "worker":
        output.info(
            f"worker {shards.worker_index} of {shards.workers}: wrote {len(shards.written)} of the "
            f"{shards.total} shards ({format_bytes(result.bytes_written)}), skipped {len(shards.skipped)} "
            f"already complete, in {result.seconds:.2f}s; run --finalize once every worker is done"
        )
    elif shards is not None and shards.mode == "finalize":
        output.info(
            f"verified {len(shards.verified)} shards, wrote {result.output}: {result.tensors} tensors, "
            f"{result.parameters:,} parameters ({source}) in {result.seconds:.2f}s"
        )
    else:
        output.info(
            f"wrote {result.output}: {result.tensors} tensors kept, {result.dropped} dropped, "
            f"{result.parameters:,} parameters, {format_bytes(result.bytes_written)} ({source}) in {result.seconds:.2f}s"
        )
