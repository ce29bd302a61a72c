"""The one confirmation step before a command deletes data: asked at a terminal, skipped by ``--yes``, and
never waiting where no one can answer (cron, a pipe): there the command proceeds, as it always has.

The question goes to stderr, so ``--json`` output on stdout stays one document.
"""

from __future__ import annotations

import sys

import typer

from ckptctl.errors import RefusedError


def stdin_is_terminal() -> bool:
    """Whether someone can answer (tests replace this: a CLI runner's stdin is never a terminal)."""
    return sys.stdin.isatty()


def confirm_deletion(question: str, *, yes: bool) -> None:
    """Ask ``question`` before deleting; RefusedError (exit 4, nothing changed) unless the answer is y/yes.

    Returns at once with ``--yes`` or without a terminal on stdin, so unattended runs behave as before.
    """
    if yes or not stdin_is_terminal():
        return
    typer.echo(f"{question} [y/N] ", err=True, nl=False)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise RefusedError("not confirmed; nothing was changed")
