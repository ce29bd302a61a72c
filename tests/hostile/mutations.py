"""Mutation builders for the bad-input campaign: each takes a file (or folder) copied from a real fixture and
makes it hostile in one named way — cut short, a bit flipped, a header length or offset edited, pickle opcodes
spliced in, a zip directory rewritten, a FIFO or link put in its place, a name no terminal or codec expects.

Builders edit copies only: callers copy the fixture into ``tmp_path`` first (:func:`copy_fixture`) and never
point a builder at ``../shared/fixtures`` or ``tests/fixtures``. Builders keep the file's mtime (a trainer's
file times decide status and prune's ordering, and a mutation must change one thing, not two); anything new
gets the run's oldest time (:func:`keeping_times`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import shutil
import stat
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GiB = 1024**3
DEEP = 100_000
"""Nesting depth for the RecursionError class: far past CPython's default recursion limit of 1,000."""


# --- copying and file times -------------------------------------------------------------------------------


def copy_fixture(src: Path, dest: Path, *, age_seconds: float = 7200.0) -> Path:
    """Copy ``src`` (file or folder) to ``dest``, writable (the shared fixtures are read-only), every entry
    ``age_seconds`` old so no "still being written" settle window applies."""
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            extra = stat.S_IWUSR | stat.S_IRUSR | (stat.S_IXUSR if path.is_dir() else 0)
            path.chmod(path.stat().st_mode | extra)
    return age(dest, age_seconds)


def age(root: Path, seconds: float = 7200.0) -> Path:
    """Set every mtime under ``root`` (and its own) to ``seconds`` ago."""
    when = time.time() - seconds
    for path in [*root.rglob("*"), root] if root.is_dir() else [root]:
        os.utime(path, (when, when), follow_symlinks=False)
    return root


def _times(root: Path) -> dict[bytes, int]:
    found: dict[bytes, int] = {}
    rootb = os.fsencode(root)
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(rootb):
        for name in dirnames + filenames:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            found[os.path.join(_dirpath, name)] = st.st_mtime_ns
    found[rootb] = os.stat(rootb).st_mtime_ns
    return found


@contextlib.contextmanager
def keeping_times(root: Path) -> Iterator[None]:
    """Restore every mtime under ``root`` after the block; new entries get the oldest time seen before."""
    before = _times(root)
    oldest = min(before.values())
    yield
    after = _times(root)
    for path in sorted(
        after, key=len, reverse=True
    ):  # deepest first: setting a child's time moves no parent's
        t = before.get(path, oldest)
        with contextlib.suppress(
            OSError
        ):  # a path longer than PATH_MAX: its time is not worth a dir_fd dance
            os.utime(path, ns=(t, t), follow_symlinks=False)


# --- plain file edits -------------------------------------------------------------------------------------


def truncate_at(path: Path, at: int) -> None:
    """Cut ``path`` to ``at`` bytes (negative: that many bytes before the end)."""
    size = path.stat().st_size
    os.truncate(path, at if at >= 0 else size + at)


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def sparse(path: Path, size: int = 2 * GiB) -> None:
    """Replace ``path`` with a sparse file of ``size`` bytes (nothing written: truncate only)."""
    _remove(path)
    with path.open("wb") as handle:
        handle.truncate(size)


def fifo(path: Path) -> None:
    """Replace ``path`` with a FIFO that nothing ever writes to: a reader that opens it blocks forever."""
    _remove(path)
    os.mkfifo(path)


def symlink(path: Path, target: str | Path) -> None:
    _remove(path)
    os.symlink(target, path)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def deep_json(depth: int = DEEP) -> str:
    """A JSON array nested ``depth`` deep (valid JSON; ``json.loads`` raises RecursionError)."""
    return "[" * depth + "]" * depth


def with_deep_value(payload: dict[str, Any], key: str, depth: int = DEEP) -> str:
    """``payload`` as JSON text with ``key`` holding a ``depth``-deep array."""
    marker = "__ckptctl_hostile_deep__"
    return json.dumps({**payload, key: marker}).replace(json.dumps(marker), deep_json(depth))


