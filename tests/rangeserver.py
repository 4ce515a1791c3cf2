"""A tiny HTTP file server with Range support on 127.0.0.1 that counts the bytes it sends."""

from __future__ import annotations

import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeServer:
    """Serve ``root`` over HTTP on a free loopback port; ``bytes_sent`` counts body bytes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail_ranged = 0  # answer this many ranged GETs with 503 (then recover)
        self.fail_always = False  # answer every ranged GET with 503
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _file(self) -> Path | None:
                rel = self.path.split("?", 1)[0].lstrip("/")
                p = (server.root / rel).resolve()
                if server.root.resolve() not in p.parents or not p.is_file():
                    return None
                return p

            def do_HEAD(self) -> None:  # noqa: N802
                p = self._file()
                with server._lock:
                    server.requests.append(("HEAD", self.path, None))
                if p is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(p.stat().st_size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                p = self._file()
                rng = self.headers.get("Range")
                with server._lock:
                    server.requests.append(("GET", self.path, rng))
                if p is None:
                    self.send_error(404)
                    return
                if rng:
                    with server._lock:
                        fail = server.fail_always or server.fail_ranged > 0
                        if server.fail_ranged > 0:
                            server.fail_ranged -= 1
                    if fail:
                        self.send_error(503)
                        return
                size = p.stat().st_size
                start, end = 0, size - 1
                status = 200
                if rng:
                    m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
                    if not m:
                        self.send_error(416)
                        return
                    if m.group(1):
                        start = int(m.group(1))
                        end = int(m.group(2)) if m.group(2) else size - 1
                    else:
                        start = size - int(m.group(2))
                    end = min(end, size - 1)
                    status = 206
                n = max(0, end - start + 1)
                self.send_response(status)
                self.send_header("Content-Length", str(n))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                with open(p, "rb") as f:
                    f.seek(start)
                    data = f.read(n)
                # Count before sending: the client may return before this thread runs again.
                with server._lock:
                    server.bytes_sent += len(data)
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and os.path.basename(f) != "")
