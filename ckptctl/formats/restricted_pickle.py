"""A pickle reader that never runs code from the file: every global must be on an allow-list.

torch checkpoints (``data.pkl`` inside a torch zip archive, the pickles of torch's legacy format) and DCP
``.metadata`` files are pickles. Loading them with ``pickle`` (as DCP does) or ``torch.load(weights_only=False)``
runs whatever the file names. Here each allowed global maps to an inert stand-in: tensor rebuild calls become
``TensorRef`` records, torch dtypes and storage classes become names, DeepSpeed/DCP classes become
``PickledObject`` records holding their arguments and state, numpy's array, dtype and scalar reconstructors (HF
``rng_state.pth``, Accelerate ``random_states_*.pkl``) become ``NumpyArray``/``NumpyDType``/``NumpyScalar``
records. Any other global is refused with ``UnsafePickleError`` before anything is called. Neither torch nor
numpy is ever imported.

``foreign="inert"`` turns every other global into a ``PickledObject`` record instead of refusing it. Still
nothing runs (a record only stores its arguments); it exists for structural checks (is this file whole, where do
its storages end), where the content of a foreign object is never shown — ``training_args.bin`` or a whole
``nn.Module`` saved with ``torch.save(model)`` can then be checked for completeness without being trusted.

Resource limits (a hostile pickle is small and asks for a lot): the pure-Python unpickler keeps its memo in a
dict (the C one allocates an array as long as the largest memo index: ``LONG_BINPUT 2**27`` in a 127-byte file
cost 2.1 GB), memo indices may not exceed the pickle's length, no container may hold more than
``MAX_CONTAINER_ITEMS`` items, ``MARK`` nesting is capped, buffers are never allocated beyond the bytes the
pickle still holds, and ``BUILD`` only sets the state of records made here. Anything beyond them is an
IntegrityError.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ckptctl.errors import CkptctlError, IntegrityError, TruncatedError, UnsafePickleError

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

# Limits (module docstring). A real checkpoint pickle is far inside them: the largest container in a 7B model's
# optimizer state holds a few hundred entries, DCP metadata of 512 ranks a few million.
MAX_CONTAINER_ITEMS = 1 << 24
MAX_MARK_DEPTH = 1000
# The largest pickle read into memory at all (a data.pkl member, the pickles at the start of a legacy file).
MAX_PICKLE_BYTES = 256 * 1024 * 1024

Foreign = Literal["refuse", "inert"]


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
    """A persistent id of a torch file: storage ``key`` holds ``numel`` elements of ``dtype`` (bytes when
    ``dtype`` is None: an ``UntypedStorage``)."""

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
    foreign = False
    """True for a record made in ``foreign="inert"`` mode: a class nobody vetted, never shown as content."""

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
            merged = dict(state[0] or {}) if isinstance(state[0], dict) else {}
            merged.update(state[1])
            return merged
        return dict(state) if isinstance(state, dict) else {}

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields().get(name, default)

    def __repr__(self) -> str:
        return f"{self.qualname.rsplit('.', 1)[-1]}(…)"


_RECORD_TYPES: dict[tuple[str, bool], type[PickledObject]] = {}


def _record_type(qualname: str, foreign: bool = False) -> type[PickledObject]:
    key = (qualname, foreign)
    if key not in _RECORD_TYPES:
        attributes = {"qualname": qualname, "foreign": foreign}
        _RECORD_TYPES[key] = type(qualname.rsplit(".", 1)[-1], (PickledObject,), attributes)
    return _RECORD_TYPES[key]


# -- numpy, as records (numpy is never imported) ----------------------------------------------------------------

# numpy dtype codes (``np.dtype(code)``, the first argument pickled) -> the torch-style name used everywhere here.
NUMPY_DTYPES: dict[str, str] = {
    "b1": "bool",
    "u1": "uint8",
    "u2": "uint16",
    "u4": "uint32",
    "u8": "uint64",
    "i1": "int8",
    "i2": "int16",
    "i4": "int32",
    "i8": "int64",
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
    "c8": "complex64",
    "c16": "complex128",
}
_STRUCT_CODES = {
    "bool": "?",
    "uint8": "B",
    "uint16": "H",
    "uint32": "I",
    "uint64": "Q",
    "int8": "b",
    "int16": "h",
    "int32": "i",
    "int64": "q",
    "float16": "e",
    "float32": "f",
    "float64": "d",
}


class NumpyDType:
    """``numpy.dtype(code, align, copy)`` plus its pickled state (whose second field is the byte order)."""

    def __init__(self, code: Any = "", align: Any = False, copy: Any = False) -> None:
        self.code = code if isinstance(code, str) else type(code).__name__
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
            self.byteorder = state[1]

    @property
    def name(self) -> str:
        return NUMPY_DTYPES.get(self.code, self.code)

    @property
    def itemsize(self) -> int | None:
        digits = "".join(c for c in self.code if c.isdigit())
        return int(digits) if digits and len(digits) < 6 else None

    def __repr__(self) -> str:
        return f"numpy.dtype({self.name})"


class NumpyArray:
    """``numpy._core.multiarray._reconstruct(ndarray, (0,), b'b')`` then ``BUILD`` with ``(version, shape,
    dtype, is_fortran, data)``: an array's description and raw bytes, never an array."""

    def __init__(self, *args: Any) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: NumpyDType | None = None
        self.data: Any = b""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise IntegrityError("numpy array state is not a (version, shape, dtype, fortran, data) tuple")
        shape, dtype, _fortran, data = state[-4:]
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and 0 <= d < 2**63 for d in shape)):
            raise IntegrityError("numpy array with an invalid shape")
        self.shape = shape
        self.dtype = dtype if isinstance(dtype, NumpyDType) else None
        self.data = data

    @property
    def numel(self) -> int:
        total = 1
        for dim in self.shape:
            total *= dim
        return total

    def describe(self) -> str:
        dtype = self.dtype.name if self.dtype else "?"
        return f"numpy {dtype}[{', '.join(str(d) for d in self.shape)}]"

    def __repr__(self) -> str:
        return self.describe()