def long_path(parent: Path, total: int = 5000, leaf: bytes = b"x") -> None:
    """Folders below ``parent`` whose joined path is longer than PATH_MAX (4096), with a file at the bottom;
    built with dir_fd since no single path syscall can reach it."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(total // 201 + 1):
            name = b"d" * 200
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf_fd = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf_fd, b"{}")
        os.close(leaf_fd)
    finally:
        os.close(fd)


def undecodable(name: bytes) -> str:
    """A str file name for bytes that are not UTF-8 (surrogate escapes, as os.listdir returns them)."""
    return os.fsdecode(name)


# --- safetensors ------------------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(
    path: Path, header: dict[str, Any] | str, data: bytes, *, length: int | None = None
) -> None:
    """Write a safetensors file; ``length`` overrides the 8-byte header length (the header bytes stay)."""
    text = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def safetensors_header_length(path: Path, length: int) -> None:
    patch(path, 0, struct.pack("<Q", length))


def safetensors_offsets(path: Path, edit: Callable[[list[int], int], list[int]]) -> None:
    """Rewrite the first tensor's ``data_offsets`` with ``edit(offsets, data_size)``."""
    header, data = read_safetensors(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = edit(header[name]["data_offsets"], len(data))
    write_safetensors(path, header, data)


def safetensors_deep_header(path: Path) -> None:
    header, data = read_safetensors(path)
    meta = header.pop("__metadata__", {})
    text = with_deep_value(header, "__deep__").replace("{", '{"__metadata__":' + json.dumps(meta) + ",", 1)
    write_safetensors(path, text, data)


# --- pickle -----------------------------------------------------------------------------------------------


def long_binput(index: int) -> bytes:
    """Opcodes that store None at memo ``index`` and pop it: a memo held as a list grows to ``index``."""
    return b"N" + pickle.LONG_BINPUT + struct.pack("<I", index) + b"0"


def huge_binbytes(length: int = 2**40) -> bytes:
    """A BINBYTES8 that claims ``length`` bytes (the file holds a few KiB)."""
    return b"\x8e" + struct.pack("<Q", length)


def nested_list(depth: int = DEEP) -> bytes:
    """A list nested ``depth`` deep, built without recursion (EMPTY_LIST × depth, APPEND × depth-1)."""
    return pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)


def int_ops(value: int) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]


def str_ops(value: str) -> bytes:
    raw = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def ops(data: bytes) -> list[tuple[str, Any, int]]:
    return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]


def after_proto(data: bytes, inserted: bytes) -> bytes:
    """Splice opcodes in right after the PROTO opcode (the rest of the pickle still loads)."""
    assert data[:1] == pickle.PROTO
    return data[:2] + inserted + data[2:]


def add_dict_item(data: bytes, key: str, value_ops: bytes) -> bytes:
    """Add ``key: value`` to a torch state-dict pickle (``OrderedDict(), MARK, k, v, …, SETITEMS``): the item
    goes in right after the MARK, so it is part of what the reader walks."""
    mark = next(pos for name, _arg, pos in ops(data) if name == "MARK")
    return data[: mark + 1] + str_ops(key) + value_ops + data[mark + 1 :]


def first_tensor_shape(data: bytes, shape: tuple[int, ...]) -> bytes:
    """Replace the first tensor's size tuple (the TUPLE2 after its BINPERSID's storage offset) with ``shape``."""
    listing = ops(data)
    persid = next(i for i, (name, _a, _p) in enumerate(listing) if name == "BINPERSID")
    # BINPERSID, storage offset (int), size ints..., TUPLEn
    start = listing[persid + 2][2]
    end_index = next(i for i in range(persid + 2, len(listing)) if listing[i][0].startswith("TUPLE"))
    end = listing[end_index + 1][2]
    size_ops = b"".join(int_ops(n) for n in shape) + (b"\x86" if len(shape) == 2 else b"\x85")
    return data[:start] + size_ops + data[end:]


def first_storage_numel(data: bytes, numel: int) -> bytes:
    """Replace the element count in the first persistent id ``('storage', cls, key, location, numel)``."""
    listing = ops(data)
    persid = next(i for i, (name, _a, _p) in enumerate(listing) if name == "BINPERSID")
    tuple_op = persid - 2 if listing[persid - 1][0].startswith("BINPUT") else persid - 1
    numel_start, numel_end = listing[tuple_op - 1][2], listing[tuple_op][2]
    return data[:numel_start] + int_ops(numel) + data[numel_end:]


# --- zip (torch.save) -------------------------------------------------------------------------------------

ZIP_STORED, ZIP_DEFLATED = 0, 8


@dataclass(frozen=True)
class Member:
    """One archive member as written: ``data`` is the stored (or deflated) bytes."""

    name: str
    data: bytes
    method: int = ZIP_STORED
    crc: int | None = None
    size: int | None = None
    """The uncompressed size (default ``len(data)``)."""
    central_sizes: tuple[int, int] | None = None
    """(compressed, uncompressed) as the central directory states them (e.g. 0xFFFFFFFF for zip64)."""
    central_extra: bytes = b""


