"""The one output sink of every command: human text (rich) or the versioned ``--json`` envelope.

Human output goes to stdout, messages and progress bars to stderr; neither has colour or bars when its stream
is not a terminal or with ``--quiet``. ``confirm()`` never hangs: without a terminal it refuses and names
``--yes``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ckptctl.errors import CkptctlError, ExitCode

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

RESULT_VERSION = 1
_current: Output | None = None
Cell = str | tuple[str, str]
"""A table cell: its text, or (text, style)."""


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as the strings "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def envelope(
    command: str, data: Any, *, status: str = "ok", exit_code: int = 0, errors: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """The ``--json`` result every command prints: pinned by tests/cli/test_json_contract.py."""
    return {
        "ckptctl_result_version": RESULT_VERSION,
        "command": command,
        "status": status,
        "exit_code": int(exit_code),
        "data": _json_safe(data),
        "errors": list(errors),
    }


class Output:
    """Where a command writes: create one per command invocation with ``Output.start``."""

    def __init__(
        self,
        command: str,
        *,
        json_mode: bool = False,
        quiet: bool = False,
        flags: Mapping[str, str] | None = None,
    ) -> None:
        self.command = command
        self.json_mode = json_mode
        self.quiet = quiet
        self.flags: Mapping[str, str] = flags or {}
        self._stdout: Console | None = None
        self._stderr: Console | None = None

    @classmethod
    def start(
        cls,
        command: str,
        *,
        json_mode: bool = False,
        quiet: bool = False,
        flags: Mapping[str, str] | None = None,
    ) -> Output:
        """Make the sink for this invocation and remember it, so ``main`` can report errors in the same mode.

        ``flags`` maps the core's setting names to this command's flags (``keep_last`` -> ``--keep-local-last``):
        every error the core words by setting (``CkptctlError.naming``) is shown with the flag the user typed."""
        global _current
        _current = cls(command, json_mode=json_mode, quiet=quiet, flags=flags)
        return _current

    # -- consoles -----------------------------------------------------------------------------------------
    @staticmethod
    def _console(stream: Any) -> Console:
        from rich.console import Console

        tty = stream.isatty()
        return Console(
            file=stream,
            no_color=not tty or "NO_COLOR" in os.environ,
            force_terminal=tty,
            width=None if tty else 200,
            highlight=False,
            soft_wrap=not tty,
        )

    @property
    def stdout(self) -> Console:
        if self._stdout is None:
            self._stdout = self._console(sys.stdout)
        return self._stdout

    @property
    def stderr(self) -> Console:
        if self._stderr is None:
            self._stderr = self._console(sys.stderr)
        return self._stderr

    # -- results ------------------------------------------------------------------------------------------
    def result(
        self, data: Any, *, status: str = "ok", exit_code: int = 0, errors: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Print the JSON envelope (``--json`` only; human renderers print their own text)."""
        if self.json_mode:
            sys.stdout.write(
                json.dumps(envelope(self.command, data, status=status, exit_code=exit_code, errors=errors))
            )
            sys.stdout.write("\n")
            sys.stdout.flush()

    def event(self, kind: str, **fields: Any) -> None:
        """One JSON Lines event (``--json`` streams such as prune's cron log)."""
        if self.json_mode:
            record = {
                "ckptctl_result_version": RESULT_VERSION,
                "command": self.command,
                "event": kind,
                **fields,
            }
            sys.stdout.write(json.dumps(_json_safe(record)) + "\n")
            sys.stdout.flush()

    def print(self, renderable: Any = "") -> None:
        """Human output to stdout (ignored under ``--json``)."""
        if not self.json_mode:
            self.stdout.print(renderable)

    def table(
        self, columns: Sequence[str], rows: Iterable[Sequence[Cell]], *, right: Sequence[str] = ()
    ) -> None:
        """One plain table on stdout (nothing under ``--json``). Every cell is rich ``Text``: names and reasons
        are data from a run or a store, so ``[bold]`` or ``x[/]`` in them is shown, never parsed as markup."""
        if self.json_mode:
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in columns:
            table.add_column(column, justify="right" if column in right else "left", overflow="fold")
        for row in rows:
            table.add_row(*(Text(c) if isinstance(c, str) else Text(c[0], style=c[1]) for c in row))
        self.print(table)

    def info(self, message: str) -> None:
        """A human message on stderr, silenced by ``--quiet`` and ``--json``."""
        if not self.quiet and not self.json_mode:
            self.stderr.print(message, markup=False)

    def warn(self, message: str) -> None:
        """A warning on stderr; shown with ``--quiet`` too (but not under ``--json``, where data carries it)."""
        if not self.json_mode:
            self.stderr.print(f"warning: {message}", markup=False)

    def error(
        self, exc: CkptctlError, data: Any = None, *, errors: Sequence[dict[str, Any]] | None = None
    ) -> int:
        """Report an error in this sink's mode and return the exit code: the one failure path of every command.

        Under ``--json`` the envelope carries ``data`` (what was done or found, if anything) and ``errors``
        (default: this error alone), with status ``partial`` for exit 5 (some of the work was done) and
        ``error`` otherwise; the ``error:`` line goes to stderr in both modes."""
        exc = exc.for_flags(self.flags)
        code = int(exc.exit_code)
        if self.json_mode:
            status = "partial" if exc.exit_code == ExitCode.PARTIAL else "error"
            shown = errors if errors is not None else [{"code": exc.code, "message": exc.message}]
            self.result(data, status=status, exit_code=code, errors=shown)
        write_error_line(exc)
        return code

    def fail(
        self, exc: CkptctlError, data: Any = None, *, errors: Sequence[dict[str, Any]] | None = None
    ) -> NoReturn:
        """``error()``, then exit with its code: for a command that has rendered a result and must still fail
        (inspect found a defect, pull --all pulled some). Human rendering comes first, the error line last."""
        raise SystemExit(self.error(exc, data, errors=errors))

    # -- interaction --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def progress(
        self, description: str, total: float | None, *, unit: str = "bytes"
    ) -> Iterator[Progress | None]:
        """A progress bar on stderr for long work; None when stderr is not a terminal, quiet or json."""
        if self.quiet or self.json_mode or not sys.stderr.isatty():
            yield None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
        columns.append(TimeRemainingColumn())
        with Progress(*columns, console=self.stderr, transient=True) as bar:
            bar.add_task(description, total=total)
            yield bar


def current() -> Output | None:
    return _current


def write_error_line(exc: CkptctlError) -> None:
    """The one line (plus an optional hint line) a user error prints on stderr."""
    sys.stderr.write(f"error: {exc.message}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")
    sys.stderr.flush()


__all__ = ["ExitCode", "Output", "current", "envelope", "write_error_line"]
