"""DCP's Hugging Face writer layout (``step-N/sharded/shard-R-model-I-of-N.safetensors``, alone or beside the
consolidated ``model-*.safetensors`` + index) in ``list`` and ``inspect``: complete only when the rank set has no
gap, described by its tensors, dtypes, size and ranks, and a lost rank file named. Fixtures:
tests/fixtures/dcp_hf/gen.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ckptctl.catalog.model import Layout, Status, Unit
from ckptctl.catalog.scan import scan_run
from ckptctl.formats.model import nbytes_of
from ckptctl.inspect import inspect_location
from ckptctl.storage import Location
from tests.catalog.runs import age_tree
from tests.cli.test_inspect import assert_one_line_error
from tests.conftest import run_cli

HERE = Path(__file__).resolve().parents[1] / "fixtures" / "dcp_hf"
CASES = ("sharded-only", "consolidated")
RANK2_FILE1 = "sharded/shard-00002-model-00001-of-00002.safetensors"


def _run(tmp_path: Path, case: str, remove: tuple[str, ...] = (), blank: str | None = None) -> Path:
    """A run holding the fixture's ``step-2/``, with some of its files removed or emptied."""
    run = tmp_path / "run"
    shutil.copytree(HERE / case / "step-2", run / "step-2")
    for rel in remove:
        (run / "step-2" / rel).unlink()
    if blank is not None:
        (run / "step-2" / blank).write_bytes(b"")
    age_tree(run)
    return run


def _unit(run: Path) -> Unit:
    (unit,) = scan_run(Location.from_url(str(run)), settle_seconds=0).units
    return unit


