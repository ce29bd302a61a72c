"""``.ckptctl.toml`` policy files and ``prune ROOT --each-run``: the cron line for a whole cluster (issue 19).

Rules live beside the runs; the nearest file wins key by key, a flag over every file; a broken file stops its
run (exit 2 for that run, named with file and line), never reads as "no rules"; one run's failure never stops
the others; a ``kill -9`` leaves every run in a state the next run finishes.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from ckptctl.retention.each_run import PruneSettings, prune_each_run, rules_for_run
from ckptctl.retention.policy_files import PolicyFileError, PolicyFinder, Setting, parse_policy_file
from ckptctl.storage import Location
from ckptctl.storage.lock import run_lock
from tests.catalog.runs import age_tree, deepspeed, lightning
from tests.cli.test_prune import digest_tree, make_run
from tests.conftest import Backend, run_cli


def steps_left(run: Path) -> list[int]:
    return sorted(u.step for u in scan_run(Location.from_url(str(run)), settle_seconds=0).units if u.step)


# -- parsing ---------------------------------------------------------------------------------------------------


def test_a_file_is_read_with_its_scopes_and_every_rule_knows_its_line() -> None:
    text = b'keep-last = 2\nkeep-within = "2d"\n\n[runs."llama-*"]\nkeep-last = 5\nmax-delete-bytes = "1TB"\n'
    policy = parse_policy_file(text, "/r/.ckptctl.toml")
    assert policy.rules_for("gpt-1") == {
        "keep-last": Setting(2, "/r/.ckptctl.toml:1"),
        "keep-within": Setting(2 * 86400.0, "/r/.ckptctl.toml:2"),
    }
    scoped = policy.rules_for("llama-7b")
    assert scoped["keep-last"] == Setting(5, "/r/.ckptctl.toml:5")
    assert scoped["max-delete-bytes"] == Setting(10**12, "/r/.ckptctl.toml:6")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"keep-last = 2\nkeep-lsat = 3\n", "/r/.ckptctl.toml:2: unknown key 'keep-lsat'"),
        (b'keep-last = "3"\n', "/r/.ckptctl.toml:1: keep-last must be a whole number, not '3'"),
        (b"keep-last = true\n", "/r/.ckptctl.toml:1: keep-last must be a whole number"),
        (b'\n\nkeep-within = "soon"\n', "/r/.ckptctl.toml:3: keep-within: not a duration: 'soon'"),
        (b"keep-last = 2\nkeep-last = 3\n", "/r/.ckptctl.toml:2: not valid TOML"),
        (b"keep-last = [\n", "/r/.ckptctl.toml:1: not valid TOML"),
        (b'[runs."a*"]\nkeep-bst = 1\n', "/r/.ckptctl.toml:2: unknown key 'keep-bst' in [runs.'a*']"),
        (b"runs = 3\n", "/r/.ckptctl.toml:1: 'runs' holds tables"),
        (b"\xff\xfe", "/r/.ckptctl.toml: not UTF-8 text"),
    ],
    ids=[
        "unknown-key",
        "string-for-int",
        "bool-for-int",
        "bad-duration",
        "duplicate",
        "syntax",
        "scoped-key",
        "runs-not-table",
        "not-utf8",
    ],
)
def test_a_broken_file_is_an_error_naming_file_and_line(text: bytes, message: str) -> None:
    with pytest.raises(PolicyFileError) as broken:
        parse_policy_file(text, "/r/.ckptctl.toml")
    assert broken.value.message.startswith(message), broken.value.message
    assert broken.value.exit_code == 2


def test_nearest_file_wins_key_by_key_and_flags_win_over_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = make_run(root / "team" / "run-a", range(100, 400, 100))
    (root / ".ckptctl.toml").write_text(
        'keep-last = 2\nkeep-within = "1d"\n[runs."team/run-*"]\nmax-delete = 9\n'
    )
    (run / ".ckptctl.toml").write_text("keep-last = 1\n")
    location, top = Location.from_url(str(run)), Location.from_url(str(root))
    rules = rules_for_run(location, PruneSettings(), PolicyFinder(), top)
    assert {k: (s.value, s.source.rsplit("/", 1)[-1]) for k, s in rules.settings.items()} == {
        "keep-last": (1, ".ckptctl.toml:1"),
        "keep-within": (86400.0, ".ckptctl.toml:2"),
        "max-delete": (9, ".ckptctl.toml:4"),
    }
    assert rules.settings["keep-last"].source == f"{run}/.ckptctl.toml:1"
    flagged = rules_for_run(
        location, PruneSettings(flags={"keep-last": Setting(7, "--keep-last")}), PolicyFinder(), top
    )
    assert flagged.settings["keep-last"] == Setting(7, "--keep-last")
    assert flagged.settings["keep-within"].source == f"{root}/.ckptctl.toml:2"


# -- prune RUN ---------------------------------------------------------------------------------------------------


def test_prune_run_follows_the_file_and_says_where_each_rule_came_from(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 600, 100))
    (tmp_path / ".ckptctl.toml").write_text("keep-last = 2\n")
    result = run_cli("prune", str(run), "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    rules = next(e for e in events if e["event"] == "rules")["rules"]
    assert rules == [{"setting": "keep-last", "value": 2, "from": f"{tmp_path}/.ckptctl.toml:1"}]
    assert steps_left(run) == [400, 500]
    # A flag wins over the file, and the human output names the file a rule came from.
    human = run_cli("prune", str(run), "--keep-last", "1", "--max-delete", "0", "--dry-run")
    assert human.returncode == 4 and "more than --max-delete 0" in human.stderr, human.stderr


def test_a_rule_from_a_file_is_named_by_key_and_line_when_it_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 600, 100))
    (run / ".ckptctl.toml").write_text("keep-last = 1\nmax-delete = 2\n")
    result = run_cli("prune", str(run))
    assert result.returncode == 4, result.stderr
    assert f"more than max-delete ({run}/.ckptctl.toml:2) 2" in result.stderr
    (run / ".ckptctl.toml").write_text("keep-last = 0\n")
    zero = run_cli("prune", str(run))
    assert (
        zero.returncode == 2 and f"error: keep-last ({run}/.ckptctl.toml:1) must be at least 1" in zero.stderr
    )
    assert steps_left(run) == [100, 200, 300, 400, 500]


def test_a_broken_file_stops_the_run_instead_of_reading_as_no_rules(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 600, 100))
    (run / ".ckptctl.toml").write_text("keep-last = 1\nkeep-best = 'two'\n")
    result = run_cli("prune", str(run), "--keep-last", "3")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {run}/.ckptctl.toml:2: keep-best")
    assert steps_left(run) == [100, 200, 300, 400, 500]


# -- prune ROOT --each-run ----------------------------------------------------------------------------------------


def make_root(root: Path) -> Path:
    """Runs of several layouts, one nesting its own runs, policy files at two levels, one of them broken."""
    make_run(
        root / "team" / "hf-a", range(100, 700, 100)
    )  # root file: keep-last 2, scope team/*: keep-last 3
    make_run(root / "team" / "hf-b", range(100, 500, 100))  # its own file: keep-last 1
    deepspeed(root / "ds")  # global_step 100..300: root keep-last 2
    lightning(root / "lit")  # Lightning: its own file is broken
    make_run(root / "nested" / "version_0", range(100, 400, 100))
    make_run(root / "nested" / "version_1", range(100, 400, 100))
    make_run(root / "free" / "run", range(100, 400, 100))  # scoped out: no rule at all
    (root / ".ckptctl.toml").write_text(
        'keep-last = 2\n[runs."team/*"]\nkeep-last = 3\n[runs."free/*"]\nkeep-last = 1\n'
    )
    (root / "team" / "hf-b" / ".ckptctl.toml").write_text("keep-last = 1\n")
    (root / "lit" / ".ckptctl.toml").write_text("keep-last = \n")
    age_tree(root)
    return root


def test_each_run_prunes_every_run_by_its_own_rules_and_reports_the_broken_one(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    (root / "free" / "run" / ".ckptctl.toml").write_text("max-delete = 5\n")  # a setting, but no keep rule
    # The root-level scope gives free/* keep-last 1: the run's own file adds only a limit, the scope still applies.
    lit = "lit/lightning_logs/version_0/checkpoints"  # the run is where the checkpoints are; lit/ holds its file
    before, before_lit = digest_tree(root), digest_tree(root / "lit")
    dry = run_cli("prune", str(root), "--each-run", "--dry-run", "--json")
    assert dry.returncode == 5, dry.stderr
    assert digest_tree(root) == before  # a dry run changes nothing
    runs = {e["run"]: e for e in map(json.loads, dry.stdout.splitlines()) if e.get("event") == "run"}
    assert {r: e["action"] for r, e in runs.items()} == {
        "team/hf-a": "planned",
        "team/hf-b": "planned",
        "ds": "planned",
        lit: "failed",
        "nested/version_0": "planned",
        "nested/version_1": "planned",
        "free/run": "planned",
    }
    assert runs[lit]["error"]["code"] == "policy_file"
    assert runs[lit]["error"]["message"].startswith(f"{root}/lit/.ckptctl.toml:1: not valid TOML")
    assert len(runs["team/hf-a"]["to_delete"]) == 3 and len(runs["team/hf-b"]["to_delete"]) == 3

    done = run_cli("prune", str(root), "--each-run")
    assert done.returncode == 5, done.stderr
    assert f"error: 1 of 7 run(s) failed ({lit};" in done.stderr
    assert steps_left(root / "team" / "hf-a") == [400, 500, 600]
    assert steps_left(root / "team" / "hf-b") == [400]
    assert steps_left(root / "nested" / "version_0") == [200, 300]
    assert steps_left(root / "free" / "run") == [300]
    assert digest_tree(root / "lit") == before_lit


def test_a_run_with_no_rule_is_left_alone_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_run(root / "a", range(100, 400, 100))
    make_run(root / "b", range(100, 400, 100))
    (root / "a" / ".ckptctl.toml").write_text("keep-last = 1\n")
    age_tree(root)
    result = run_cli("prune", str(root), "--each-run", "--json")
    assert result.returncode == 0, result.stderr
    runs = {
        e["run"]: e["action"] for e in map(json.loads, result.stdout.splitlines()) if e.get("event") == "run"
    }
    assert runs == {"a": "pruned", "b": "no-policy"}
    assert steps_left(root / "a") == [300] and steps_left(root / "b") == [100, 200, 300]


def test_a_locked_run_is_reported_and_the_others_still_pruned(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("a", "b", "c"):
        make_run(root / name, range(100, 400, 100))
    age_tree(root)
    with run_lock(Location.from_url(str(root / "b"))):
        result = run_cli("prune", str(root), "--each-run", "--keep-last", "1", "--json")
    assert result.returncode == 5, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["status"] == "partial" and summary["errors"] == [
        {"run": "b", "code": "locked", "message": summary["errors"][0]["message"]}
    ]
    assert steps_left(root / "a") == [300] and steps_left(root / "c") == [300]
    assert steps_left(root / "b") == [100, 200, 300]


def test_missing_or_empty_root_is_exit_3(tmp_path: Path) -> None:
    missing = run_cli("prune", str(tmp_path / "nope"), "--each-run", "--keep-last", "1")
    assert missing.returncode == 3 and missing.stderr.startswith("error:")
    (tmp_path / "empty").mkdir()
    empty = run_cli("prune", str(tmp_path / "empty"), "--each-run", "--keep-last", "1")
    assert empty.returncode == 3 and "no run under" in empty.stderr


def test_each_run_on_every_backend(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_run(src / "a", range(100, 500, 100))
    make_run(src / "b", range(100, 300, 100))
    (src / ".ckptctl.toml").write_text('keep-last = 1\nsettle = "0"\n[runs."b"]\nkeep-last = 2\n')
    backend.put_tree(src, "root")
    root = backend.location("root")
    result = prune_each_run(root, PruneSettings(check_time_order=False), dry_run=False)
    assert {o.run: o.action for o in result.outcomes} == {"a": "pruned", "b": "nothing-to-delete"}
    a = scan_run(root.child("a"), settle_seconds=0)
    assert [u.step for u in a.units] == [400]
    assert result.outcomes[0].rules is not None
    assert result.outcomes[0].rules.settings["keep-last"].source == f"{root.url}/.ckptctl.toml:1"


def test_kill_9_during_each_run_leaves_every_run_for_the_next_run_to_finish(tmp_path: Path) -> None:
    """10 trials: kill a real --each-run at a random moment; a re-run ends with exactly the kept sets."""
    rng = random.Random(19)
    template = tmp_path / "template"
    for name in ("a", "b", "c", "d"):
        make_run(template / name, range(100, 1100, 100))
    (template / ".ckptctl.toml").write_text("keep-last = 2\n")
    age_tree(template)
    kept = {
        name: {
            k: v
            for k, v in digest_tree(template / name).items()
            if k.split("/")[0] in ("checkpoint-900", "checkpoint-1000")
        }
        for name in ("a", "b", "c", "d")
    }
    for trial in range(10):
        root = tmp_path / f"trial{trial}"
        subprocess.run(["cp", "-a", str(template), str(root)], check=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "ckptctl", "prune", str(root), "--each-run", "--quiet"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.2, 1.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        rerun = run_cli("prune", str(root), "--each-run", "--quiet")
        assert rerun.returncode == 0, (trial, rerun.stderr)
        for name in ("a", "b", "c", "d"):
            assert steps_left(root / name) == [900, 1000], (trial, name)
            assert digest_tree(root / name) == kept[name], (trial, name)


def test_list_shows_the_rules_a_prune_would_follow_and_survives_a_broken_file(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 400, 100))
    (tmp_path / ".ckptctl.toml").write_text(
        'keep-last = 2\n[runs."run"]\nkeep-best = 1\nmetric = "eval_loss"\n'
    )
    listed = run_cli("list", str(run), "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["data"]["policy"] == [
        {"setting": "keep-best", "value": 1, "from": f"{tmp_path}/.ckptctl.toml:3"},
        {"setting": "keep-last", "value": 2, "from": f"{tmp_path}/.ckptctl.toml:1"},
        {"setting": "metric", "value": "eval_loss", "from": f"{tmp_path}/.ckptctl.toml:4"},
    ]
    human = run_cli("list", str(run))
    assert f"rule keep-last = 2 (from {tmp_path}/.ckptctl.toml:1)" in human.stderr
    (tmp_path / ".ckptctl.toml").write_text("keep-last = 'x'\n")
    broken = run_cli("list", str(run), "--json")
    assert broken.returncode == 0, broken.stderr
    data = json.loads(broken.stdout)["data"]
    assert data["policy"] == [] and any(".ckptctl.toml:1: keep-last must be" in w for w in data["warnings"])


def test_runs_shows_what_each_runs_rules_would_free_as_each_run_would_plan_it(tmp_path: Path) -> None:
    """``runs ROOT`` previews the policy from the listing alone; on folder checkpoints it agrees with the plan
    ``prune ROOT --each-run --dry-run`` makes, and names the run whose file is broken."""
    root = make_root(tmp_path / "root")
    surveyed = run_cli("runs", str(root), "--json")
    assert surveyed.returncode == 0, surveyed.stderr
    policy = {r["path"]: r["policy"] for r in json.loads(surveyed.stdout)["data"]["runs"]}
    dry = run_cli("prune", str(root), "--each-run", "--dry-run", "--json")
    planned = {e["run"]: e for e in map(json.loads, dry.stdout.splitlines()) if e.get("event") == "run"}
    for run in ("team/hf-a", "team/hf-b", "nested/version_0", "free/run"):
        assert policy[run]["would_delete"] == len(planned[run]["to_delete"]), run
        assert policy[run]["would_free_bytes"] == planned[run]["bytes_to_free"], run
    lit = "lit/lightning_logs/version_0"  # runs names a run without the trainer's checkpoints/ subfolder
    assert policy[lit]["error"]["code"] == "policy_file"
    human = run_cli("runs", str(root))
    assert f"warning: run {lit}: {root}/lit/.ckptctl.toml:1: not valid TOML" in human.stderr


def test_policy_lookups_under_a_listed_root_cost_no_request_but_reading_the_files(
    moto_server, tmp_path: Path
) -> None:
    """``runs`` over many runs and ``--each-run`` know from their one listing which folders hold a policy file:
    the only object reads are of the files that exist (here one), never a HEAD per run and folder."""
    import re

    import s3fs

    from ckptctl.catalog.runs import survey_runs
    from ckptctl.retention.each_run import preview_policies

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=moto_server.endpoint)
    bucket = f"policy-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    for run in ("a", "b", "c", "d"):
        for step in (100, 200, 300):
            fs.pipe_file(f"{bucket}/root/{run}/checkpoint-{step}/model.safetensors", b"x" * 10)
            fs.pipe_file(f"{bucket}/root/{run}/checkpoint-{step}/trainer_state.json", b"{}")
    fs.pipe_file(f"{bucket}/root/.ckptctl.toml", b"keep-last = 1\n")
    root = Location.from_url(f"s3://{bucket}/root", {"endpoint_url": moto_server.endpoint})
    survey = survey_runs(root, settle_seconds=0)
    mark = moto_server.log.stat().st_size
    previews = preview_policies(root, {r.path: r.units for r in survey.runs}, survey.policy_files)
    assert {run: p.checkpoints for run, p in previews.items()} == {"a": 2, "b": 2, "c": 2, "d": 2}
    time.sleep(0.3)
    with moto_server.log.open("rb") as handle:
        handle.seek(mark)
        text = re.sub(rb"\x1b\[[0-9;]*m", b"", handle.read())  # moto colours a 206 line
        requests = re.findall(rb'"(GET|HEAD) (\S+) HTTP', text)
    assert [(m, t.split(b"?")[0]) for m, t in requests] == [
        (b"GET", f"/{bucket}/root/.ckptctl.toml".encode())
    ]
