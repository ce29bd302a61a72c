"""``ckptctl extract-lora``: a loadable PEFT adapter out of a checkpoint (exact) or a fine-tuned model (SVD)."""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated

import typer

from ckptctl.cli._options import ForceOpt, JsonOpt, QuietOpt, StorageOpt


class LoraBias(str, Enum):
    """PEFT ``LoraConfig.bias``: which biases training updated (and the adapter therefore carries)."""

    none = "none"
    lora_only = "lora_only"
    all = "all"


def extract_lora(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="[SRC] OUT_DIR",
            help="SRC: a state dict (.safetensors/.pt/.bin), a DeepSpeed save or an HF checkpoint-N (local or URL); "
            "OUT_DIR: the local adapter folder to create. With --base/--tuned, only OUT_DIR.",
            show_default=False,
        ),
    ],
    adapter_name: Annotated[
        str | None,
        typer.Option(
            "--adapter-name", help="Which adapter of the checkpoint (default: 'default', or the only one)."
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha", help="lora_alpha used in training (needed unless an adapter_config.json is found)."
        ),
    ] = None,
    rslora: Annotated[
        bool | None, typer.Option("--rslora/--no-rslora", help="Training used rank-stabilised scaling.")
    ] = None,
    bias: Annotated[
        LoraBias | None, typer.Option("--bias", help="The LoraConfig bias mode of training.")
    ] = None,
    task_type: Annotated[str | None, typer.Option("--task-type", help="e.g. CAUSAL_LM.")] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="base_model_name_or_path to write in the config.")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", metavar="BASE", help="SVD mode: the base model (file, folder or URL)."),
    ] = None,
    tuned: Annotated[
        str | None, typer.Option("--tuned", metavar="TUNED", help="SVD mode: the fine-tuned model.")
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", metavar="R", help="SVD mode: the adapter's rank.")
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            "--energy",
            metavar="F",
            help="SVD mode: per-module rank keeping this fraction of ‖ΔW‖ (Frobenius), e.g. 0.9; ranks go to rank_pattern.",
        ),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Write a PEFT adapter (adapter_config.json + adapter_model.safetensors) out of a checkpoint or by SVD.

    From a checkpoint that holds LoRA tensors (a full state dict, DDP "module." or torch.compile "_orig_mod."
    prefixed, DeepSpeed ZeRO shards, an HF checkpoint-N): the adapter's tensors are read alone (never the base
    weights) and written bit-identical to PEFT's save_pretrained. The config takes r, rank_pattern,
    target_modules, DoRA, modules_to_save and fan_in_fan_out from the weights; lora_alpha, rslora, bias mode,
    task type and base model from an adapter_config.json beside or above SRC, else from the flags. Without a
    known alpha it stops: a guessed alpha silently changes the model's outputs.

    From a fine-tuned model and its base (--base/--tuned, needs torch): ΔW per module by randomized SVD, at
    --rank R or a per-module rank by --energy F; reports each module's relative error.

    Exit codes: 0 done, 1 disk full, 2 usage (missing alpha, ambiguous adapter, shapes differ, OUT_DIR a URL,
    OUT_DIR is, contains or lies inside SRC), 3 SRC missing or holds no LoRA tensors, 4 OUT_DIR exists, 8
    truncated or corrupt input.

    Examples:

      ckptctl extract-lora /data/run42/checkpoint-900 adapter/ --alpha 16

      ckptctl extract-lora s3://bucket/run42/global_step900 adapter/ --adapter-name default

      ckptctl extract-lora --base base-model/ --tuned finetuned/ adapter/ --rank 64
    """
    from ckptctl.cli._output import Output
    from ckptctl.errors import UsageError
    from ckptctl.humanize import format_bytes
    from ckptctl.storage.location import Location, parse_storage_options

    out = Output.start("extract-lora", json_mode=json_out, quiet=quiet)
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        # typer's float accepts "nan" and "inf"; PEFT would scale every update by them.
        raise UsageError(
            f"--alpha must be a positive finite number (the lora_alpha of training), got {alpha}"
        )
    options = parse_storage_options(storage_option or [])
    svd = base is not None or tuned is not None
    if svd:
        if base is None or tuned is None:
            raise UsageError("SVD mode needs both --base and --tuned")
        if len(paths) != 1:
            raise UsageError("with --base/--tuned give only OUT_DIR")
        from ckptctl.convert.lora import checked_out_dir
        from ckptctl.convert.lora_svd import extract_by_svd

        def on_module(report: object) -> None:
            if not out.json_mode and not quiet:
                out.info(
                    "{module} ({kind}): rank {rank}, relative error {relative_error:.3g}".format(
                        **vars(report)
                    )
                )

        base_location, tuned_location = Location.from_url(base, options), Location.from_url(tuned, options)
        checked_out_dir(paths[0], force=force, inputs={"--base": base_location, "--tuned": tuned_location})
        result = extract_by_svd(
            base_location,
            tuned_location,
            paths[0],
            rank=rank,
            energy=energy,
            task_type=task_type,
            base_model=base_model,
            force=force,
            on_module=on_module,
        )
        worst = max((m.relative_error for m in result.modules), default=0.0)
        data = {
            "mode": "svd",
            "out_dir": result.write.out_dir,
            "modules": [vars(m) for m in result.modules],
            "modules_to_save": result.saved_modules,
            "adapter_bytes": result.adapter_bytes,
            "model_bytes": result.model_bytes,
            "max_relative_error": worst,
            "config": result.write.config,
        }
        out.result(data)
        for note in result.notes:
            out.info(note)
        out.info(
            f"wrote {result.write.out_dir}: {len(result.modules)} LoRA module(s), {len(result.saved_modules)} saved "
            f"whole; {format_bytes(result.adapter_bytes)} vs {format_bytes(result.model_bytes)} for the model; "
            f"worst relative error {worst:.3g}"
        )
        return
    if rank is not None or energy is not None:
        raise UsageError("--rank and --energy go with --base/--tuned")
    if len(paths) != 2:
        raise UsageError("give SRC and OUT_DIR (or --base BASE --tuned TUNED OUT_DIR)")
    from ckptctl.convert.lora import extract_from_checkpoint

    written = extract_from_checkpoint(
        Location.from_url(paths[0], options),
        paths[1],
        adapter_name=adapter_name,
        overrides={
            "lora_alpha": alpha,
            "use_rslora": rslora,
            "bias": bias.value if bias is not None else None,
            "task_type": task_type,
            "base_model_name_or_path": base_model,
        },
        force=force,
    )
    out.result(
        {
            "mode": "checkpoint",
            "out_dir": written.out_dir,
            "tensors": written.tensors,
            "adapter_bytes": written.bytes,
            "seconds": round(written.seconds, 3),
            "config": written.config,
        }
    )
    out.info(f"wrote {written.out_dir}: {written.tensors} tensors, {format_bytes(written.bytes)}")
