"""A location's parent, name and top, and what counts as a URL: the only place outside fsspec that knows paths."""

from __future__ import annotations

import pytest

from ckptctl.storage.location import is_url
from tests.conftest import Backend


def test_parent_reads_the_folder_holding_a_file(backend: Backend, tmp_path) -> None:
    """inspect FILE and extract-lora look beside a file (its config.json, its adapter_config.json) through
    ``parent()``: the parent must read what the folder holds, on every store, and name it by the typed URL."""
    src = tmp_path / "run"
    (src / "checkpoint-5").mkdir(parents=True)
    (src / "checkpoint-5" / "model.safetensors").write_bytes(b"x" * 10)
    (src / "checkpoint-5" / "config.json").write_bytes(b"{}")
    url = backend.put_tree(src, "run")
    file_location = backend.location("run/checkpoint-5/model.safetensors")
    folder = file_location.parent()
    assert file_location.name == "model.safetensors"
    assert folder.name == "checkpoint-5"
    assert folder.url == f"{url}/checkpoint-5"
    assert folder.read_bytes("config.json") == b"{}"
    assert folder.parent().url == url
    assert not folder.at_top


def test_an_object_store_bucket_is_the_top(backend: Backend) -> None:
    """The search for an adapter config walks up at most to the bucket, never to a listing of all buckets."""
    if backend.name not in ("s3", "gcs"):
        pytest.skip("buckets are an object-store notion")
    bucket = backend.location()
    assert bucket.at_top
    assert bucket.parent() is bucket
    assert not backend.location("run").at_top
    assert backend.location("run").parent().url == backend.url


def test_a_local_root_is_the_top() -> None:
    from ckptctl.storage.location import Location

    root = Location.from_url("/")
    assert root.at_top and root.parent() is root
    assert Location.from_url("/tmp").parent().url == "/"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket/run", True),
        ("gs://b/x", True),
        ("memory://run", True),
        ("file:///tmp/run", False),
        ("/data/run", False),
        ("out/a://b", False),
        ("relative", False),
    ],
)
def test_is_url_tells_stores_from_local_paths(text: str, expected: bool) -> None:
    """extract-lora refuses a URL OUT_DIR (it writes locally); a local folder whose name holds '://' is local."""
    assert is_url(text) is expected
