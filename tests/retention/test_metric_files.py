"""Metric files are input from elsewhere: malformed ones are exit 7 naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptctl.errors import MetricSourceError
from ckptctl.retention.metrics import is_lightning_log, parse_metric_file
from tests.cli.test_prune import make_run
from tests.conftest import run_cli


def test_rows_with_inf_nan_or_fractional_steps_are_ignored() -> None:
    data = b"step,eval_loss\ninf,1.0\nnan,2.0\n1.5,3.0\n20,0.5\n1e400,4\n"
    assert parse_metric_file(data, "m.csv", "eval_loss", "step") == {20: 0.5}


def test_a_huge_field_is_a_metric_source_error() -> None:
    data = b"step,eval_loss\n" + b"1," + b"9" * (2 << 20) + b"\n"
    with pytest.raises(MetricSourceError, match="not CSV"):
        parse_metric_file(data, "m.csv", "eval_loss", "step")


def test_a_field_of_200_kib_is_read() -> None:
    """csv's own limit is 128 KiB; a long notes column must not stop the file being read."""
    data = b"step,eval_loss,notes\n10,0.5," + b"n" * (200 << 10) + b"\n"
    assert parse_metric_file(data, "m.csv", "eval_loss", "step") == {10: 0.5}


def test_deeply_nested_json_lines_are_a_metric_source_error() -> None:
    data = b'{"step": 10, "eval_loss": 0.5}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n"
    with pytest.raises(MetricSourceError, match="line 2"):
        parse_metric_file(data, "m.jsonl", "eval_loss", "step")


def test_lightning_logs_are_told_by_their_header() -> None:
    assert is_lightning_log(b"epoch,step,train_loss,val_loss\n1,4,0.9,\n", "v0/metrics.csv")
    assert not is_lightning_log(b"step,val_loss\n", "v0/metrics.csv")
    assert not is_lightning_log(b"epoch,step,val_loss\n", "v0/other.csv")


@pytest.mark.parametrize(
    "content",
    [
        'step,eval_loss\n10,0.5\n20,"0.4\n',  # an unterminated quote
        "step,eval_loss\n" + "1,2\n" * 3 + "x" * (2 << 20) + "\n",
        "\x00\x01\x02garbage",
    ],
    ids=["unterminated-quote", "huge-field", "binary"],
)
def test_prune_with_a_malformed_metric_file_is_exit_7_or_a_clean_plan(tmp_path: Path, content: str) -> None:
    run = make_run(tmp_path / "run", range(10, 40, 10))
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(content)
    result = run_cli(
        "prune",
        str(run),
        "--keep-best",
        "1",
        "--metric",
        "eval_loss",
        "--metric-file",
        str(metrics),
        "--dry-run",
    )
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 7), result.stderr
    if result.returncode == 7:
        assert result.stderr.startswith("error: ") and "metrics.csv" in result.stderr
