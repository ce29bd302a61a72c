"""What storage writes, and where: never where it reads, never through a link, with the modes ``open()`` gives,
and the run lock gone once released (issue 15 "Data written where it must not be", issue 14 item 12, issue 16).

Real files in tmp_path, real moto and GCS emulator locations; nothing is mocked.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ckptctl.errors import LockedError, OutputOverlapsInputError, UnsafeTargetError
from ckptctl.storage import Location
from ckptctl.storage.atomic import atomic_write_local, create_new_file
from ckptctl.storage.location import refuse_overlap
from ckptctl.storage.lock import LOCK_NAME, run_lock
from tests.conftest import Backend, make_backend
from tests.snapshots import snapshot


def umask_now() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- where two locations meet ----------------------------------------------------------------------------------
def local(path: Path | str) -> Location:
    return Location.from_url(str(path))


def test_local_relations_by_path_link_and_inode(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "ck").mkdir(parents=True)
    (run / "ck" / "w.safetensors").write_bytes(b"w")
    (tmp_path / "run2").mkdir()
    (tmp_path / "link").symlink_to(run)
    os.link(run / "ck" / "w.safetensors", tmp_path / "hard.safetensors")

    assert local(run).relation_to(local(run)) == "same"
    assert local(run / "ck" / "new").relation_to(local(run)) == "inside"  # need not exist
    assert local(tmp_path).relation_to(local(run / "ck")) == "contains"
    assert local(tmp_path / "run2").relation_to(local(run)) is None  # a common prefix is not a folder
    assert local(tmp_path / "link" / "ck").relation_to(local(run)) == "inside"  # through a link
    assert local(tmp_path / "run2" / ".." / "run").relation_to(local(run)) == "same"
    assert local(tmp_path / "hard.safetensors").relation_to(local(run / "ck" / "w.safetensors")) == "same"
    assert local(run).relation_to(local("/")) == "inside"


def test_remote_relations_compare_protocol_bucket_and_whole_segments(tmp_path: Path, request) -> None:
    s3: Backend = make_backend("s3", tmp_path, request)
    gcs: Backend = make_backend("gcs", tmp_path, request)
    assert s3.location("run").relation_to(s3.location("run")) == "same"
    assert s3.location("run/checkpoint-1").relation_to(s3.location("run")) == "inside"
    assert s3.location("").relation_to(s3.location("run")) == "contains"  # the bucket holds the run
    assert s3.location("run2").relation_to(s3.location("run")) is None
    s3a = Location.from_url(s3.url.replace("s3://", "s3a://") + "/run/x", dict(s3.options))
    assert s3a.relation_to(s3.location("run")) == "inside"  # s3a:// is s3://
    assert gcs.location("run").relation_to(gcs.location("run/a")) == "contains"
    other_bucket = s3.url + "-other"
    assert Location.from_url(f"{other_bucket}/run", dict(s3.options)).relation_to(s3.location("run")) is None
    assert s3.location("run").relation_to(gcs.location("run")) is None  # another store
    assert s3.location("run").relation_to(local(tmp_path)) is None
    memory = Location.from_url("memory://safety/run")
    assert memory.relation_to(Location.from_url("memory://safety/run/sub")) == "contains"


def test_refuse_overlap_names_both_paths(tmp_path: Path) -> None:
    with pytest.raises(OutputOverlapsInputError) as caught:
        refuse_overlap(
            local(tmp_path / "a" / "b"), local(tmp_path / "a"), output_role="OUT", source_role="SRC"
        )
    assert caught.value.exit_code == 2 and caught.value.code == "output_overlaps_input"
    assert f"OUT {tmp_path / 'a' / 'b'} lies inside SRC {tmp_path / 'a'}" in caught.value.message
    refuse_overlap(local(tmp_path / "b"), local(tmp_path / "a"), output_role="OUT", source_role="SRC")


# -- atomic writes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_files_get_the_mode_open_gives_under_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        atomic_write_local(str(tmp_path / "sub" / "model.safetensors"), b"weights")
        local(tmp_path).write_bytes("latest", b"checkpoint-100")
        with open(tmp_path / "reference", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(old)
    expected = 0o666 & ~mask
    for name in ("sub/model.safetensors", "latest", "reference"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert not [p for p in tmp_path.rglob(".ckptctl-tmp-*")]


def test_an_atomic_write_replaces_a_link_and_leaves_its_target_alone(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone else's file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").symlink_to(victim)
    local(run).write_bytes("latest", b"checkpoint-100")
    assert victim.read_bytes() == b"someone else's file"
    assert not (run / "latest").is_symlink() and (run / "latest").read_bytes() == b"checkpoint-100"


def test_create_new_file_never_opens_what_is_there(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "link").symlink_to(victim)
    for name in ("dangling", "link", "victim.txt"):
        with pytest.raises(UnsafeTargetError):
            create_new_file(str(tmp_path / name))
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "nowhere").exists()
    with create_new_file(str(tmp_path / "fresh")) as handle:
        handle.write(b"new")
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o666 & ~umask_now()


# -- the run lock ------------------------------------------------------------------------------------------------
def test_the_lock_file_is_gone_after_release(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    before = snapshot(run)
    with run_lock(local(run)):
        assert (run / LOCK_NAME).is_file()
        with pytest.raises(LockedError), run_lock(local(run)):
            pass
        assert (run / LOCK_NAME).is_file()  # a refused second holder removes nothing
    assert snapshot(run) == before
    (run / LOCK_NAME).write_text("old-host pid 1\n")  # left by an earlier ckptctl: taken over, then removed
    with run_lock(local(run)):
        pass
    assert snapshot(run) == before


def test_removing_the_lock_never_lets_two_holders_in(tmp_path: Path) -> None:
    """Many threads take and release the lock as fast as they can (each opens its own file description, so their
    flocks conflict as two processes' would). Removing the file on release opens a race (a waiter locks the
    unlinked file while a newcomer creates a new one); the inode check on acquire must close it."""
    run = tmp_path / "run"
    run.mkdir()
    location = local(run)
    inside = 0
    most = 0
    taken = 0
    guard = threading.Lock()
    stop = time.monotonic() + 3

    def worker() -> None:
        nonlocal inside, most, taken
        while time.monotonic() < stop:
            try:
                with run_lock(location):
                    with guard:
                        inside += 1
                        most = max(most, inside)
                        taken += 1
                    time.sleep(0.0001)
                    with guard:
                        inside -= 1
            except LockedError:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert taken > 100
    assert most == 1
    assert not (run / LOCK_NAME).exists()


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious" * 100)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(victim)
    (run / "dangling").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeTargetError) as caught, run_lock(local(run)):
        pass
    assert caught.value.exit_code == 4 and "symbolic link" in caught.value.message
    assert snapshot(tmp_path) == before


def test_a_hard_linked_lock_or_a_fifo_is_refused_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    run = tmp_path / "run"
    run.mkdir()
    os.link(victim, run / LOCK_NAME)
    with pytest.raises(UnsafeTargetError, match="hard link"), run_lock(local(run)):
        pass
    assert victim.read_bytes() == b"precious" and (run / LOCK_NAME).exists()
    (run / LOCK_NAME).unlink()
    os.mkfifo(run / LOCK_NAME)
    with pytest.raises(UnsafeTargetError, match="not a regular file"), run_lock(local(run)):
        pass
    assert (run / LOCK_NAME).exists()


def test_a_remote_lease_leaves_nothing_behind(tmp_path: Path, request) -> None:
    s3: Backend = make_backend("s3", tmp_path, request)
    run = s3.location("run")
    run.write_bytes("checkpoint-1/model.safetensors", b"w")
    with run_lock(run):
        assert run.exists(LOCK_NAME)
    assert not run.exists(LOCK_NAME)
