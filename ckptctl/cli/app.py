"""The ``ckptctl`` command: the Typer app, the list of commands, and ``main`` with its error mapping.

Startup must stay fast (shell completion runs this on every TAB): only the command being run (or completed, or
asked for help) is imported, and nothing here or in a command module imports fsspec, rich, numpy or torch at
import time; command bodies import the core when they run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import typer

from ckptctl import __version__


@dataclass(frozen=True)
class CommandEntry:
    """One command: where its code is, and the summary ``ckptctl --help`` lists without importing it."""

    module: str
    attribute: str
    summary: str
    group: bool = False


# The command list. A command's module is imported only when that command runs, its help is asked for, or its
# options are being completed: ``ckptctl --help`` and TAB on a command name import none of them, so start-up
# does not grow with the number of commands. tests/cli/test_help.py checks each summary against the command.
COMMANDS: dict[str, CommandEntry] = {
    "list": CommandEntry(
        "ckptctl.cli.commands.list_checkpoints",
        "list_checkpoints",
        "List the checkpoints of a run: step, status, size, age, layout, metrics and pointers.",
    ),
    "runs": CommandEntry(
        "ckptctl.cli.commands.runs",
        "runs",
        "Survey every run under a root: layouts, checkpoints by status, bytes, newest step, tiering and leftovers.",
    ),
    "example": CommandEntry(
        "ckptctl.cli.commands.example",
        "example",
        "Write a small example training run (HF Trainer layout) to try ckptctl on.",
    ),
    "prune": CommandEntry(
        "ckptctl.cli.commands.prune", "prune", "Delete the checkpoints of a run that no keep rule protects."
    ),
    "inspect": CommandEntry(
        "ckptctl.cli.commands.inspect",
        "inspect_checkpoint",
        "Show what a checkpoint holds: format, parameter totals, bytes by dtype, tensors, metadata, ZeRO / DCP / "
        "PEFT facts and whether it is whole.",
    ),
    "consolidate": CommandEntry(
        "ckptctl.cli.commands.consolidate",
        "consolidate",
        "Merge a sharded checkpoint (DeepSpeed ZeRO, PyTorch DCP/FSDP2) or a torch state dict into safetensors.",
    ),
    "extract-lora": CommandEntry(
        "ckptctl.cli.commands.extract_lora",
        "extract_lora",
        "Write a PEFT adapter (adapter_config.json + adapter_model.safetensors) out of a checkpoint or by SVD.",
    ),
    "advise": CommandEntry(
        "ckptctl.cli.commands.advise",
        "advise",
        "Advise how often a run should save: Young's and Daly's intervals, the time lost, the storage it takes.",
    ),
    "tier": CommandEntry(
        "ckptctl.cli.commands.tier",
        "tier_app",
        "Move checkpoints between local disk and an object store: push (and free local space), pull, status.",
        group=True,
    ),
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptctl {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Administer the checkpoints of large-model training runs."""


def _summary_only() -> None:
    """Never runs: stands in for a command that was not asked for, so its name and summary are listed."""


def requested_command(words: Sequence[str]) -> str | None:
    """The command named in ``words`` (the arguments after the program name), or None: the first word that is
    not an option. While completing, the word under the cursor is not counted (it may be a half-typed name)."""
    for word in words:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _completion_words() -> list[str] | None:
    """The words typed so far when the shell asks for completions (bash: COMP_WORDS up to COMP_CWORD; zsh and
    fish: _TYPER_COMPLETE_ARGS), without the program name and the word being completed; None when not
    completing."""
    if not os.environ.get("_CKPTCTL_COMPLETE"):
        return None
    if "COMP_WORDS" in os.environ:
        words = os.environ["COMP_WORDS"].split()
        try:
            cword = int(os.environ.get("COMP_CWORD", len(words)))
        except ValueError:
            cword = len(words)
        return words[1:cword]
    words = os.environ.get("_TYPER_COMPLETE_ARGS", "").split()
    return words[1:-1] if len(words) > 1 else []


def build_app(words: Sequence[str]) -> typer.Typer:
    """The Typer app for one invocation: the requested command for real, every other one by its summary."""
    app = typer.Typer(
        name="ckptctl",
        help="Administer the checkpoints of large-model training runs, on local disk or any object store.\n\n"
        "Exit codes: 0 ok, 1 internal error or disk full, 2 usage (an output overlapping an input included), 3 "
        "not found or nothing recognised, 4 refused by a safety rule, 5 partial, 6 locked, 7 metric source "
        "missing, 8 integrity error.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    wanted = requested_command(words)
    for name, entry in COMMANDS.items():
        if name != wanted:
            app.command(name, help=entry.summary, add_help_option=False)(_summary_only)
            continue
        target = getattr(importlib.import_module(entry.module), entry.attribute)
        if entry.group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a documented exit code."""
    debug = os.environ.get("CKPTCTL_DEBUG", "") not in ("", "0")
    words = _completion_words()
    app = build_app(sys.argv[1:] if words is None else words)
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
        from ckptctl.cli._errors import as_ckptctl_error
        from ckptctl.cli._output import current, write_error_line
        from ckptctl.storage.atomic import disk_error

        # A full disk, a quota, a file-size limit, a read-only or refused folder: one line, whichever command.
        error = (disk_error(exc) if isinstance(exc, OSError) else None) or as_ckptctl_error(exc)
        if error is None or debug:
            raise
        sink = current()
        if sink is not None:
            sys.exit(sink.error(error))
        write_error_line(error)
        sys.exit(int(error.exit_code))


def run() -> None:
    """The console script: ``main``, then the process ends without the interpreter's teardown.

    Freeing every module and botocore's loaded models costs ~0.4 CPU s per process here (a fifth of a
    ``tier status``). By then the commands' ``with`` blocks have closed every file, joined every pool and
    released every lock; what a normal exit still does is done here in its order (non-daemon threads joined,
    ``atexit`` handlers run, output flushed) before ``os._exit``. Tests call ``main``, which exits normally, and
    so does a profiled or traced process."""
    import atexit
    import contextlib
    import threading

    if sys.getprofile() is not None or sys.gettrace() is not None:
        main()  # cProfile, coverage, a debugger: they write their results in a normal teardown
        return
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone away, a closed stream: nothing to say
            stream.flush()
    os._exit(code)


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` ends a process with (a message is printed and gives 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


if __name__ == "__main__":
    run()
