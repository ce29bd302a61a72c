"""Shared test fixtures: the shared fixtures folder, real S3 (moto) and GCS (gcp-storage-emulator) servers on
127.0.0.1, and a ``backend`` fixture that runs a test on local disk, memory://, S3 and GCS alike.

The servers are real protocol servers started as subprocesses, never mocks of fsspec. Nothing here reaches
beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Must be set before gcsfs is imported anywhere: without it every gcsfs call against the emulator stalls ~60 s.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ.pop(_proxy, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
# Resumable-upload records (storage/s3_data.py) of killed test pushes go to a folder of this session, not the
# user's ~/.local/state (subprocesses inherit it).
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="ckptctl-test-state-")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """``../shared/fixtures``; a clear skip (never a silent pass) when this checkout has no shared folder."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(
            f"shared fixtures not found at {SHARED_FIXTURES}: clone with ../shared beside the project"
        )
    return SHARED_FIXTURES


def random_payload(size: int) -> bytes:
    """Random bytes that do not end in a carriage return.

    gcp-storage-emulator drops a trailing b"\\r" from a file written with gcsfs ``pipe_file``/``put_file``
    (b"abc\\r" reads back as b"abc"; real GCS keeps it; ckptctl's own uploads go through ``open("wb")``, which
    the emulator stores intact). With plain os.urandom about one file in 256 ends in one, and tests that put
    their runs on the emulator failed at random.
    """
    data = os.urandom(size)
    return data[:-1] + b"\x00" if data.endswith(b"\r") else data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not answer {url} within {timeout}s")


@dataclass
class Server:
    """A protocol server running as a subprocess on 127.0.0.1."""

    name: str
    argv: list[str]
    port: int
    probe: str
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ckptctl-test-{self.name}-{self.port}.log"
        handle = self.log.open("wb")
        self.process = subprocess.Popen(self.argv, stdout=handle, stderr=subprocess.STDOUT)
        _wait_http(self.endpoint + self.probe, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_moto() -> Server:
    port = free_port()
    return Server(
        "moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, "/moto-api/"
    ).start()


def start_gcs() -> Server:
    port = free_port()
    argv = [
        str(BIN / "gcp-storage-emulator"),
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--in-memory",
        "-q",
    ]
    return Server("gcs", argv, port, "/storage/v1/b?project=test").start()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Server]:
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[Server]:
    server = start_gcs()
    yield server
    server.stop()


@dataclass
class Backend:
    """One place to put a test run: ``url`` for the CLI, ``options`` for ``--storage-option``, ``location()``
    for the core, ``put_tree()`` to upload a local folder there."""

    name: str
    url: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def cli_options(self) -> list[str]:
        return [arg for key, value in self.options.items() for arg in ("--storage-option", f"{key}={value}")]

    def location(self, rel: str = ""):
        from ckptctl.storage import Location

        return Location.from_url(f"{self.url}/{rel}" if rel else self.url, dict(self.options))

    def put_tree(self, local: Path, rel: str = "") -> str:
        """Copy every file below ``local`` to ``url/rel`` (symlinks are skipped on object stores); returns the URL."""
        target = f"{self.url}/{rel}" if rel else self.url
        if self.name == "local":
            dest = Path(target)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(local, dest, symlinks=True)
            return target
        location = self.location(rel)
        for path in sorted(local.rglob("*")):
            if path.is_file() and not path.is_symlink():
                location.fs.pipe_file(
                    location.full_path(path.relative_to(local).as_posix()), path.read_bytes()
                )
        return target

    def cli_env(self) -> dict[str, str]:
        return dict(os.environ)


BACKENDS = ["local", "memory", "s3", "gcs"]


def make_backend(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    unique = uuid.uuid4().hex[:10]
    if name == "local":
        root = tmp_path / "store"
        root.mkdir()
        return Backend("local", str(root))
    if name == "memory":
        return Backend("memory", f"memory://ckptctl-test-{unique}")
    if name == "s3":
        server: Server = request.getfixturevalue("moto_server")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        bucket = f"bucket-{unique}"
        fs.mkdir(bucket)
        return Backend("s3", f"s3://{bucket}", {"endpoint_url": server.endpoint})
    if name == "gcs":
        server = request.getfixturevalue("gcs_server")
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        fs = gcsfs.GCSFileSystem(token="anon", project="test", endpoint_url=server.endpoint)
        bucket = f"bucket-{unique}"
        fs.mkdir(bucket)
        return Backend(
            "gcs", f"gs://{bucket}", {"endpoint_url": server.endpoint, "token": "anon", "project": "test"}
        )
    raise ValueError(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Run the test once per storage backend: local disk, memory://, S3 (moto), GCS (emulator)."""
    yield make_backend(request.param, tmp_path, request)
    if request.param == "memory":
        from fsspec.implementations.memory import MemoryFileSystem

        with contextlib.suppress(Exception):
            MemoryFileSystem.store.clear()
            MemoryFileSystem.pseudo_dirs.clear()
            MemoryFileSystem.pseudo_dirs.append("")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, input: str | None = None):
    """Run the real ``ckptctl`` in a subprocess (stdin/stdout not a TTY), as cron would."""
    return subprocess.run(
        [sys.executable, "-m", "ckptctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        input=input if input is not None else "",
    )
