"""Lightning ``.ckpt`` files: step, epoch and the ModelCheckpoint state (monitor, mode, scores) read torch-free
with a few ranged reads, from both torch serializations, locally and on S3."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from ckptctl.errors import IntegrityError
from ckptctl.formats.lightning import LightningMeta, read_lightning_meta
from ckptctl.formats.source import FileSource
from ckptctl.inspect import inspect_checkpoint
from ckptctl.storage.location import Location
from tests.conftest import make_backend
from tests.formats.torch_files import torch_files

__all__ = ["torch_files"]


def _f32(value: float) -> float:
    """The value a float32 0-d tensor holds (Lightning's scores are float32 tensors)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


EXPECTED = LightningMeta(
    global_step=30,
    epoch=2,
    monitor="val_loss",
    mode="min",
    current_score=_f32(4.5969),
    best_k_models={
        "epoch=0-step=10.ckpt": _f32(4.7999),
        "epoch=1-step=20.ckpt": _f32(4.6658),
        "epoch=2-step=30.ckpt": _f32(4.5969),
    },
    best_model_path="/home/user/run/lightning_logs/version_0/checkpoints/epoch=2-step=30.ckpt",
    last_model_path=None,
)


def _source(path: Path) -> FileSource:
    return FileSource(Location.from_url(str(path.parent)), path.name, path.stat().st_size)


@pytest.mark.parametrize("name", ["epoch=2-step=30.ckpt", "epoch=2-step=30-legacy.ckpt"])
def test_small_checkpoint_in_one_read(torch_files: Path, name: str) -> None:
    source = _source(torch_files / name)
    assert read_lightning_meta(source) == EXPECTED
    assert source.requests == 1  # a file this small is fetched whole by the first read


@pytest.mark.parametrize(("name", "reads"), [("big.ckpt", 2), ("big-legacy.ckpt", 1 + 3)])
def test_large_checkpoint_in_few_reads(torch_files: Path, name: str, reads: int) -> None:
    """2 MB of weights. Zip: the directory (tail) and data.pkl, plus one read for all the scores unless they
    lie in the tail already (here they do: Lightning pickles callbacks after the weights, and a zip stores
    storages in pickling order). Legacy: the pickles (start), then the 3 score storages, which the legacy format
    orders by memory address (a different order each time the file is made), so they may lie apart: at most
    one read each."""
    source = _source(torch_files / name)
    assert read_lightning_meta(source) == EXPECTED
    assert source.requests <= reads and source.bytes_fetched < 300_000


def test_on_s3(torch_files: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = make_backend("s3", tmp_path, request)
    local = tmp_path / "src"
    local.mkdir()
    shutil.copy(torch_files / "big.ckpt", local / "epoch=2-step=30.ckpt")
    store.put_tree(local, "run")
    source = FileSource(
        store.location("run"), "epoch=2-step=30.ckpt", (local / "epoch=2-step=30.ckpt").stat().st_size
    )
    assert read_lightning_meta(source) == EXPECTED and source.requests == 2


def test_inspect_shows_the_callback_state(torch_files: Path) -> None:
    result = inspect_checkpoint(str(torch_files / "epoch=2-step=30.ckpt"))
    assert result.facts["lightning"]["monitor"] == "val_loss"
    assert result.facts["lightning"]["best_k_models"] == EXPECTED.best_k_models
    assert result.metadata["global_step"] == 30
    assert result.parameters == 244 and result.facts["optimizer"]["path"] == "optimizer_states.0"


def test_not_lightning_and_not_torch(torch_files: Path, tmp_path: Path) -> None:
    plain = read_lightning_meta(_source(torch_files / "weights.pt"))
    assert plain == LightningMeta(None, None, None, None, None)
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(IntegrityError):
        read_lightning_meta(_source(tmp_path / "last.ckpt"))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((torch_files / "epoch=2-step=30.ckpt").read_bytes()[:-100])
    with pytest.raises(IntegrityError):
        read_lightning_meta(_source(cut))
