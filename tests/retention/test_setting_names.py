"""The core names settings by concept; each command words them with the flags it has (a policy file will with
its keys). A message built from user text (paths, metric names) must survive the wording, braces and all."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptctl.errors import MetricSourceError, RefusedError, UsageError
from ckptctl.retention.plan import plan_prune
from ckptctl.retention.policy import Policy, PolicyError
from ckptctl.storage.location import Location
from tests.cli.test_prune import make_run
from tests.conftest import run_cli


def test_core_refusals_name_the_setting_not_a_flag(tmp_path: Path) -> None:
    """plan_prune is called by prune, by tier push's freeing and (next) by policy files: none of them may be
    told about a flag it does not have."""
    run = Location.from_url(str(make_run(tmp_path / "run", range(100, 600, 100))))
    with pytest.raises(RefusedError) as refused:
        plan_prune(run, Policy.build(keep_last=1), settle_seconds=0, max_delete=2)
    assert refused.value.message == "the plan deletes 4 checkpoints, more than max-delete 2"
    worded = refused.value.for_flags({"max_delete": "--max-delete"})
    assert isinstance(worded, RefusedError) and worded.message.endswith("more than --max-delete 2")
    with pytest.raises(PolicyError) as bad:
        Policy.build(keep_last=0)
    assert "--" not in bad.value.message and bad.value.message.startswith("keep-last must be at least 1")
    assert bad.value.for_flags({"keep_last": "--keep-local-last"}).message.startswith(
        "--keep-local-last must be at least 1"
    )


def test_user_text_with_braces_is_shown_as_typed(tmp_path: Path) -> None:
    """A metric named ``acc{top1}`` or a run folder called ``{exp}`` is data: the wording never formats it."""
    with pytest.raises(PolicyError) as bad:
        Policy.build(keep_best=1, metric="acc{top1}")
    assert "acc{top1}" in bad.value.for_flags({"metric": "--metric"}).message
    run = Location.from_url(str(make_run(tmp_path / "{exp}", range(100, 300, 100))))
    with pytest.raises(MetricSourceError) as missing:
        plan_prune(run, Policy.build(keep_best=1, metric="eval_loss"), settle_seconds=0)
    worded = missing.value.for_flags({"metric_file": "--metric-file", "step_key": "--step-key"})
    assert (
        "{exp}" in worded.message
        and worded.hint == "pass --metric-file PATH (CSV or JSON Lines) with --step-key"
    )


def test_an_error_without_settings_is_left_as_it_is() -> None:
    plain = UsageError("a {literal} message")
    assert plain.for_flags({"literal": "--x"}) is plain


def test_tier_push_words_the_freeing_rules_with_its_own_flags(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 300, 100))
    result = run_cli(
        "tier",
        "push",
        str(run),
        "--to",
        str(tmp_path / "remote"),
        "--keep-local-best",
        "1",
        "--metric",
        "acc",
    )
    assert result.returncode == 2, result.stderr
    assert "error: --metric acc: say whether higher or lower is better" in result.stderr
    assert "--keep-best" not in result.stderr and "--keep-last" not in result.stderr
