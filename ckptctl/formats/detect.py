"""What kind of checkpoint a file or folder is, from names first and a few bytes only when names say nothing."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import Enum

from ckptctl.formats.dcp import is_dcp_dir
from ckptctl.formats.deepspeed import is_deepspeed_dir
from ckptctl.formats.peft import ADAPTER_CONFIG
from ckptctl.formats.plain_pickle import is_pickle_head
from ckptctl.formats.torch_legacy import is_legacy_head
from ckptctl.formats.torch_zip import ZIP_MAGIC

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")
INDEX_SUFFIX = ".safetensors.index.json"
# Weight files a model folder is known by, most specific first (HF save_pretrained, DeepSpeed/PEFT outputs).
WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "consolidated.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "consolidated.pth",
)


class Format(str, Enum):
    SAFETENSORS = "safetensors"
    SAFETENSORS_SHARDED = "safetensors-sharded"
    TORCH = "torch"
    DEEPSPEED = "deepspeed"
    DCP = "dcp"
    PEFT = "peft"
    PICKLE = "pickle"
    """A plain pickle (``pickle.dump``), not written by torch.save."""


def format_of_name(name: str) -> Format | None:
    """The format a file name promises, or None when only its bytes can tell."""
    if name.endswith(".safetensors"):
        return Format.SAFETENSORS
    if name.endswith(INDEX_SUFFIX):
        return Format.SAFETENSORS_SHARDED
    if name == ".metadata":
        return Format.DCP
    if name.endswith(TORCH_SUFFIXES):
        return Format.TORCH
    return None


def format_of_bytes(head: bytes, size: int) -> Format | None:
    """Sniff a file's first bytes: a zip or legacy torch file, a plain pickle, or a plausible safetensors
    header."""
    if head.startswith(ZIP_MAGIC) or is_legacy_head(head):
        return Format.TORCH
    if is_pickle_head(head):
        return Format.PICKLE
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if 8 + length <= size and head[8:9] == b"{":
            return Format.SAFETENSORS
    return None


def format_of_dir(files: Iterable[str]) -> tuple[Format, str | None] | None:
    """A folder's format and, for weight-file folders, the file that holds the weights.

    ``files`` are paths relative to the folder (one level of subfolders is enough: a DeepSpeed save dir).
    """
    paths = set(files)
    top = {p for p in paths if "/" not in p}
    if is_dcp_dir(top):
        return Format.DCP, None
    if ADAPTER_CONFIG in top:
        return Format.PEFT, None
    nested = {p.rsplit("/", 1)[1] for p in paths if p.count("/") == 1}
    if is_deepspeed_dir(top) or ("latest" in top and is_deepspeed_dir(nested)) or is_deepspeed_dir(nested):
        return Format.DEEPSPEED, None
    indexes = sorted(p for p in top if p.endswith(INDEX_SUFFIX))
    if indexes:
        return Format.SAFETENSORS_SHARDED, indexes[0]
    for name in WEIGHT_FILE_NAMES:
        if name in top:
            return format_of_name(name) or Format.TORCH, name
    weights = sorted(p for p in top if p.endswith(".safetensors"))
    if len(weights) == 1:
        return Format.SAFETENSORS, weights[0]
    return None
