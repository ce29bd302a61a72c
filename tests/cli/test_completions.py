"""The shipped completion scripts are what the app generates (regenerate: python -m ckptctl.cli.completions)."""

from __future__ import annotations

from ckptctl.cli.completions import FILES, render
from tests.conftest import PROJECT_ROOT


def test_completion_files_match_the_app() -> None:
    for shell, name in FILES.items():
        shipped = (PROJECT_ROOT / "completions" / name).read_text()
        assert shipped == render(shell), f"completions/{name} is stale: run python -m ckptctl.cli.completions"
    assert (PROJECT_ROOT / "completions" / "_ckptctl").read_text().startswith("#compdef ckptctl")