def _reference(case: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = json.loads((HERE / case / "reference" / "tensors.json").read_text())["tensors"]
    return {name: (t["dtype"], tuple(t["shape"])) for name, t in tensors.items()}


@pytest.mark.parametrize("case", CASES)
def test_a_whole_save_lists_complete(case: str, tmp_path: Path) -> None:
    unit = _unit(_run(tmp_path, case))
    assert (unit.layout, unit.step, unit.status) == (Layout.DCP, 2, Status.COMPLETE), unit.reason
    assert unit.reason.startswith("DCP HF-writer save: ranks 1..2 wrote all 2 output file(s)")
    assert ("model.safetensors.index.json beside sharded/" in unit.reason) == (case == "consolidated")


@pytest.mark.parametrize(
    ("case", "remove", "said"),
    [
        (
            "sharded-only",
            (RANK2_FILE1,),
            "shard-00002-model-00001-of-00002.safetensors is missing: rank 2 wrote",
        ),
        (
            "sharded-only",
            tuple(f"sharded/shard-00001-model-0000{i}-of-00002.safetensors" for i in (1, 2)),
            "no shard-00001-model-*-of-00002.safetensors: rank 1 is missing",
        ),
        (
            "consolidated",
            tuple(f"sharded/shard-0000{r}-model-00002-of-00002.safetensors" for r in (1, 2)),
            "output file 2 of 2 has no rank's pieces",
        ),
    ],
)
def test_a_gap_in_the_rank_files_lists_incomplete(
    case: str, remove: tuple[str, ...], said: str, tmp_path: Path
) -> None:
    unit = _unit(_run(tmp_path, case, remove))
    assert unit.status is Status.INCOMPLETE and said in unit.reason, unit.reason


def test_a_rank_file_cut_to_nothing_lists_incomplete(tmp_path: Path) -> None:
    unit = _unit(_run(tmp_path, "sharded-only", blank=RANK2_FILE1))
    assert unit.status is Status.INCOMPLETE and "0 bytes" in unit.reason, unit.reason


def test_list_json_says_so(tmp_path: Path) -> None:
    run = _run(tmp_path, "sharded-only")
    result = run_cli("list", str(run), "--json")
    assert result.returncode == 0, result.stderr
    (unit,) = json.loads(result.stdout)["data"]["units"]
    assert unit["status"] == "complete" and unit["reason"].startswith("DCP HF-writer save")


@pytest.mark.parametrize("case", CASES)
def test_inspect_describes_tensors_dtypes_size_and_ranks(case: str) -> None:
    for where in ("step-2", "step-2/sharded"):
        result = inspect_location(Location.from_url(str(HERE / case / where)))
        assert result.format == "dcp-hf" and result.complete, result.defects
        assert {t.name: (t.dtype, t.shape) for t in result.tensors} == _reference(case)
        totals = result.totals()
        assert totals["tensor_bytes"] == sum(nbytes_of(d, s) for d, s in _reference(case).values())
        assert set(totals["by_dtype"]) == {d for d, _ in _reference(case).values()}
        facts = result.facts["dcp_hf"]
        assert facts["ranks"] == [1, 2] and facts["output_files"] == 2 and facts["shard_files"] == 4
        roles = {f.role for f in result.files}
        indexed = case == "consolidated" and where == "step-2"
        assert facts["index"] is indexed and ("index" in roles) is indexed and "rank" in roles


def test_inspect_names_a_lost_rank_file_in_one_line(tmp_path: Path) -> None:
    """Rank 1's rows of output file 1 still tile a smaller tensor (embed [4, 4] of [7, 4]): only the names show
    the loss, and inspect says so in one line, the shrunken shapes beside it in the JSON."""
    step = _run(tmp_path, "sharded-only", (RANK2_FILE1,)) / "step-2"
    result = run_cli("inspect", str(step), "--json")
    assert_one_line_error(result, 8, "shard-00002-model-00001-of-00002.safetensors is missing: rank 2 wrote")
    data = json.loads(result.stdout)["data"]
    assert data["format"] == "dcp-hf" and not data["complete"] and data["facts"]["dcp_hf"]["ranks"] == [1, 2]
    assert [d["file"] for d in data["defects"]] == ["sharded"]
    shapes = {t["name"]: t["shape"] for t in data["tensors"]}
    assert shapes["policy.embed.weight"] == [4, 4]


def test_inspect_lists_every_defect_of_damaged_pieces(tmp_path: Path) -> None:
    """Where consolidate stops at the first, inspect lists each: a piece moved off its place, a file cut."""
    from tests.convert.test_consolidate_dcp_hf import _set_offsets

    step = _run(tmp_path, "sharded-only") / "step-2"
    _set_offsets(step / RANK2_FILE1, "policy.embed.weight", [5, 0])
    cut = step / "sharded" / "shard-00002-model-00002-of-00002.safetensors"
    cut.write_bytes(cut.read_bytes()[:-3])
    result = inspect_location(Location.from_url(str(step)))
    messages = [str(d) for d in result.defects]
    assert any("tensor 'policy.embed.weight': chunks cover 28 of 32 elements" in m for m in messages), (
        messages
    )
    assert any(m.startswith("sharded/shard-00002-model-00002-of-00002.safetensors: ") for m in messages), (
        messages
    )


def test_inspect_of_a_consolidated_save_missing_a_rank_checks_the_index(tmp_path: Path) -> None:
    """A whole rank gone leaves no gap in names or pieces: the consolidated headers and total_size show it."""
    step = _run(
        tmp_path,
        "consolidated",
        tuple(f"sharded/shard-00002-model-0000{i}-of-00002.safetensors" for i in (1, 2)),
    )
    result = inspect_location(Location.from_url(str(step / "step-2")))
    messages = [str(d) for d in result.defects]
    assert any("its pieces in sharded/ make float32 [4, 4]" in m for m in messages), messages
    assert any("total_size" in m for m in messages) and result.facts["dcp_hf"]["ranks"] == [1]


def test_inspect_of_one_rank_file_says_what_it_is() -> None:
    result = inspect_location(Location.from_url(str(HERE / "sharded-only" / "step-2" / RANK2_FILE1)))
    assert result.format == "safetensors" and any("one rank's pieces" in n for n in result.notes)
