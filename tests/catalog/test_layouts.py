"""Every layout family is recognised, with the right step and status, on every storage backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from tests.catalog.runs import FAMILIES, age_tree
from tests.conftest import Backend


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_units_status_and_step(
    family: str, backend: Backend, tmp_path: Path, shared_fixtures: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    expected = FAMILIES[family](src)
    age_tree(src)
    backend.put_tree(src, "run")
    scan = scan_run(backend.location("run"), settle_seconds=0)
    got = {u.path: (u.layout.value, u.step, u.status.value) for u in scan.units}
    assert got == expected, [(u.path, u.reason) for u in scan.units]


def test_half_written_units_are_never_complete(tmp_path: Path, shared_fixtures: Path) -> None:
    """Across all families at once: every unit built half-written is reported incomplete or in-progress."""
    for name, build in FAMILIES.items():
        root = tmp_path / name
        root.mkdir()
        expected = build(root)
        age_tree(root)
        from ckptctl.storage import Location

        units = {u.path: u for u in scan_run(Location.from_url(str(root)), settle_seconds=0).units}
        for path, (_, _, status) in expected.items():
            if status != "complete":
                assert units[path].status.value != "complete", (name, path)
