"""Issue 18: v2 manifests (full-object CRC64NVME + CRC32C), the botocore data path, store levels A/B/C, and v1
manifests already in buckets. Against real stores (local, memory://, moto with awscrt + crc32c, the GCS
emulator) and a stub S3 endpoint in front of moto for the levels moto does not play; never a mock.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ckptctl.catalog.scan import scan_run
from ckptctl.errors import IntegrityError
from ckptctl.storage import Location
from ckptctl.storage.atomic import create_new_file
from ckptctl.storage.checksums import Hasher, digest_of
from ckptctl.storage.location import parse_storage_options
from ckptctl.storage.s3_data import S3DataPath, build_client
from ckptctl.storage.transfer import MiB, digest_local_file, open_data_path, pending_uploads
from ckptctl.tiering.manifest import LEVEL_PROBE, Manifest, ManifestFile, manifest_rel, remote_view
from ckptctl.tiering.pull import pull, pull_run
from ckptctl.tiering.push import PushOptions, push
from ckptctl.tiering.status import tier_status
from tests.conftest import Backend, Server
from tests.tiering.s3_stub import s3_stub
from tests.tiering.test_tier import make_run, make_s3, tree


def _unit_tree(run: Path, unit: str) -> dict[str, bytes]:
    return {k.split("/", 1)[1]: v for k, v in tree(run).items() if k.startswith(f"{unit}/")}


def _s3_client(location: Location) -> object:
    return location.fs


# -- v1 manifests already in buckets ------------------------------------------------------------------------
def _push_with_v1_writer(run: Path, remote: Location, part_size: int) -> None:
    """What ckptctl before issue 18 left in a bucket: every file uploaded (S3: in parts of ``part_size`` when
    larger, so the ETag is md5(part md5s)-N), then a version-1 manifest with those MD5 digests."""
    for unit in scan_run(Location.from_url(str(run)), settle_seconds=0).units:
        files = []
        for item in unit.files:
            local = str(run / item.path)
            size = os.path.getsize(local)
            multipart = remote.protocol == "s3" and size > part_size
            if multipart:  # boto3 in parts of part_size, as the v1 writer sent them
                import boto3
                from boto3.s3.transfer import TransferConfig

                bucket, key, _ = remote.fs.split_path(remote.full_path(item.path))
                config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)
                client = boto3.client("s3", endpoint_url=remote.fs.endpoint_url)
                client.upload_file(local, bucket, key, Config=config)
            else:
                remote.write_bytes(item.path, Path(local).read_bytes())
            digest = digest_local_file(local, part_size if multipart else 0).etag
            files.append(ManifestFile(item.path, size, digest, part_size if multipart else None, item.mtime))
        manifest = Manifest(unit.path, unit.kind, unit.step, unit.layout.value, tuple(files), str(run))
        encoded = manifest.encode()
        assert json.loads(encoded)["ckptctl_manifest_version"] == 1
        remote.write_bytes(manifest_rel(unit.path), encoded)


def test_a_bucket_pushed_with_v1_manifests_is_read_verified_and_pulled(
    backend: Backend, tmp_path: Path
) -> None:
    size = 12 * MiB if backend.name == "s3" else 300_000
    run = make_run(tmp_path / "run", steps=(100, 200), size=size, incomplete=None)
    remote = backend.location("remote")
    _push_with_v1_writer(run, remote, 5 * MiB)
    local = Location.from_url(str(run))

    rows = {r.path: r for r in tier_status(local, remote, reread=True, settle_seconds=0)}
    assert rows["checkpoint-100"].remote == rows["checkpoint-200"].remote == "verified"
    assert rows["checkpoint-100"].store_level is None
    if backend.name in ("s3", "gcs"):  # the store's MD5 (ETag, md5Hash) says so from the listing alone
        assert {r.remote for r in tier_status(local, remote, settle_seconds=0) if r.step} >= {"verified"}
    assert push(local, remote, PushOptions(settle_seconds=0)).counts["already"] == 2

    restored = tmp_path / "restored"
    result = pull_run(remote, str(restored), jobs=3)
    assert not result.failed and tree(restored) == tree(run)
    # A changed object under a v1 manifest is still caught by its MD5.
    victim = "checkpoint-200/optimizer.pt"
    data = bytearray(remote.read_bytes(victim, max_bytes=64 * MiB))
    data[10] ^= 0xFF
    remote.write_bytes(victim, bytes(data))
    with pytest.raises(IntegrityError):
        pull(remote, str(tmp_path / "again"), step=200)
    assert not (tmp_path / "again").exists()


# -- v2 manifests and planted checksums ----------------------------------------------------------------------
def test_push_writes_v2_manifests_and_a_planted_checksum_is_caught(backend: Backend, tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=(100, 200), incomplete=None)
    local, remote = Location.from_url(str(run)), backend.location("remote")
    push(local, remote, PushOptions(settle_seconds=0))
    raw = json.loads(remote.read_bytes(manifest_rel("checkpoint-100")))
    assert raw["ckptctl_manifest_version"] == 2
    expected = {"s3": "A", "gcs": "crc32c"}.get(backend.name)
    assert raw["store_level"] == expected
    weights = run / "checkpoint-100" / "model.safetensors"
    entry = next(f for f in raw["files"] if f["path"] == "checkpoint-100/model.safetensors")
    ours = digest_local_file(str(weights)).digest
    assert (entry["size"], entry["crc64nvme"], entry["crc32c"]) == (
        ours.size,
        ours.crc64nvme_b64,
        ours.crc32c_b64,
    )
    rows = {r.path: r for r in tier_status(local, remote, settle_seconds=0)}
    assert rows["checkpoint-100"].to_dict()["store_level"] == expected

    # A manifest whose CRC is not the object's: status --verify and pull both refuse it.
    other = digest_of(b"something else")
    entry["crc64nvme"], entry["crc32c"] = other.crc64nvme_b64, other.crc32c_b64
    remote.write_bytes(manifest_rel("checkpoint-100"), json.dumps(raw).encode())
    rows = {r.path: r for r in tier_status(local, remote, reread=True, settle_seconds=0)}
    assert rows["checkpoint-100"].remote == "corrupt" and rows["checkpoint-200"].remote == "verified"
    assert "model.safetensors" in rows["checkpoint-100"].problems[0]
    dest = tmp_path / "back"
    with pytest.raises(IntegrityError, match="CRC64NVME"):
        pull(remote, str(dest), step=100)
    assert not dest.exists()
    pull(remote, str(dest), step=200)
    assert tree(dest) == _unit_tree(run, "checkpoint-200")


def test_s3_an_object_holding_a_wrong_crc64nvme_is_caught_by_status_verify(
    moto_server: Server, tmp_path: Path
) -> None:
    backend = make_s3(moto_server)
    run = make_run(tmp_path / "run", steps=(100,), incomplete=None)
    local, remote = Location.from_url(str(run)), backend.location("remote")
    push(local, remote, PushOptions(settle_seconds=0))
    fs = remote.fs
    bucket, key, _ = fs.split_path(remote.full_path("checkpoint-100/optimizer.pt"))
    body = (run / "checkpoint-100" / "optimizer.pt").read_bytes()
    # moto stores whatever checksum a client claims: the store now says these bytes have another CRC.
    fs.call_s3(
        "put_object",
        Bucket=bucket,
        Key=key,
        Body=body,
        ChecksumAlgorithm="CRC64NVME",
        ChecksumCRC64NVME=digest_of(b"planted").crc64nvme_b64,
    )
    rows = tier_status(local, remote, reread=True, settle_seconds=0)
    assert rows[0].remote == "corrupt" and "CRC64NVME" in rows[0].problems[0]


# -- the botocore data path ---------------------------------------------------------------------------------
def test_storage_options_reach_the_data_path(moto_server: Server) -> None:
    from botocore import UNSIGNED

    options = parse_storage_options(
        [
            f"endpoint_url={moto_server.endpoint}",
            "key=AKIDFROMOPTIONS",
            "secret=secret-from-options",
            "client_kwargs.region_name=eu-west-3",
            "client_kwargs.verify=false",
            "config_kwargs.s3.addressing_style=path",
            "config_kwargs.retries.max_attempts=7",
            "requester_pays=true",
            "s3_additional_kwargs.ServerSideEncryption=AES256",
        ]
    )
    location = Location.from_url("s3://bucket-options/run", options)
    data = S3DataPath(location, 6)
    client = data.client
    assert client.meta.endpoint_url == moto_server.endpoint
    assert client.meta.region_name == "eu-west-3"
    config = client.meta.config
    assert config.s3["addressing_style"] == "path" and config.retries["total_max_attempts"] == 8
    assert config.request_checksum_calculation == "when_required"
    assert client._request_signer._credentials.access_key == "AKIDFROMOPTIONS"
    assert client._endpoint.http_session._verify is False
    assert data._request_payer == {"RequestPayer": "requester"}
    assert data._extra == {"ServerSideEncryption": "AES256"}

    anonymous = Location.from_url(
        "s3://bucket-anon/run", {"endpoint_url": moto_server.endpoint, "anon": True}
    )
    assert build_client(anonymous.fs, 2).meta.config.signature_version is UNSIGNED


def test_signed_bodies_are_hashed_by_botocores_signer_not_through_awscrt(moto_server: Server) -> None:
    # awscrt's signer, botocore's choice whenever awscrt is installed, pulls a signed body through Python
    # callbacks (1.14 CPU s/GiB against 0.68 for hashlib): the data path signs with botocore's own.
    import botocore.auth

    location = make_s3(moto_server).location("remote")
    data = S3DataPath(location, 2)
    body = os.urandom(3 * MiB)
    bucket, key = data.split("signed-blob")
    seen: list[tuple[object, str]] = []

    def spy(request_signer: object, operation_name: str, signature_version: str, **_: object) -> None:
        seen.append((botocore.auth.AUTH_TYPE_MAPS[signature_version], operation_name))

    sent: list[bytes] = []
    for kind in ("signed", "plain"):
        client = data._client_for(kind)
        client.meta.events.register("before-sign.s3", spy)
        client.meta.events.register(
            "before-send.s3.PutObject",
            lambda request, **_: sent.append(request.headers["X-Amz-Content-SHA256"]),
        )
        client.put_object(Bucket=bucket, Key=key, Body=body)
        assert location.read_bytes("signed-blob") == body
    assert {signer for signer, _ in seen} == {botocore.auth.S3SigV4Auth}
    assert sent == [hashlib.sha256(body).hexdigest().encode(), b"UNSIGNED-PAYLOAD"]


def test_sse_option_reaches_the_uploaded_objects(moto_server: Server, tmp_path: Path) -> None:
    backend = make_s3(moto_server)
    run = make_run(tmp_path / "run", steps=(100,), size=12 * MiB, incomplete=None)
    options = {**backend.options, "s3_additional_kwargs": {"ServerSideEncryption": "AES256"}}
    remote = Location.from_url(f"{backend.url}/remote", options)
    push(Location.from_url(str(run)), remote, PushOptions(settle_seconds=0, part_size=5 * MiB))
    fs = remote.fs
    for name in ("model.safetensors", "optimizer.pt"):  # multipart and single PUT
        bucket, key, _ = fs.split_path(remote.full_path(f"checkpoint-100/{name}"))
        assert fs.call_s3("head_object", Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"


def test_s3_ranged_download_combines_range_crcs_in_offset_order(moto_server: Server, tmp_path: Path) -> None:
    backend = make_s3(moto_server)
    remote = backend.location("remote")
    payload = os.urandom(12 * MiB + 5)
    remote.write_bytes("blob", payload)
    data = open_data_path(remote, 3)
    assert data is not None
    target = tmp_path / "blob"
    with create_new_file(str(target)) as sink:
        sink.truncate(len(payload))
        got: Hasher = data.download("blob", sink.fileno(), size=len(payload), range_size=5 * MiB, jobs=3)
    assert got.digest == digest_of(payload) and target.read_bytes() == payload


# -- store levels A, B and C (stub endpoints in front of moto) -------------------------------------------------
def _stub_remote(backend: Backend, stub: object) -> Location:
    # Such stores need s3fs's own requests without botocore's default checksums, as any client does.
    options = {
        "endpoint_url": stub.endpoint,
        "config_kwargs": {"request_checksum_calculation": "when_required"},
    }
    return Location.from_url(f"{backend.url}/remote", options)


def _data_bodies(stub: object) -> list[dict[str, str]]:
    """Headers of the PutObject and UploadPart requests of the checkpoints' data files."""
    return [
        h
        for method, path, h in stub.seen
        if method == "PUT" and "/remote/checkpoint-" in path and path.split("?")[0].endswith(".safetensors")
    ]


