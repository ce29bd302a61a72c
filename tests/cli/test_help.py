"""Help that teaches, and a start fast enough for shell completion (which runs ckptctl on every TAB)."""

from __future__ import annotations

import re
import subprocess
import sys

from ckptctl import __version__
from tests.conftest import run_cli

HEAVY = ("torch", "fsspec", "s3fs", "gcsfs", "numpy", "rich", "safetensors", "pydantic")


def _commands(*group: str) -> list[str]:
    text = run_cli(*group, "--help").stdout
    section = text.split("Commands:", 1)[1]
    return re.findall(r"^  (\S+)", section, re.MULTILINE)


def test_every_command_has_help_with_an_example() -> None:
    commands = _commands()
    assert "list" in commands and "example" in commands and "tier" in commands
    for command in commands:
        result = run_cli(command, "--help")
        assert result.returncode == 0, command
        if "Commands:" in result.stdout:  # a group (tier): every subcommand teaches
            subcommands = _commands(command)
            assert subcommands, command
            for sub in subcommands:
                inner = run_cli(command, sub, "--help")
                assert inner.returncode == 0 and "Example" in inner.stdout, f"{command} {sub} --help"
            continue
        assert "Example" in result.stdout, f"{command} --help has no example"


def test_top_level_help_documents_exit_codes() -> None:
    text = run_cli("--help").stdout
    for code in ("0 ok", "2 usage", "3 not found", "4 refused", "5 partial", "6 locked", "8 integrity"):
        assert code in " ".join(text.split()), code


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ckptctl {__version__}"


def test_usage_error_exits_2() -> None:
    result = run_cli("list", "--no-such-option")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def _modules_after(*argv: str) -> set[str]:
    code = (
        "import sys\n"
        f"sys.argv = ['ckptctl', *{list(argv)!r}]\n"
        "from ckptctl.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('\\nLOADED', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(eval(out.rsplit("LOADED", 1)[1]))


def test_help_and_completion_import_nothing_heavy() -> None:
    assert _modules_after("--help") == set()
    assert _modules_after("list", "--help") == set()


def test_each_listed_summary_is_the_commands_own_first_paragraph() -> None:
    """``ckptctl --help`` lists commands without importing them; the summaries must not drift from them."""
    import importlib
    import inspect

    from ckptctl.cli.app import COMMANDS

    for name, entry in COMMANDS.items():
        target = getattr(importlib.import_module(entry.module), entry.attribute)
        doc = target.info.help if entry.group else inspect.getdoc(target)
        assert " ".join(doc.split("\n\n")[0].split()) == entry.summary, name


def _command_modules_after(*argv: str, env: dict[str, str] | None = None) -> set[str]:
    code = (
        "import sys\n"
        f"sys.argv = ['ckptctl', *{list(argv)!r}]\n"
        "from ckptctl.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('\\nLOADED', sorted(m for m in sys.modules if m.startswith('ckptctl.cli.commands.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return set(eval(result.stdout.rsplit("LOADED", 1)[1]))


def test_only_the_command_asked_for_is_imported() -> None:
    import os

    assert _command_modules_after("--help") == set()
    assert _command_modules_after("list", "--help") == {"ckptctl.cli.commands.list_checkpoints"}
    tab = dict(os.environ, _CKPTCTL_COMPLETE="complete_bash", COMP_WORDS="ckptctl li", COMP_CWORD="1")
    assert _command_modules_after(env=tab) == set()
    tab_options = dict(tab, COMP_WORDS="ckptctl prune --keep", COMP_CWORD="2")
    assert _command_modules_after(env=tab_options) == {"ckptctl.cli.commands.prune"}
