"""Bad arguments to ``prune`` are one ``error:`` line with exit 2, never a traceback (issues 15, 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptctl.example import write_example_run
from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep-last", "2", "--keep-steps", "abc"], "not a step: 'abc'"),
        (["--keep-last", "2", "--keep-steps", "10,-5"], "not a step: '-5'"),
        (["--keep-last", "2", "--max-delete-bytes", "9" * 400], "not a size"),
        (["--keep-last", "2", "--max-delete-bytes", "9" * 25 + "TB"], "not a plausible size"),
        (["--keep-last", "2", "--keep-within", "9" * 400 + "d"], "not a duration"),
        (["--keep-total", "3", "--keep-last", "2"], "--keep-total is a total"),
        (["--keep-total", "0"], "--keep-total must be at least 1"),
    ],
    ids=[
        "steps-abc",
        "steps-negative",
        "size-400-digits",
        "size-huge",
        "duration-400-digits",
        "total-and-last",
        "total-0",
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    run = write_example_run(tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    result = run_cli("prune", str(run), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines), result.stderr
    assert sorted(p.name for p in run.iterdir()) == before


def test_tier_push_words_policy_errors_with_its_own_flags(tmp_path: Path) -> None:
    """issue 16: tier push --keep-local-last 0 said "--keep-last must be at least 1" (prune's flag)."""
    run = write_example_run(tmp_path / "run")
    for args, message in (
        (["--keep-local-last", "0"], "--keep-local-last must be at least 1"),
        (["--keep-local-best", "1"], "--keep-local-best needs --metric"),
    ):
        result = run_cli("tier", "push", str(run), "--to", str(tmp_path / "remote"), *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {message}"), result.stderr
        assert "--keep-last" not in result.stderr and "--keep-best " not in result.stderr
    assert not (tmp_path / "remote").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tier", "push", "{run}", "--to", "{remote}", "--steps", ","], "no step in ','"),
        (["tier", "push", "{run}", "--to", "{remote}", "--steps", "1,x"], "not a step: 'x'"),
        (["tier", "pull", "{remote}", "{dest}", "--steps", "abc"], "not a step: 'abc'"),
        (
            ["tier", "push", "{run}", "--to", "{remote}", "--jobs", "0"],
            "'--jobs' / '-j': 0 is not in the range",
        ),
        (["inspect", "{run}", "--step", "-1"], "'--step': -1 is not in the range"),
        (["extract-lora", "{run}", "{dest}", "--bias", "some"], "'--bias': 'some' is not one of"),
        (["consolidate", "{run}", "{dest}", "--dtype", "int8"], "'--dtype': 'int8' is not one of"),
    ],
    ids=[
        "steps-empty",
        "steps-x",
        "pull-steps-abc",
        "jobs-0",
        "step-negative",
        "bias-choice",
        "dtype-choice",
    ],
)
def test_shared_options_are_checked_where_they_are_declared(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Step lists go through one parser; ranges and choices are declared on the option, so every command that
    takes --jobs, --step or --bias refuses the same bad value the same way (exit 2, nothing written)."""
    run = write_example_run(tmp_path / "run")
    places = {"run": str(run), "remote": str(tmp_path / "remote"), "dest": str(tmp_path / "dest")}
    result = run_cli(*(a.format(**places) for a in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "remote").exists() and not (tmp_path / "dest").exists()
