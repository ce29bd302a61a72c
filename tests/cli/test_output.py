"""The output sink every command shares: the envelope and stream routing."""

from __future__ import annotations

import json

import pytest

from ckptctl.cli._output import Output, envelope
from ckptctl.errors import NotFoundError


def test_json_mode_prints_only_the_envelope(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output("list", json_mode=True)
    out.print("a table")
    out.info("an info line")
    out.warn("a warning")
    out.result({"n": float("nan")})
    captured = capsys.readouterr()
    assert json.loads(captured.out) == envelope("list", {"n": "NaN"})
    assert captured.err == ""


def test_human_mode_routes_messages_to_stderr_and_quiet_silences_info(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Output("list").info("listed 3")
    Output("list", quiet=True).info("hidden")
    Output("list", quiet=True).warn("still shown")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        "listed 3" in captured.err and "hidden" not in captured.err and "warning: still shown" in captured.err
    )


def test_error_in_json_mode_is_an_error_envelope(capsys: pytest.CaptureFixture[str]) -> None:
    code = Output("list", json_mode=True).error(NotFoundError("no such file or folder: /x"))
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert code == 3 and payload["status"] == "error" and payload["errors"][0]["code"] == "not_found"
    assert captured.err == "error: no such file or folder: /x\n"


def test_progress_is_silent_without_a_terminal() -> None:
    with Output("tier").progress("push", 100) as bar:
        assert bar is None


def test_exit_5_is_a_partial_envelope(capsys: pytest.CaptureFixture[str]) -> None:
    """The README promises "status": "partial" for exit 5 (some of the work done; a re-run resumes)."""
    from ckptctl.errors import PartialFailureError

    code = Output("tier", json_mode=True).error(PartialFailureError("2 of 5 files failed"))
    payload = json.loads(capsys.readouterr().out)
    assert code == 5 and payload["status"] == "partial" and payload["exit_code"] == 5
