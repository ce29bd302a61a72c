"""An upload never follows a link: a file swapped for a symlink after the scan saw a regular file (a race, or a
hostile user sharing the run folder) is refused when it is opened, on every store, instead of sending what the
link points to (``/etc/shadow``, another user's checkpoint)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ckptctl.storage import Location
from ckptctl.storage.transfer import digest_local_file, upload
from tests.conftest import Backend


def test_a_file_swapped_for_a_link_is_not_sent(backend: Backend, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the store")
    swapped = tmp_path / "model.safetensors"
    os.symlink(secret, swapped)
    remote = backend.location("remote")
    with pytest.raises(OSError) as caught:
        upload(str(swapped), remote, "model.safetensors", part_size=5 * 2**20, jobs=1)
    assert caught.value.errno == errno.ELOOP
    assert not remote.exists("model.safetensors")
    # The same file, regular, goes: the refusal is the link's, not the path's.
    swapped.unlink()
    swapped.write_bytes(b"weights")
    upload(str(swapped), remote, "model.safetensors", part_size=5 * 2**20, jobs=1)
    assert remote.read_bytes("model.safetensors") == b"weights"


def test_a_local_digest_does_not_follow_a_link(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"x")
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(OSError) as caught:
        digest_local_file(str(tmp_path / "link"))
    assert caught.value.errno == errno.ELOOP
    assert Location.from_url(str(tmp_path)).exists("target")