# mode -> (level, what guards each data body, notes): ``validate`` plays AWS (refuses a body that does not
# match its CRC64NVME), ``ignore`` Ceph RGW 19 (keeps no checksum, checks Content-MD5 and signed payloads),
# ``reject`` Swift's s3api (501 to checksum headers), ``pass`` moto itself (keeps our value, checks nothing).
LEVELS = {
    "validate": ("A", "crc64nvme", 0),
    "ignore": ("B", "sha256", 0),
    "reject": ("C", "sha256", 1),
    "pass": ("A", "crc64nvme", 1),
}


@pytest.mark.parametrize("mode", sorted(LEVELS))
def test_the_store_level_is_probed_before_the_first_file_and_every_body_is_guarded(
    moto_server: Server, tmp_path: Path, mode: str
) -> None:
    level, guard, notes = LEVELS[mode]
    backend = make_s3(moto_server)
    run = make_run(tmp_path / "run", steps=(100, 200), size=12 * MiB, incomplete=None)
    local = Location.from_url(str(run))
    with s3_stub(moto_server.endpoint, mode) as stub:
        remote = _stub_remote(backend, stub)
        result = push(local, remote, PushOptions(settle_seconds=0, part_size=5 * MiB, jobs=2))
        assert not result.failed and result.store_level == level
        assert len(result.notes) == notes, result.notes
        assert {m.store_level for m in remote_view(remote).manifests.values()} == {level}
        # The probe went to its own key and is gone; no checkpoint file was read back.
        probes = [path for method, path, _ in stub.seen if method == "PUT" and LEVEL_PROBE in path]
        assert probes and not remote.exists(LEVEL_PROBE)
        assert not [
            p for method, p, _ in stub.seen if method == "GET" and p.split("?")[0].endswith(".safetensors")
        ]
        bodies = _data_bodies(stub)
        assert len(bodies) == 2 * 3  # two files of three 5 MiB parts, each sent once
        for headers in bodies:
            signed = headers.get("x-amz-content-sha256", "")
            if guard == "crc64nvme":
                assert headers.get("x-amz-checksum-crc64nvme") and signed == "UNSIGNED-PAYLOAD"
            else:  # signed payloads: cheaper than Content-MD5, and this store refuses one that does not match
                assert "x-amz-checksum-crc64nvme" not in headers and len(signed) == 64
        rows = tier_status(local, remote, reread=True, settle_seconds=0)
        assert [r.remote for r in rows] == ["verified", "verified"]
        dest = tmp_path / "back"
        pull(remote, str(dest), step=200, jobs=2)
        assert tree(dest) == _unit_tree(run, "checkpoint-200")


