"""The console script ends its process without the interpreter's teardown (``cli.app.run``): what a normal exit
does for the user must still happen: every line written reaches the reader, the exit status is the documented
one, ``atexit`` handlers run, and a reader that goes away early costs no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.cli.test_prune import make_run

CLI = [sys.executable, "-m", "ckptctl"]


def test_every_line_is_flushed_and_the_status_is_the_documented_one(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 2100, 100))
    listed = subprocess.run([*CLI, "list", str(run), "--json"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["data"]["units"]) == 20
    missing = subprocess.run(
        [*CLI, "list", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    lines = missing.stderr.splitlines()
    assert missing.returncode == 3 and lines[0].startswith("error: ") and "Traceback" not in missing.stderr


def test_atexit_handlers_still_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.argv = ['ckptctl', '--version']\n"
        "from ckptctl.cli.app import run\n"
        "run()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() and marker.read_text() == "yes"


def test_a_reader_that_goes_away_early_costs_no_traceback(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", range(100, 2100, 100))
    process = subprocess.Popen([*CLI, "list", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(1)
    process.stdout.close()
    errors = process.stderr.read().decode()
    process.wait(timeout=60)
    assert "Traceback" not in errors and "Exception ignored" not in errors


def test_a_profiled_process_ends_normally_so_the_profile_is_written(tmp_path: Path) -> None:
    out = tmp_path / "profile"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "ckptctl", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and out.stat().st_size > 0
