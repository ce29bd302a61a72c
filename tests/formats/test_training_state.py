"""Optimizer, scheduler and RNG state are shown as what they are, never counted as model parameters, in both
torch serializations and in plain pickles; numpy inside them is read as inert records, numpy never imported."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckptctl.errors import IntegrityError, TruncatedError, UnsafePickleError
from ckptctl.formats.restricted_pickle import NumpyArray, NumpyScalar, restricted_loads
from ckptctl.inspect import inspect_checkpoint
from tests.conftest import run_cli
from tests.formats.torch_files import manifest, torch_files

__all__ = ["torch_files"]


@pytest.mark.parametrize("name", ["optimizer.pt", "optimizer-legacy.pt"])
def test_optimizer_state_holds_no_parameters(torch_files: Path, name: str) -> None:
    result = inspect_checkpoint(str(torch_files / name))
    model_parameters = manifest(torch_files)[name]["model_parameters"]
    totals = result.totals()
    assert totals["parameters"] == 0 and totals["trainable_parameters"] == 0
    # AdamW: two moments per parameter element, and one 0-d step per parameter tensor (6 of them).
    assert totals["by_role"] == {
        "optimizer": {
            "tensors": 18,
            "elements": 2 * model_parameters + 6,
            "bytes": 4 * (2 * model_parameters + 6),
        }
    }
    optimizer = result.facts["optimizer"]
    assert result.facts["content"] == "optimizer"
    assert (optimizer["param_groups"], optimizer["parameters_tracked"], optimizer["tracked_elements"]) == (
        1,
        6,
        model_parameters,
    )
    assert optimizer["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert optimizer["hyperparameters"]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize("name", ["tutorial.pt", "tutorial-legacy.pt"])
def test_model_and_optimizer_in_one_file(torch_files: Path, name: str) -> None:
    result = inspect_checkpoint(str(torch_files / name))
    assert result.parameters == manifest(torch_files)[name]["model_parameters"]
    assert {t.role for t in result.tensors if t.name.startswith("model_state_dict.")} == {"param"}
    assert {t.role for t in result.tensors if t.name.startswith("optimizer_state_dict.")} == {"optimizer"}
    assert result.facts["content"] == "training_state"
    assert result.facts["optimizer"]["path"] == "optimizer_state_dict"


@pytest.mark.parametrize("name", ["rng_state.pth", "rng_state-legacy.pth"])
def test_hf_rng_state_is_shown_as_rng_state(torch_files: Path, name: str) -> None:
    result = run_cli("inspect", str(torch_files / name), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)["data"]
    assert data["totals"]["parameters"] == 0
    assert data["totals"]["by_role"] == {"rng": {"tensors": 1, "elements": 5056, "bytes": 5056}}
    assert data["facts"]["content"] == "rng_state"
    assert data["facts"]["rng_state"] == {
        "python": "python random.getstate() (version 3, 625 words)",
        "numpy": "numpy MT19937 state (numpy uint32[624], position 624)",
        "cpu": "torch generator state uint8[5056]",
    }
    text = run_cli("inspect", str(torch_files / name))
    assert "rng state   1 tensors, 5,056 elements" in text.stdout and "parameters  0" in text.stdout


@pytest.mark.parametrize("name", ["random_states_0.pkl", "random_states_plain.pkl"])
def test_accelerate_random_states_without_numpy_or_torch(torch_files: Path, name: str) -> None:
    """Accelerate writes random_states_<i>.pkl with torch.save; other tools pickle.dump the same dict. Both are
    read as RNG state, and neither torch nor numpy is imported to read them."""
    script = (
        "import sys, json\n"
        "from ckptctl.inspect import inspect_checkpoint\n"
        f"result = inspect_checkpoint({str(torch_files / name)!r})\n"
        "print(json.dumps([result.format, result.facts, 'numpy' in sys.modules, 'torch' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    file_format, facts, numpy_loaded, torch_loaded = json.loads(out.stdout)
    assert not numpy_loaded and not torch_loaded
    assert file_format == ("pickle" if name.endswith("plain.pkl") else "torch")
    assert facts["content"] == "rng_state"
    assert facts["rng_state"]["random_state"] == "python random.getstate() (version 3, 625 words)"
    assert facts["rng_state"]["numpy_random_seed"].startswith("numpy MT19937 state (numpy uint32[624]")
    assert facts["rng_state"]["step"] == "7"


def test_truncated_plain_pickle(torch_files: Path, tmp_path: Path) -> None:
    raw = (torch_files / "random_states_plain.pkl").read_bytes()
    path = tmp_path / "random_states_0.pkl"
    path.write_bytes(raw[:-40])
    with pytest.raises(TruncatedError, match="ends before its STOP opcode"):
        inspect_checkpoint(str(path))


@pytest.mark.parametrize("name", ["scheduler.pt", "scheduler-legacy.pt"])
def test_scheduler_state(torch_files: Path, name: str) -> None:
    result = inspect_checkpoint(str(torch_files / name))
    assert result.facts["content"] == "scheduler" and result.tensors == ()
    assert result.facts["scheduler"]["last_epoch"] == 2 and result.facts["scheduler"]["base_lrs"] == [0.001]


def test_numpy_records_keep_the_data_and_run_nothing() -> None:
    array = np.arange(6, dtype=np.uint32).reshape(2, 3)
    for protocol in (2, 4):
        record = restricted_loads(pickle.dumps(array, protocol=protocol))
        assert isinstance(record, NumpyArray) and record.shape == (2, 3) and record.dtype is not None
        assert record.dtype.name == "uint32" and record.data == array.tobytes()
    scalars = restricted_loads(pickle.dumps([np.float64(0.25), np.int64(-3), np.bool_(True)], protocol=2))
    assert [type(s) for s in scalars] == [NumpyScalar] * 3 and [s.value for s in scalars] == [0.25, -3, True]


@pytest.mark.parametrize(
    ("crafted", "error"),
    [
        # numpy.load: on no allow-list.
        (b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.", UnsafePickleError),
        # numpy.ndarray is a name here, not a constructor.
        (b"\x80\x02cnumpy\nndarray\nK\x03\x85R.", IntegrityError),
        # BUILD (set the state of) a frozen stand-in: refused, whatever the state.
        (b"\x80\x02ctorch\nfloat32\n}b.", IntegrityError),
    ],
)
def test_the_numpy_allow_list_stays_an_allow_list(crafted: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        restricted_loads(crafted)
