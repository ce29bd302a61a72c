from __future__ import annotations

from pathlib import Path

from tests.conftest import Backend


def test_walk_sees_uploaded_files(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "x.bin").write_bytes(b"12345")
    (src / "top.txt").write_bytes(b"hi")
    backend.put_tree(src, "run")
    entries = {e.path: e for e in backend.location("run").walk()}
    assert entries["a/b/x.bin"].size == 5
    assert entries["a/b/x.bin"].type == "file"
    assert entries["a/b/x.bin"].mtime is not None
    assert entries["top.txt"].size == 2