@pytest.mark.parametrize("mode", ["validate", "ignore"])
def test_a_part_damaged_on_the_way_is_refused_and_sent_again_never_skipped(
    moto_server: Server, tmp_path: Path, mode: str
) -> None:
    backend = make_s3(moto_server)
    run = make_run(tmp_path / "run", steps=(100,), size=12 * MiB, incomplete=None)
    local = Location.from_url(str(run))
    with s3_stub(moto_server.endpoint, mode) as stub:
        remote = _stub_remote(backend, stub)
        stub.damage_parts = 2
        result = push(local, remote, PushOptions(settle_seconds=0, part_size=5 * MiB, jobs=1))
        assert not result.failed and stub.damage_parts == 0
        assert len(_data_bodies(stub)) == 3 + 2  # three parts, two of them sent again
        dest = tmp_path / "back"
        pull(remote, str(dest), step=100, jobs=2)
        assert tree(dest) == _unit_tree(run, "checkpoint-100")


def test_a_file_that_shrinks_while_its_parts_are_sent_is_refused_and_nothing_is_kept(
    moto_server: Server, tmp_path: Path
) -> None:
    backend = make_s3(moto_server)
    run = make_run(tmp_path / "run", steps=(100,), size=12 * MiB, incomplete=None)
    weights = run / "checkpoint-100" / "model.safetensors"
    with s3_stub(moto_server.endpoint, "validate") as stub:
        remote = _stub_remote(backend, stub)
        stub.on_part = lambda: os.truncate(weights, 6 * MiB)  # part 2 (5-10 MiB) now has 1 MiB to read
        result = push(
            Location.from_url(str(run)), remote, PushOptions(settle_seconds=0, part_size=5 * MiB, jobs=1)
        )
    assert [o.unit.path for o in result.failed] == ["checkpoint-100"]
    assert "shrank" in (result.failed[0].detail or "")
    assert not remote_view(remote).manifests and not remote.exists("checkpoint-100/model.safetensors")
    assert pending_uploads(remote) == []  # the upload was aborted
