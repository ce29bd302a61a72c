"""The ``ckptctl`` command: the Typer app, the list of commands, and ``main`` with its error mapping.

Startup must stay fast (shell completion runs this on every TAB): nothing here or in a command module imports
fsspec, rich, numpy or torch at import time; command bodies import the core when they run.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ckptctl import __version__
from ckptctl.cli.commands.consolidate import consolidate
from ckptctl.cli.commands.example import example
from ckptctl.cli.commands.extract_lora import extract_lora
from ckptctl.cli.commands.inspect import inspect_checkpoint
from ckptctl.cli.commands.list_checkpoints import list_checkpoints
from ckptctl.cli.commands.prune import prune
from ckptctl.cli.commands.tier import tier_app

app = typer.Typer(
    name="ckptctl",
    help="Administer the checkpoints of large-model training runs, on local disk or any object store.\n\n"
    "Exit codes: 0 ok, 1 internal error, 2 usage, 3 not found or nothing recognised, 4 refused by a safety "
    "rule, 5 partial, 6 locked, 7 metric source missing, 8 integrity error.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Administer the checkpoints of large-model training runs."""


app.command("list")(list_checkpoints)
app.command("example")(example)
app.command("prune")(prune)
app.command("inspect")(inspect_checkpoint)
app.command("consolidate")(consolidate)
app.command("extract-lora")(extract_lora)
app.add_typer(tier_app, name="tier")


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a documented exit code."""
    from ckptctl.cli._errors import as_ckptctl_error
    from ckptctl.cli._output import current, write_error_line

    debug = os.environ.get("CKPTCTL_DEBUG", "") not in ("", "0")
    try:
        app(prog_name="ckptctl")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`ckptctl list | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as exc:
        error = as_ckptctl_error(exc)
        if error is None or debug:
            raise
        sink = current()
        if sink is not None:
            sys.exit(sink.error(error))
        write_error_line(error)
        sys.exit(int(error.exit_code))


if __name__ == "__main__":
    main()
