"""A tiny S3 endpoint in front of moto that plays a store with less checksum support (issue 18's levels).

``reject``: answers 501 NotImplemented to any request naming CRC64NVME (OpenStack Swift's s3api does);
``ignore``: drops every checksum header and element on the way in and out (Ceph <= 19, older MinIO);
``validate``: refuses a body whose CRC64NVME header does not match it, as AWS does (moto keeps any value);
``pass``: forwards as it is.
In every mode but ``pass`` a body that does not match its Content-MD5 or its signed SHA256 payload hash is
refused (400 BadDigest / XAmzContentSHA256Mismatch), as Ceph RGW 19 does (moto checks neither).
Everything else is forwarded to the real moto server unchanged; ``seen`` records each request's headers.
``damage_parts``: that many UploadPart bodies to come get a byte changed on arrival (damage on the way).
``on_part``: called as each UploadPart body arrives, before it is forwarded (a test's hook into mid-upload).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_CHECKSUM_ELEMENT = re.compile(rb"<Checksum(?:CRC|SHA|Type|Algorithm)\w*>[^<]*</Checksum\w*>")
_HOP = {"transfer-encoding", "connection", "content-length", "keep-alive"}


def _is_checksum(name: str) -> bool:
    return name.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: Any) -> None:
        return None

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items()}
        self.server.seen.append((self.command, self.path, {k.lower(): v for k, v in headers.items()}))
        mode = self.server.mode
        if mode == "reject" and any("crc64nvme" in f"{k}:{v}".lower() for k, v in headers.items()):
            self._reply(
                501,
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                b"<Message>CRC64NVME is not implemented</Message></Error>",
                [("Content-Type", "application/xml")],
            )
            return
        if body and "partNumber=" in self.path and self.server.on_part is not None:
            self.server.on_part()
        if body and "partNumber=" in self.path and self.server.damage_parts > 0:
            self.server.damage_parts -= 1
            body = bytes([body[0] ^ 0x01]) + body[1:]
        refused = self.command == "PUT" and _refusal(mode, {k.lower(): v for k, v in headers.items()}, body)
        if refused:
            self._reply(
                400,
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>'
                + refused.encode()
                + b"</Code></Error>",
                [("Content-Type", "application/xml")],
            )
            return
        if mode == "ignore":
            headers = {k: v for k, v in headers.items() if not _is_checksum(k)}
            body = _CHECKSUM_ELEMENT.sub(b"", body)
        headers = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            out = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP]
        finally:
            upstream.close()
        if mode == "ignore":
            out = [(k, v) for k, v in out if not _is_checksum(k)]
            data = _CHECKSUM_ELEMENT.sub(b"", data)
        self._reply(response.status, data, out)

    def _reply(self, status: int, data: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def _refusal(mode: str, headers: dict[str, str], body: bytes) -> str | None:
    """The error code a checking store answers a body with that does not match its digests, or None."""
    if mode == "pass" or not body:
        return None
    md5 = headers.get("content-md5")
    if md5 and base64.b64decode(md5) != hashlib.md5(body, usedforsecurity=False).digest():
        return "BadDigest"
    signed = headers.get("x-amz-content-sha256", "")
    if re.fullmatch(r"[0-9a-f]{64}", signed) and signed != hashlib.sha256(body).hexdigest():
        return "XAmzContentSHA256Mismatch"
    crc = headers.get("x-amz-checksum-crc64nvme")
    if mode == "validate" and crc:
        from awscrt import checksums

        if base64.b64decode(crc) != checksums.crc64nvme(body).to_bytes(8, "big"):
            return "BadDigest"
    return None


@contextmanager
def s3_stub(upstream_endpoint: str, mode: str) -> Iterator[Any]:
    """Serve the stub on 127.0.0.1 for the block; yields the server (``.endpoint``, ``.seen``)."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mode = mode
    server.upstream_port = int(upstream_endpoint.rsplit(":", 1)[1])
    server.seen = []
    server.damage_parts = 0
    server.on_part = None
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
