"""Credentials on the S3 data path (issue 18): refreshed as botocore refreshes them, never frozen at start-up;
explicit keys, a profile and anonymous access still reach it. A stub endpoint in front of moto records which
access key signed each request (moto accepts any)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from ckptctl.storage import Location
from ckptctl.storage.s3_data import S3DataPath
from tests.conftest import Backend, Server
from tests.tiering.s3_stub import s3_stub
from tests.tiering.test_tier import make_s3

MiB = 2**20
_CREDENTIAL = re.compile(r"Credential=([^/]+)/")

# Short-lived credentials, as an SSO or assume-role helper hands out: a new key on every call, counted, expiring
# 15 min + 2 s ahead (botocore renews credentials 15 min before they expire, so these are due in 2 s).
PROCESS = """#!/bin/sh
n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 ))
echo $n > {count}
expires=$(date -u -d "@$(( $(date +%s) + 902 ))" +%Y-%m-%dT%H:%M:%SZ)
printf '{{"Version": 1, "AccessKeyId": "AKIDPROCESS%04d", "SecretAccessKey": "secret%d", \
"SessionToken": "token%d", "Expiration": "%s"}}' $n $n $n $expires
"""


@pytest.fixture
def backend(moto_server: Server) -> Backend:
    return make_s3(moto_server)  # (with the session's keys, before the environment loses them)


@pytest.fixture
def aws_config(backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An AWS config of the test's own, and no keys in the environment."""
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return config


def keys_of_puts(stub, rel: str) -> list[str]:
    """The access keys that signed the PutObject/UploadPart requests of ``rel``."""
    return [
        match.group(1)
        for method, path, headers in stub.seen
        if method == "PUT"
        and path.split("?")[0].endswith(rel)
        and (match := _CREDENTIAL.search(headers.get("authorization", "")))
    ]


def upload(data: S3DataPath, tmp_path: Path, rel: str) -> None:
    source = tmp_path / rel
    source.write_bytes(rel.encode() * 1000)
    data.upload(str(source), rel, part_size=5 * MiB, jobs=1, on_bytes=lambda _: None)


def test_credentials_from_a_process_are_refreshed_before_they_expire(
    moto_server: Server, backend: Backend, tmp_path: Path, aws_config: Path
) -> None:
    count = tmp_path / "calls"
    script = tmp_path / "credentials.sh"
    script.write_text(PROCESS.format(count=count))
    script.chmod(0o755)
    aws_config.write_text(f"[profile short-lived]\ncredential_process = {script}\nregion = us-east-1\n")
    with s3_stub(moto_server.endpoint, "pass") as stub:
        location = Location.from_url(
            f"{backend.url}/run", {"endpoint_url": stub.endpoint, "profile": "short-lived"}
        )
        data = S3DataPath(location, 2)
        upload(data, tmp_path, "first")
        calls = int(count.read_text())
        time.sleep(2.5)  # the credentials are now due for renewal
        upload(data, tmp_path, "second")
        assert location.read_bytes("second") == b"second" * 1000
    first, second = keys_of_puts(stub, "/run/first"), keys_of_puts(stub, "/run/second")
    assert first and second and first[0].startswith("AKIDPROCESS")
    # The second upload, by the same data path, was signed with credentials fetched after the first.
    assert int(second[0].removeprefix("AKIDPROCESS")) > int(first[0].removeprefix("AKIDPROCESS"))
    assert int(count.read_text()) > calls


def test_explicit_keys_a_profile_and_anonymous_access_reach_the_data_path(
    moto_server: Server, backend: Backend, tmp_path: Path, aws_config: Path
) -> None:
    (tmp_path / "aws-credentials").write_text(
        "[static]\naws_access_key_id = AKIDFROMPROFILE\naws_secret_access_key = profile-secret\n"
    )
    with s3_stub(moto_server.endpoint, "pass") as stub:
        cases = {
            "explicit": {"key": "AKIDEXPLICIT", "secret": "s", "token": "session-token"},
            "profile": {"profile": "static"},
            "anonymous": {"anon": True},
        }
        for name, options in cases.items():
            location = Location.from_url(f"{backend.url}/run", {"endpoint_url": stub.endpoint, **options})
            upload(S3DataPath(location, 2), tmp_path, name)
        puts = {
            name: [
                h for method, path, h in stub.seen if method == "PUT" and path.split("?")[0].endswith(name)
            ]
            for name in cases
        }
    assert keys_of_puts(stub, "/run/explicit") == ["AKIDEXPLICIT"]
    assert puts["explicit"][0]["x-amz-security-token"] == "session-token"
    assert keys_of_puts(stub, "/run/profile") == ["AKIDFROMPROFILE"]
    assert len(puts["anonymous"]) == 1 and "authorization" not in puts["anonymous"][0]
