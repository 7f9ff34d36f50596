"""A ModelScope hub on loopback for the downloader's tests: a real HTTP server (http.server) that answers
the two requests ModelScope's own client makes (modelscope 1804ac6: hub/api.py:1368-1420, get_model_files;
hub/file_download.py:400-427 and 527-630, the file with resume):

- ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=master&Recursive=true``: JSON
  ``{"Code": 200, "Success": true, "Data": {"Files": [{"Path", "Name", "Type": "blob", "Size", "Sha256"}]}}``;
- ``GET /api/v1/models/{owner}/{name}/repo?Revision=master&FilePath={path}``: the file, honouring
  ``Range: bytes=N-`` with 206 and Content-Range, as the real host's storage does.

Faults on request: a listing that fails (HTTP status or malformed JSON), a published checksum that is
wrong, a transfer cut after some bytes (once), a stall longer than the client's timeout.
"""

import hashlib
import http.server
import json
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Dict, List, Optional, Union

MODEL = "xiuan123/CT-SAM3D"


class ModelScopeServer:
    def __init__(self, files: Dict[str, Union[bytes, Path]]) -> None:
        self.files = dict(files)
        self.listing_status: Union[int, str] = 200
        """200, another HTTP status, or "malformed" (a 200 answer that is not the file list)."""
        self.published_sha256: Dict[str, str] = {}
        """Checksums to publish instead of the true ones."""
        self.cut_after: Optional[int] = None
        """Close the next file transfer after this many bytes (then serve normally)."""
        self.stall_seconds = 0.0
        self.chunk_delay = 0.0
        """Seconds between the 1 MB chunks of a transfer (a slow line)."""
        self.requests: List[tuple] = []
        """(path with query, Range header or None) of every request."""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                parsed = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(parsed.query)
                base = f"/api/v1/models/{MODEL}/repo"
                if parsed.path == base + "/files":
                    return self.listing()
                if parsed.path == base and "FilePath" in query:
                    return self.file(query["FilePath"][0])
                self.reply(404, b'{"Code": 404, "Message": "not found"}')

            def reply(self, status, body, headers=()):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def listing(self):
                if server.listing_status == "malformed":
                    return self.reply(200, b"<html>maintenance</html>")
                if server.listing_status != 200:
                    return self.reply(int(server.listing_status), b'{"Code": 500, "Success": false}')
                entries = []
                for path in server.files:
                    data = server.content(path)
                    entries.append({
                        "Path": path, "Name": Path(path).name, "Type": "blob", "Size": len(data),
                        "Sha256": server.published_sha256.get(path, hashlib.sha256(data).hexdigest()),
                        "Revision": "master",
                    })
                entries.append({"Path": "ckpt_1000", "Name": "ckpt_1000", "Type": "tree", "Size": 0})
                body = json.dumps({"Code": 200, "Success": True, "Data": {"Files": entries}}).encode()
                self.reply(200, body, [("Content-Type", "application/json")])

            def file(self, path):
                if path not in server.files:
                    return self.reply(404, b'{"Code": 404, "Message": "file not found"}')
                data = server.content(path)
                start = 0
                requested = self.headers.get("Range")
                if requested and requested.startswith("bytes="):
                    start = int(requested[len("bytes="):].split("-")[0])
                    if start >= len(data):
                        return self.reply(416, b"", [("Content-Range", f"bytes */{len(data)}")])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if server.stall_seconds:
                    time.sleep(server.stall_seconds)
                body = data[start:]
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                for offset in range(0, len(body), 1 << 20):
                    self.wfile.write(body[offset: offset + (1 << 20)])
                    time.sleep(server.chunk_delay)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def content(self, path: str) -> bytes:
        value = self.files[path]
        return value.read_bytes() if isinstance(value, Path) else value

    def file_requests(self) -> List[tuple]:
        return [(path, byte_range) for path, byte_range in self.requests if "FilePath=" in path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