def read_members(path: Path) -> list[Member]:
    """The members of a (stored) torch zip, in archive order."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return [Member(info.filename, archive.read(info)) for info in archive.infolist()]


def write_zip(path: Path, members: list[Member]) -> None:
    """A zip as torch writes one (central directory, zip64 end record and locator, end record), from members
    whose headers can each be made to lie."""
    out = bytearray()
    central = bytearray()
    for m in members:
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        size = len(m.data) if m.size is None else m.size
        name = m.name.encode()
        offset = len(out)
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, m.method, 0, 0x21, crc, len(m.data), size, len(name), 0
        )
        out += name + m.data
        csize, usize = m.central_sizes or (len(m.data), size)
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            45,
            20,
            0,
            m.method,
            0,
            0x21,
            crc,
            csize,
            usize,
            len(name),
            len(m.central_extra),
            0,
            0,
            0,
            0,
            offset,
        )
        central += name + m.central_extra
    cd_offset, cd_size = len(out), len(central)
    out += central
    zip64_offset = len(out)
    out += struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(members), len(members), cd_size, cd_offset
    )
    out += struct.pack("<IIQI", 0x07064B50, 0, zip64_offset, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), cd_size, cd_offset, 0)
    path.write_bytes(bytes(out))


def edit_member(path: Path, suffix: str, edit: Callable[[Member], Member]) -> None:
    """Rebuild the zip at ``path`` with the member whose name ends in ``suffix`` replaced by ``edit(member)``."""
    members = read_members(path)
    index = next(i for i, m in enumerate(members) if m.name.endswith(suffix))
    members[index] = edit(members[index])
    write_zip(path, members)


def edit_pickle(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Rebuild a torch zip with its ``data.pkl`` replaced by ``edit(data.pkl)``."""
    edit_member(path, "/data.pkl", lambda m: replace(m, data=edit(m.data)))


def zip_end_records(path: Path) -> tuple[int, int | None]:
    """Offsets of the end record and of the zip64 end record (None when there is none)."""
    raw = path.read_bytes()
    eocd = raw.rfind(b"PK\x05\x06")
    locator = eocd - 20
    if locator >= 0 and raw[locator : locator + 4] == b"PK\x06\x07":
        (zip64,) = struct.unpack("<Q", raw[locator + 8 : locator + 16])
        return eocd, zip64
    return eocd, None


def zip_directory_size(path: Path, delta: int) -> None:
    """Make the end records (both, when there is a zip64 one) state a directory ``delta`` bytes larger."""
    raw = path.read_bytes()
    eocd, zip64 = zip_end_records(path)
    (size,) = struct.unpack("<I", raw[eocd + 12 : eocd + 16])
    patch(path, eocd + 12, struct.pack("<I", size + delta))
    if zip64 is not None:
        (size64,) = struct.unpack("<Q", raw[zip64 + 40 : zip64 + 48])
        patch(path, zip64 + 40, struct.pack("<Q", size64 + delta))


def zip_directory_span(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    eocd, _ = zip_end_records(path)
    size, offset = struct.unpack("<II", raw[eocd + 12 : eocd + 20])
    return offset, offset + size


def zip64_extra_short(member: Member) -> Member:
    """Sizes in the central directory say "see the zip64 extra", and the extra holds one value of the two."""
    size = len(member.data)
    return replace(
        member, central_sizes=(0xFFFFFFFF, 0xFFFFFFFF), central_extra=struct.pack("<HHQ", 0x0001, 8, size)
    )


def zip64_extra_missing(member: Member) -> Member:
    """Sizes in the central directory say "see the zip64 extra", and there is no extra at all."""
    return replace(member, central_sizes=(0xFFFFFFFF, 0xFFFFFFFF), central_extra=b"")


def not_deflate(member: Member) -> Member:
    """The member says it is deflated; its bytes are the stored pickle (zlib: invalid block type)."""
    return replace(member, method=ZIP_DEFLATED, crc=zlib.crc32(member.data), size=len(member.data))


# 2 GiB of zeros, raw deflate: 2,048 copies of one full-flushed 1 MiB block (each decodes on its own), then
# an empty final block. Two MiB on disk, 2**31 bytes inflated.
_BOMB_SIZE = 2 * GiB
_BOMB_CRC = 0x4DBDF21C  # zlib.crc32 of 2**31 zero bytes


def inflate_bomb(member: Member) -> Member:
    """A member that inflates to 2 GiB of zeros from ~2 MiB (a correct CRC and sizes: only the ratio lies)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = block * (_BOMB_SIZE >> 20) + compressor.flush()
    return replace(member, data=stream, method=ZIP_DEFLATED, crc=_BOMB_CRC, size=_BOMB_SIZE)


# --- DeepSpeed --------------------------------------------------------------------------------------------


def rewrite_model_states(path: Path, **changes: Any) -> None:
    """Load a DeepSpeed model-states file with torch, change top-level entries, save it back with torch.save
    (the same zip layout and archive name DeepSpeed's own torch.save gives)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state.update(changes)
    torch.save(state, path)


# --- tier manifests ---------------------------------------------------------------------------------------


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], dict[str, Any] | str]) -> None:
    """Rewrite a tier manifest with ``edit(payload)`` (a dict is dumped as JSON; a str is written as is)."""
    result = edit(json.loads(path.read_text()))
    path.write_text(result if isinstance(result, str) else json.dumps(result, indent=1))


def each_file(**fields: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(payload: dict[str, Any]) -> dict[str, Any]:
        for entry in payload["files"]:
            entry.update(fields)
        return payload

    return edit
