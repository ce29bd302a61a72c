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
