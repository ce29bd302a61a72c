"""``tier push --keep-local-*`` asks at a terminal before freeing local copies, as prune does: "n" keeps them
(the uploads stand), "y" or --yes frees them, and without a terminal (cron) it frees without asking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptctl.cli.app import build_app
from ckptctl.tiering.manifest import MANIFEST_DIR
from tests.tiering.test_tier import make_run

QUESTION = "free 2 local checkpoint(s)"


def _push(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, terminal: bool, answer: str, extra=()):
    run = make_run(tmp_path / "run", steps=(100, 200, 300), size=10_000, incomplete=None)
    remote = tmp_path / "remote"
    monkeypatch.setattr("ckptctl.cli._confirm.stdin_is_terminal", lambda: terminal)
    args = ["tier", "push", str(run), "--to", str(remote), "--settle", "0", "--keep-local-last", "1", *extra]
    result = CliRunner().invoke(build_app(args), args, input=answer)
    manifests = sorted(p.name for p in (remote / MANIFEST_DIR).iterdir())
    local = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    return result, manifests, local


ALL = ["checkpoint-100.json", "checkpoint-200.json", "checkpoint-300.json"]


def test_no_at_the_prompt_keeps_the_local_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, manifests, local = _push(tmp_path, monkeypatch, terminal=True, answer="n\n")
    assert result.exit_code == 0, result.output
    assert QUESTION in result.stderr
    assert "freeing them was not confirmed" in result.stderr
    assert manifests == ALL  # the uploads stand
    assert local == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]


def test_yes_at_the_prompt_frees_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, manifests, local = _push(tmp_path, monkeypatch, terminal=True, answer="y\n")
    assert result.exit_code == 0, result.output
    assert QUESTION in result.stderr
    assert manifests == ALL and local == ["checkpoint-300"]


def test_yes_flag_frees_without_asking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, _, local = _push(tmp_path, monkeypatch, terminal=True, answer="n\n", extra=["--yes", "--json"])
    assert result.exit_code == 0, result.output
    assert QUESTION not in result.stderr and local == ["checkpoint-300"]
    summary = [json.loads(line) for line in result.stdout.splitlines() if '"summary"' in line][-1]
    assert summary["freed"] == 2  # and --json stdout is still only JSON lines


def test_without_a_terminal_it_frees_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, _, local = _push(tmp_path, monkeypatch, terminal=False, answer="")
    assert result.exit_code == 0, result.output
    assert QUESTION not in result.stderr and local == ["checkpoint-300"]
