"""The ``--json`` envelope is a contract with scripts: its keys and types are pinned here."""

from __future__ import annotations

import json
from pathlib import Path

from ckptctl.example import write_example_run
from tests.conftest import run_cli

ENVELOPE_KEYS = ["ckptctl_result_version", "command", "status", "exit_code", "data", "errors"]
UNIT_KEYS = {
    "path",
    "name",
    "step",
    "epoch",
    "layout",
    "kind",
    "status",
    "reason",
    "bytes",
    "files",
    "newest_mtime",
    "age_seconds",
    "pointers",
    "metrics",
    "metric_source",
    "run",
    "step_kind",
    "counted",
    "being_deleted",
}


def test_success_envelope(tmp_path: Path) -> None:
    run = write_example_run(tmp_path / "run")
    payload = json.loads(run_cli("list", str(run), "--json").stdout)
    assert list(payload) == ENVELOPE_KEYS
    assert payload["ckptctl_result_version"] == 1
    assert (payload["command"], payload["status"], payload["exit_code"], payload["errors"]) == (
        "list",
        "ok",
        0,
        [],
    )
    assert set(payload["data"]) == {"run", "runs", "units", "pointers", "warnings", "summary", "policy"}
    assert set(payload["data"]["units"][0]) == UNIT_KEYS


def test_error_envelope(tmp_path: Path) -> None:
    result = run_cli("list", str(tmp_path / "missing"), "--json")
    assert result.returncode == 3
    payload = json.loads(result.stdout)
    assert list(payload) == ENVELOPE_KEYS
    assert payload["status"] == "error" and payload["exit_code"] == 3 and payload["data"] is None
    assert payload["errors"] == [
        {"code": "not_found", "message": f"no such file or folder: {tmp_path / 'missing'}"}
    ]


def test_non_finite_metrics_stay_valid_json(tmp_path: Path) -> None:
    ckpts = tmp_path / "run"
    ckpts.mkdir()
    (ckpts / "epoch=0-step=10-val_loss=nan.ckpt").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    result = run_cli("list", str(ckpts), "--json", "--settle", "0")
    payload = json.loads(result.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert payload["data"]["units"][0]["metrics"] == {"val_loss": "NaN"}
