"""A cron box may not have torch: list must work with torch unimportable and never import it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ckptctl.example import write_example_run
from tests.catalog.runs import age_tree, deepspeed, plain_files

BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('torch is not installed (blocked by the test)')
sys.meta_path.insert(0, Block())
sys.argv = ['ckptctl', *ARGS]
from ckptctl.cli.app import main
try:
    main()
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print('\\nTORCH_LOADED', 'torch' in sys.modules, 'EXIT', code)
"""


def run_without_torch(*args: str) -> tuple[str, bool, str]:
    code = BLOCK_TORCH.replace("ARGS", repr(list(args)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    body, _, tail = result.stdout.rpartition("\nTORCH_LOADED ")
    loaded, _, exit_code = tail.strip().partition(" EXIT ")
    return body, loaded == "True", exit_code


def test_list_runs_without_torch(tmp_path: Path, shared_fixtures: Path) -> None:
    run = write_example_run(tmp_path / "hf")
    body, loaded, code = run_without_torch("list", str(run), "--json")
    assert code in ("0", "None") and not loaded
    assert len(json.loads(body)["data"]["units"]) == 6
    (tmp_path / "mixed").mkdir()
    deepspeed(tmp_path / "mixed")
    plain_files(tmp_path / "mixed")
    age_tree(tmp_path / "mixed")
    body, loaded, code = run_without_torch("list", str(tmp_path / "mixed"), "--json")
    assert code in ("0", "None") and not loaded
    assert {u["layout"] for u in json.loads(body)["data"]["units"]} == {"deepspeed", "file", "unknown"}


def test_tier_and_checkpoint_lora_extraction_run_without_torch(tmp_path: Path, shared_fixtures: Path) -> None:
    run = write_example_run(tmp_path / "run")
    remote = tmp_path / "remote"
    _, loaded, code = run_without_torch(
        "tier", "push", str(run), "--to", str(remote), "--keep-local-last", "2", "-q"
    )
    assert code in ("0", "None") and not loaded
    body, loaded, code = run_without_torch("tier", "status", str(run), "--remote", str(remote), "--json")
    assert code in ("0", "None") and not loaded
    assert {u["where"] for u in json.loads(body)["data"]["units"]} >= {"remote", "both"}
    _, loaded, code = run_without_torch(
        "tier", "pull", str(remote), str(tmp_path / "back"), "--step", "100", "-q"
    )
    assert code in ("0", "None") and not loaded and (tmp_path / "back" / "trainer_state.json").exists()
    zero3 = shared_fixtures / "lora" / "lora_basic" / "deepspeed_zero3"
    _, loaded, code = run_without_torch(
        "extract-lora", str(zero3), str(tmp_path / "adapter"), "--alpha", "16", "-q"
    )
    assert (
        code in ("0", "None") and not loaded and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    )
