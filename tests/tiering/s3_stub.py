"""A tiny S3 endpoint in front of moto that plays a store with less checksum support (issue 18's levels).

``reject``: answers 501 NotImplemented to any request naming CRC64NVME (OpenStack Swift's s3api does);
``ignore``: drops every checksum header and element on the way in and out (Ceph <= 19, older MinIO).
Everything else is forwarded to the real moto server unchanged; ``seen`` records each request's headers.
"""

from __future__ import annotations

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


@contextmanager
def s3_stub(upstream_endpoint: str, mode: str) -> Iterator[Any]:
    """Serve the stub on 127.0.0.1 for the block; yields the server (``.endpoint``, ``.seen``)."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.mode = mode
    server.upstream_port = int(upstream_endpoint.rsplit(":", 1)[1])
    server.seen = []
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
