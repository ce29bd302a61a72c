"""One conformance suite for the storage layer, run on local disk, memory://, S3 (moto) and GCS (emulator).

Every command stands on these promises, so each is checked on every backend against a real server.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ckptctl.errors import (
    BackendNotInstalledError,
    NoSuchBucketError,
    NotADirectoryRunError,
    NotFoundError,
    StorageUnavailableError,
    UsageError,
)
from ckptctl.storage import Location, parse_storage_options
from tests.conftest import Backend, random_payload


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "checkpoint-1/model.safetensors": random_payload(3000),
        "checkpoint-1/trainer_state.json": b"{}",
        "checkpoint-2/sub/deep/file.bin": b"deep",
        "latest": b"checkpoint-2",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.fixture
def run(backend: Backend, tmp_path: Path) -> tuple[Location, dict[str, bytes]]:
    src = tmp_path / "src"
    files = make_tree(src)
    backend.put_tree(src, "run")
    return backend.location("run"), files


def test_walk_lists_every_file_with_size_and_mtime(run: tuple[Location, dict[str, bytes]]) -> None:
    location, files = run
    entries = {e.path: e for e in location.walk()}
    listed_files = {p: e for p, e in entries.items() if e.type == "file"}
    assert {p: e.size for p, e in listed_files.items()} == {p: len(d) for p, d in files.items()}
    assert all(e.mtime is not None and e.mtime > 0 for e in listed_files.values())
    assert entries["checkpoint-2/sub"].type == "directory"
    assert [e.path for e in location.walk()] == sorted(entries)


def test_walk_sees_changes_made_by_another_client(
    run: tuple[Location, dict[str, bytes]], backend: Backend
) -> None:
    location, _ = run
    location.walk()
    other = backend.location("run")
    other.write_bytes("checkpoint-3/new.bin", b"new")
    assert "checkpoint-3/new.bin" in {e.path for e in location.walk()}


def test_ranged_reads(run: tuple[Location, dict[str, bytes]]) -> None:
    location, files = run
    data = files["checkpoint-1/model.safetensors"]
    assert location.read_range("checkpoint-1/model.safetensors", 0, 8) == data[:8]
    assert location.read_range("checkpoint-1/model.safetensors", 1000, 2500) == data[1000:2500]
    assert location.read_range("checkpoint-1/model.safetensors", len(data) - 22, len(data)) == data[-22:]
    assert location.read_bytes("latest") == b"checkpoint-2"


def test_stat_file_and_folder(run: tuple[Location, dict[str, bytes]]) -> None:
    location, files = run
    entry = location.stat("checkpoint-1/model.safetensors")
    assert entry.type == "file" and entry.size == len(files["checkpoint-1/model.safetensors"])
    assert location.exists("checkpoint-1/model.safetensors")
    assert not location.exists("checkpoint-9/nothing")


def test_write_bytes_replaces_whole_and_leaves_no_temp(run: tuple[Location, dict[str, bytes]]) -> None:
    location, _ = run
    location.write_bytes("checkpoint-2/manifest.json", b"first")
    location.write_bytes("checkpoint-2/manifest.json", b"second version")
    assert location.read_bytes("checkpoint-2/manifest.json") == b"second version"
    names = [e.name for e in location.walk()]
    assert not [n for n in names if n.startswith(".ckptctl-tmp-")]


def test_delete_files_removes_exactly_those_and_reports_none_left(
    run: tuple[Location, dict[str, bytes]],
) -> None:
    location, _ = run
    left = location.delete_files(["checkpoint-1/model.safetensors", "checkpoint-1/trainer_state.json"])
    assert left == []
    paths = {e.path for e in location.walk() if e.type == "file"}
    assert paths == {"checkpoint-2/sub/deep/file.bin", "latest"}


def test_delete_files_of_a_missing_file_is_not_an_error(run: tuple[Location, dict[str, bytes]]) -> None:
    location, _ = run
    assert location.delete_files(["checkpoint-7/gone.bin"]) == []


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_delete_batches_over_one_thousand_keys(backend: Backend) -> None:
    location = backend.location("big")
    rels = [f"u{i // 10:04d}/f{i % 10}" for i in range(1005)]
    for rel in rels:
        location.fs.pipe_file(location.full_path(rel), b"")
    calls: list[int] = []
    original = location.fs.rm

    def counting_rm(paths: list[str], *args: object, **kwargs: object) -> object:
        calls.append(len(paths))
        return original(paths, *args, **kwargs)

    location.fs.rm = counting_rm  # type: ignore[method-assign]
    assert location.delete_files(rels) == []
    assert calls == [1000, 5]
    with pytest.raises(NotFoundError):
        location.walk()


def test_missing_path(backend: Backend) -> None:
    with pytest.raises(NotFoundError, match="no such file or folder") as info:
        backend.location("does/not/exist").walk()
    assert info.value.exit_code == 3
    assert "does/not/exist" in str(info.value)


def test_file_where_a_folder_was_expected(run: tuple[Location, dict[str, bytes]], backend: Backend) -> None:
    with pytest.raises(NotADirectoryRunError):
        backend.location("run/latest").walk()


@pytest.mark.parametrize("backend", ["s3", "gcs"], indirect=True)
def test_missing_bucket_is_named(backend: Backend) -> None:
    location = Location.from_url(backend.url + "-nope/run", dict(backend.options))
    with pytest.raises(NoSuchBucketError, match="no such bucket") as info:
        location.walk()
    assert info.value.code == "no_such_bucket"
    with pytest.raises(NoSuchBucketError):
        location.read_bytes("latest")


def test_unreachable_endpoint_is_one_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "config_kwargs": {"retries": {"max_attempts": 1}}}
    location = Location.from_url("s3://bucket/run", options)
    location.fs.retries = 1
    with pytest.raises(StorageUnavailableError, match="cannot reach the store"):
        location.walk()


def test_backend_not_installed_names_the_extra() -> None:
    with pytest.raises(BackendNotInstalledError) as info:
        Location.from_url("hdfs://namenode/run")
    assert "hdfs://" in str(info.value)


def test_storage_options_parse_json_and_nesting() -> None:
    parsed = parse_storage_options(
        ["anon=true", "endpoint_url=http://x:1", "client_kwargs.region_name=eu", "n=3"]
    )
    assert parsed == {
        "anon": True,
        "endpoint_url": "http://x:1",
        "client_kwargs": {"region_name": "eu"},
        "n": 3,
    }
    with pytest.raises(UsageError):
        parse_storage_options(["novalue"])
