"""``ckptctl example DIR``: write a small example run to try the other commands on."""

from __future__ import annotations

from typing import Annotated

import typer

from ckptctl.cli._options import JsonOpt


def example(
    target: Annotated[
        str, typer.Argument(metavar="DIR", help="A new (or empty) local folder to write the run into.")
    ],
    json_out: JsonOpt = False,
) -> None:
    """Write a small example training run (HF Trainer layout) to try ckptctl on.

    Five complete checkpoints with safetensors weights and eval_loss in trainer_state.json, and one
    half-written checkpoint, as a crash mid-save leaves it.

    Example:

      ckptctl example /tmp/ckptctl-example && ckptctl list /tmp/ckptctl-example
    """
    from ckptctl.cli._output import Output
    from ckptctl.example import write_example_run

    out = Output.start("example", json_mode=json_out)
    root = write_example_run(target)
    out.result({"path": str(root)})
    out.info(f"wrote an example run to {root}; try: ckptctl list {root}")