class NumpyScalar:
    """``numpy._core.multiarray.scalar(dtype, raw)``: a numpy scalar; its value is decoded for plain numeric
    dtypes with ``struct`` (no numpy)."""

    def __init__(self, dtype: Any = None, raw: Any = b"") -> None:
        self.dtype = dtype if isinstance(dtype, NumpyDType) else None
        self.raw = raw

    @property
    def value(self) -> Any:
        if self.dtype is None or not isinstance(self.raw, (bytes, bytearray)):
            return None if self.dtype is None else self.raw
        code = _STRUCT_CODES.get(self.dtype.name)
        if code is None or struct.calcsize(code) != len(self.raw):
            return None
        order = ">" if self.dtype.byteorder == ">" else "<"
        return struct.unpack(order + code, self.raw)[0]

    def __repr__(self) -> str:
        return f"numpy {self.dtype.name if self.dtype else '?'} {self.value!r}"


@dataclass(frozen=True)
class NumpyName:
    """A numpy class that is only a name here (``numpy.ndarray``, passed to ``_reconstruct``)."""

    name: str


# -- stand-ins for allowed functions ----------------------------------------------------------------------------


def _dtype_of(storage: StorageRef, dtype: str | None = None) -> str:
    return dtype or storage.dtype or "uint8"


