"""Generate the shell completion scripts shipped in ``completions/`` (and installed by the wheel).

Run ``python -m ckptctl.cli.completions`` after changing commands or options; a test fails when the
committed files drift from what the app generates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FILES = {"bash": "ckptctl.bash", "zsh": "_ckptctl", "fish": "ckptctl.fish"}


def render(shell: str) -> str:
    """The completion script for ``shell``, as typer generates it for the installed ``ckptctl``."""
    env = dict(os.environ, _CKPTCTL_COMPLETE=f"source_{shell}")
    script = subprocess.run(
        [sys.executable, "-m", "ckptctl"], env=env, capture_output=True, text=True, check=True
    ).stdout
    # zsh needs `#compdef` on the first line; typer starts its scripts with a blank line.
    return script.lstrip("\n")


def write_all(folder: Path) -> None:
    for shell, name in FILES.items():
        (folder / name).write_text(render(shell))


if __name__ == "__main__":
    write_all(Path(__file__).resolve().parents[2] / "completions")
