"""A pickle reader that never runs code from the file: every global must be on an allow-list.

torch checkpoints (``data.pkl`` inside a torch zip archive) and DCP ``.metadata`` files are pickles. Loading
them with ``pickle`` (as DCP does) or ``torch.load(weights_only=False)`` runs whatever the file names. Here each
allowed global maps to an inert stand-in: tensor rebuild calls become ``TensorRef`` records, torch dtypes and
storage classes become names, DeepSpeed/DCP classes become ``PickledObject`` records holding their arguments
and state. Any other global is refused with ``UnsafePickleError`` before anything is called. torch is never
imported.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptctl.errors import CkptctlError, IntegrityError, UnsafePickleError

# torch's legacy typed storage classes -> the dtype their elements have.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

# Classes kept as inert records: the optimizer files of DeepSpeed (fixtures/zero/README.md) and the DCP metadata
# records (fixtures/dcp/README.md). Their code is never imported.
RECORD_CLASSES = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "torch.distributed.checkpoint.metadata.Metadata",
        "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
        "torch.distributed.checkpoint.metadata.TensorProperties",
        "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
        "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
        "torch.distributed.checkpoint.metadata.MetadataIndex",
        "torch.distributed.checkpoint.metadata.StorageMeta",
        "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib.WindowsPath",
        "pathlib.PureWindowsPath",
        "argparse.Namespace",
        "_io.BytesIO",
    }
)


@dataclass(frozen=True)
class TorchDType:
    name: str


@dataclass(frozen=True)
class TorchName:
    """A torch constant that is only a name here (``torch.strided``, ``torch.contiguous_format``)."""

    name: str


@dataclass(frozen=True)
class StorageClass:
    name: str
    dtype: str | None
    """None for ``UntypedStorage`` (bytes; the tensor carries its dtype)."""


@dataclass(frozen=True)
class StorageRef:
    """A persistent id of a torch archive: ``data/<key>`` holds ``numel`` elements of ``dtype``."""

    key: str
    dtype: str | None
    numel: int
    location: str


@dataclass(frozen=True)
class TensorRef:
    """A tensor as ``data.pkl`` rebuilds it: a view (offset, shape, stride) into a storage."""

    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool


class PickledObject:
    """An allow-listed foreign object, kept as data: constructor arguments and pickled state."""

    qualname = "object"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args: tuple[Any, ...] = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def fields(self) -> dict[str, Any]:
        """The object's attributes: a state dict, or the dict half of a ``(dict, slots)`` state."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = dict(state[0] or {})
            merged.update(state[1])
            return merged
        return dict(state) if isinstance(state, dict) else {}

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields().get(name, default)

    def __repr__(self) -> str:
        inner = ", ".join([*(repr(a) for a in self.args), *(f"{k}={v!r}" for k, v in self.fields().items())])
        return f"{self.qualname.rsplit('.', 1)[-1]}({inner})"


_RECORD_TYPES: dict[str, type[PickledObject]] = {}


def _record_type(qualname: str) -> type[PickledObject]:
    if qualname not in _RECORD_TYPES:
        _RECORD_TYPES[qualname] = type(qualname.rsplit(".", 1)[-1], (PickledObject,), {"qualname": qualname})
    return _RECORD_TYPES[qualname]


def _dtype_of(storage: StorageRef, dtype: str | None = None) -> str:
    return dtype or storage.dtype or "uint8"


def _rebuild_tensor_v2(
    storage: StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    return TensorRef(
        storage, storage_offset, tuple(size), tuple(stride), _dtype_of(storage), bool(requires_grad)
    )


def _rebuild_tensor_v3(
    storage: StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    dtype: TorchDType,
    metadata: Any = None,
) -> TensorRef:
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride), dtype.name, bool(requires_grad))


def _rebuild_parameter(
    data: TensorRef, requires_grad: bool, backward_hooks: Any, state: Any = None
) -> TensorRef:
    return TensorRef(
        data.storage, data.storage_offset, data.shape, data.stride, data.dtype, bool(requires_grad)
    )


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: tuple[Any, ...], state: Any) -> Any:
    return func(*args)


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell ``bytes`` as ``_codecs.encode(text, 'latin1')``; nothing else is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _bytearray(data: str | bytes = b"", encoding: str = "latin1") -> bytearray:
    """Protocol-2 pickles spell a bytearray as ``bytearray(text, 'latin-1')``; ``bytearray(N)`` (N zero bytes,
    a way to exhaust memory) is refused."""
    if isinstance(data, str):
        return bytearray(_codecs_encode(data, encoding))
    if isinstance(data, (bytes, bytearray)):
        return bytearray(data)
    raise UnsafePickleError(f"refusing bytearray({type(data).__name__})")


_FUNCTIONS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _codecs_encode,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": _torch_size,
    "torch.serialization._get_layout": TorchName,
}

_TORCH_NAMES = frozenset(
    {
        "Tensor",
        "strided",
        "sparse_coo",
        "contiguous_format",
        "channels_last",
        "channels_last_3d",
        "preserve_format",
    }
)
_TORCH_DTYPE_NAMES = frozenset(
    {
        *STORAGE_DTYPES.values(),
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "uint16",
        "uint32",
        "uint64",
        "complex32",
    }
)


def allowed_global(module: str, name: str) -> Any:
    """The stand-in for ``module.name``, or UnsafePickleError when it is not on the allow-list."""
    qualname = f"{module}.{name}"
    if qualname in _FUNCTIONS:
        return _FUNCTIONS[qualname]
    if qualname in RECORD_CLASSES:
        return _record_type(qualname)
    if module == "torch":
        if name in _TORCH_DTYPE_NAMES:
            return TorchDType(name)
        if name in STORAGE_DTYPES:
            return StorageClass(name, STORAGE_DTYPES[name])
        if name in _TORCH_NAMES:
            return TorchName(qualname)
    if qualname in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        return StorageClass("UntypedStorage", None)
    if qualname == "torch.nn.parameter.Parameter":
        return TorchName(qualname)
    raise UnsafePickleError(f"refusing to unpickle global {qualname}: not on ckptctl's allow-list")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from ``allowed_global`` and whose persistent ids are
    torch storage references."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 3 writes protocol-2 pickles (torch.save's) with Python 2 module names for builtins.
        return allowed_global("builtins" if module == "__builtin__" else module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {str(pid)[:80]!r}")
        _, storage_class, key, location, numel = pid
        if not isinstance(storage_class, StorageClass):
            raise UnsafePickleError(f"persistent id names {storage_class!r}, not a torch storage class")
        return StorageRef(str(key), storage_class.dtype, int(numel), str(location))


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with the allow-list. UnsafePickleError on a forbidden global; any other failure (a
    damaged pickle makes the unpickler raise almost anything: EOFError, OverflowError, KeyError...) is an
    IntegrityError, since nothing but the stand-ins above can have run."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except CkptctlError:
        raise
    except Exception as exc:
        raise IntegrityError(f"not a valid pickle ({type(exc).__name__}: {exc})"[:300]) from None
