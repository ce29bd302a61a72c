"""``prune`` asks at a terminal before deleting, through the same confirmation as ``tier push``: the question on
stderr (``--json`` stdout stays JSON), "n" deletes nothing, "y" or ``--yes`` deletes, and without a terminal (cron)
it deletes without asking, as it always has. ``--each-run`` asks once for every run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from ckptctl.cli.app import build_app
from ckptctl.errors import RefusedError
from tests.cli.test_prune import make_run


def _prune(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    terminal: bool,
    answer: str,
    extra: tuple[str, ...] = (),
):
    run = make_run(tmp_path / "run", range(100, 500, 100))
    monkeypatch.setattr("ckptctl.cli._confirm.stdin_is_terminal", lambda: terminal)
    args = ["prune", str(run), "--keep-last", "1", "--settle", "0", *extra]
    result = CliRunner().invoke(build_app(args), args, input=answer)
    return result, sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))


def _refused(result: Result) -> bool:
    """Declined: the error ``main`` prints as one line with exit 4 (refused, nothing changed)."""
    error = result.exception
    return isinstance(error, RefusedError) and error.exit_code == 4 and "nothing was changed" in error.message


ALL = ["checkpoint-100", "checkpoint-200", "checkpoint-300", "checkpoint-400"]


def test_no_at_the_prompt_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, left = _prune(tmp_path, monkeypatch, terminal=True, answer="n\n")
    assert _refused(result)
    assert "delete 3 checkpoint(s)" in result.stderr and "[y/N]" in result.stderr
    assert left == ALL


def test_yes_at_the_prompt_deletes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, left = _prune(tmp_path, monkeypatch, terminal=True, answer="y\n")
    assert result.exit_code == 0, result.output
    assert left == ["checkpoint-400"]


def test_the_question_stays_off_json_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, left = _prune(tmp_path, monkeypatch, terminal=True, answer="y\n", extra=("--json",))
    assert result.exit_code == 0, result.output
    assert "[y/N]" in result.stderr and "[y/N]" not in result.stdout
    assert all(json.loads(line) for line in result.stdout.splitlines())  # JSON lines, nothing else
    assert left == ["checkpoint-400"]


def test_yes_flag_and_cron_delete_without_asking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, left = _prune(tmp_path / "a", monkeypatch, terminal=True, answer="n\n", extra=("--yes",))
    assert result.exit_code == 0 and "[y/N]" not in result.stderr and left == ["checkpoint-400"]
    result, left = _prune(tmp_path / "b", monkeypatch, terminal=False, answer="")
    assert result.exit_code == 0 and "[y/N]" not in result.stderr and left == ["checkpoint-400"]


def test_each_run_asks_once_for_all_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "runs"
    for name in ("a", "b"):
        make_run(root / name, range(100, 400, 100))
        (root / name / ".ckptctl.toml").write_text("keep-last = 1\n")
    monkeypatch.setattr("ckptctl.cli._confirm.stdin_is_terminal", lambda: True)
    args = ["prune", str(root), "--each-run", "--settle", "0"]
    result = CliRunner().invoke(build_app(args), args, input="n\n")
    assert _refused(result)
    assert result.stderr.count("[y/N]") == 1 and "in 2 run(s)" in result.stderr
    assert all(len(list((root / name).glob("checkpoint-*"))) == 3 for name in ("a", "b"))