def _rebuild_tensor(
    storage: StorageRef, storage_offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> TensorRef:
    """torch < 1.0 (legacy files): ``_rebuild_tensor(storage, offset, size, stride)``."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise IntegrityError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
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
    if not isinstance(storage, StorageRef) or not isinstance(dtype, TorchDType):
        raise IntegrityError("tensor rebuilt from something that is not a storage and a dtype")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride), dtype.name, bool(requires_grad))


def _rebuild_parameter(
    data: TensorRef, requires_grad: bool, backward_hooks: Any, state: Any = None
) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise IntegrityError(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return TensorRef(
        data.storage, data.storage_offset, data.shape, data.stride, data.dtype, bool(requires_grad)
    )


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: tuple[Any, ...], state: Any) -> Any:
    if not callable(func) or not isinstance(args, tuple):
        raise IntegrityError("malformed _rebuild_from_type_v2 call")
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


def _numpy_reconstruct(subtype: Any = None, shape: Any = (0,), dtype: Any = b"b") -> NumpyArray:
    return NumpyArray()


def _numpy_scalar(dtype: Any = None, raw: Any = b"") -> NumpyScalar:
    return NumpyScalar(dtype, raw)


_FUNCTIONS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _codecs_encode,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": _torch_size,
    "torch.serialization._get_layout": TorchName,
    # numpy 2 spells its core module numpy._core, numpy 1 numpy.core (formats.md §2.3, notes §7.4).
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy.dtype": NumpyDType,
    "numpy.ndarray": NumpyName("numpy.ndarray"),
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
# What BUILD may set the state of: the mutable records made here, and OrderedDict (torch state dicts carry a
# ``_metadata`` attribute). Never a frozen record, a stand-in function or a builtin.
_BUILDABLE = (PickledObject, NumpyArray, NumpyDType, collections.OrderedDict)


def allowed_global(module: str, name: str, foreign: Foreign = "refuse") -> Any:
    """The stand-in for ``module.name``; for anything not on the allow-list an UnsafePickleError, or with
    ``foreign="inert"`` an inert record (module docstring)."""
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
    if foreign == "inert":
        return _record_type(qualname, foreign=True)
    raise UnsafePickleError(f"refusing to unpickle global {qualname}: not on ckptctl's allow-list")


# The pure-Python unpickler (CPython's reference implementation, stable across 3.10-3.13): typeshed does not
# describe its internals, hence Any.
_PyUnpickler: Any = pickle._Unpickler  # type: ignore[attr-defined]
_OPS: dict[int, Callable[[Any], None]] = _PyUnpickler.dispatch


class RestrictedUnpickler(_PyUnpickler):
    """The pure-Python unpickler (its memo is a dict) whose globals come only from ``allowed_global``, whose
    persistent ids are torch storage references, and whose opcodes are held to the limits of the module
    docstring. ``storages`` collects every storage the pickle references, by key (torch's legacy format sizes
    its data section from them)."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(_OPS)

    def __init__(self, file: io.BytesIO, *, size: int, foreign: Foreign = "refuse") -> None:
        super().__init__(file, encoding="utf-8")
        self._size = size
        self._foreign: Foreign = foreign
        self.storages: dict[str, StorageRef] = {}
        self.storage_conflicts: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise IntegrityError("a global whose name is not text")
        # Python 3 writes protocol-2 pickles (torch.save's) with Python 2 module names for builtins.
        return allowed_global("builtins" if module == "__builtin__" else module, name, self._foreign)

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage type, key, location, numel) in a zip archive; the legacy format adds a sixth
        # field, view metadata (None, or the (key, offset, size) of a view in files from torch < 1.0).
        # The legacy format's torch.save(module) names each module class with its source code: the class is
        # the record find_class already made (or refused); the source is ignored.
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            if isinstance(pid[1], type) and issubclass(pid[1], PickledObject):
                return pid[1]
            raise UnsafePickleError(f"unexpected module record {str(pid)[:80]!r}")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {str(pid)[:80]!r}")
        storage_class, key, location, numel = pid[1:5]
        if not isinstance(storage_class, StorageClass):
            raise UnsafePickleError(f"persistent id names {storage_class!r}, not a torch storage class")
        if not (isinstance(numel, int) and 0 <= numel < 2**62) or not isinstance(key, (str, int)):
            raise IntegrityError(f"persistent id with an invalid key or size {str(pid)[:80]!r}")
        ref = StorageRef(str(key), storage_class.dtype, numel, str(location))
        known = self.storages.setdefault(ref.key, ref)
        if (known.dtype, known.numel) != (ref.dtype, ref.numel) and len(self.storage_conflicts) < 10:
            self.storage_conflicts.append(ref.key)
        return ref

    # -- limits ---------------------------------------------------------------------------------------------

    def _memo_index(self, index: int) -> None:
        if index > self._size:
            raise IntegrityError(
                f"memo index {index} in a {self._size}-byte pickle (a pickler never writes one)"
            )
        self.memo[index] = self.stack[-1]

    def load_put(self) -> None:
        self._memo_index(int(self.readline()[:-1]))

    def load_binput(self) -> None:
        self._memo_index(self.read(1)[0])

    def load_long_binput(self) -> None:
        (index,) = struct.unpack("<I", self.read(4))
        self._memo_index(index)

    def load_mark(self) -> None:
        if len(self.metastack) >= MAX_MARK_DEPTH:
            raise IntegrityError(f"pickle nested more than {MAX_MARK_DEPTH} levels deep")
        _OPS[pickle.MARK[0]](self)

    def _bounded(self, op: bytes) -> None:
        _OPS[op[0]](self)
        try:
            size = len(self.stack[-1])
        except (TypeError, IndexError):
            return
        if size > MAX_CONTAINER_ITEMS:
            raise IntegrityError(f"a pickled container with over {MAX_CONTAINER_ITEMS} items")

    def load_append(self) -> None:
        self._bounded(pickle.APPEND)

    def load_appends(self) -> None:
        self._bounded(pickle.APPENDS)

    def load_setitem(self) -> None:
        self._bounded(pickle.SETITEM)

    def load_setitems(self) -> None:
        self._bounded(pickle.SETITEMS)

    def load_additems(self) -> None:
        self._bounded(pickle.ADDITEMS)

    def load_bytearray8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        if length > self._size:
            raise IntegrityError(f"a {length}-byte buffer in a {self._size}-byte pickle")
        _bytes = self.read(length)
        if len(_bytes) != length:
            raise EOFError("pickle data was truncated")
        self.append(bytearray(_bytes))

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, _BUILDABLE):
            raise IntegrityError(f"pickle sets the state of a {type(target).__name__} (refused)")
        _OPS[pickle.BUILD[0]](self)

    dispatch[pickle.PUT[0]] = load_put
    dispatch[pickle.BINPUT[0]] = load_binput
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput
    dispatch[pickle.MARK[0]] = load_mark
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.BUILD[0]] = load_build


def restricted_load(
    stream: io.BytesIO, *, foreign: Foreign = "refuse", unpickler: list[RestrictedUnpickler] | None = None
) -> Any:
    """One pickle from ``stream`` (a BytesIO over bytes in memory), leaving the stream just past its STOP.

    UnsafePickleError on a forbidden global; TruncatedError when the bytes end before the pickle does; any other
    failure (a damaged pickle makes the unpickler raise almost anything: EOFError, OverflowError, KeyError...)
    is an IntegrityError, since nothing but the stand-ins above can have run. ``unpickler``, when given,
    receives the unpickler used (its ``storages``).
    """
    size = len(stream.getbuffer())
    reader = RestrictedUnpickler(stream, size=size, foreign=foreign)
    if unpickler is not None:
        unpickler.append(reader)
    try:
        return reader.load()
    except CkptctlError:
        raise
    except Exception as exc:
        if stream.tell() >= size:
            raise TruncatedError("the pickle ends before its STOP opcode (truncated)") from None
        raise IntegrityError(f"not a valid pickle ({type(exc).__name__}: {exc})"[:300]) from None


def restricted_loads(data: bytes, *, foreign: Foreign = "refuse") -> Any:
    """Unpickle ``data`` with the allow-list (``restricted_load`` on the whole of it)."""
    return restricted_load(io.BytesIO(data), foreign=foreign)
