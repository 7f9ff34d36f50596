"""The browser client at ``/``: one page, its script and its style sheet, built from ``web/`` of the repository
(``npm --prefix web ci && npm --prefix web run build``) into ``web_client/`` beside this module.

The page talks only to the server that served it (same origin, same bearer token, which it keeps for the
browser tab only), and is sent with a strict Content-Security-Policy: no inline script or style, no
``eval``, no connection anywhere but this server, no framing by another site. Without a built client the
page says how to build it (503), and the API is unaffected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from fastapi.responses import FileResponse, HTMLResponse, Response

CLIENT_DIR = Path(__file__).with_name("web_client")
"""Where ``npm run build`` in ``web/`` writes the client (git ignores it; a wheel built after it ships it)."""

PAGE = "index.html"

ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "worker.jpeg.js": "text/javascript; charset=utf-8", "dcm2niix.jpeg.wasm": "application/wasm"}
"""The files besides the page, and their types: nothing else under ``web_client`` is served. ``worker.jpeg.js``
and ``dcm2niix.jpeg.wasm`` are dcm2niix compiled to WebAssembly (with its JPEG-LS and JPEG 2000 decoders),
which turns a DICOM series into NIfTI in the browser."""

WASM_WORKER = "worker.jpeg.js"
"""The one script allowed to compile WebAssembly (``'wasm-unsafe-eval'``: compiling a module, never
``eval`` of text); the page itself is not."""

BUILD_COMMAND = "npm --prefix web ci && npm --prefix web run build"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    # NiiVue draws its font atlas and colour bars from images it makes in the page.
    "img-src 'self' data: blob:",
    # The only server the page talks to is this one.
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS: Dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # A rebuilt client is picked up at the next load (the files are revalidated by their ETag).
    "Cache-Control": "no-cache",
}

WORKER_SECURITY_HEADERS: Dict[str, str] = {
    **SECURITY_HEADERS,
    # A worker is governed by the policy of its own response.
    "Content-Security-Policy": CONTENT_SECURITY_POLICY.replace("script-src 'self'",
                                                               "script-src 'self' 'wasm-unsafe-eval'"),
}

NOT_BUILT_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CT-SAM3D: web client not built</title></head>
<body><h1>The CT-SAM3D web client is not built</h1>
<p>This server answers its API (<code>/v1</code>, <code>/health</code>), but the page's files are missing from
<code>{CLIENT_DIR}</code>. Build them from the repository's root (Node.js 18 or later), then reload:</p>
<pre>{BUILD_COMMAND}</pre></body></html>
"""


def client_built(directory: Path = CLIENT_DIR) -> bool:
    """Whether ``directory`` holds the page and every asset."""
    return all((directory / name).is_file() for name in (PAGE, *ASSETS))


def add_web_client(app: Any, directory: Path = CLIENT_DIR) -> None:
    """Serves the client at ``/`` and its assets at ``/web/{name}`` (no token: they are public code; the API
    they call asks for it). The files are looked up per request, so a rebuild needs no restart."""

    async def page() -> Response:
        if not client_built(directory):
            return HTMLResponse(NOT_BUILT_PAGE, status_code=503, headers=SECURITY_HEADERS)
        return FileResponse(directory / PAGE, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def asset(name: str) -> Response:
        path = directory / name
        if name not in ASSETS or not path.is_file():
            return Response(status_code=404, headers=SECURITY_HEADERS)
        headers = WORKER_SECURITY_HEADERS if name == WASM_WORKER else SECURITY_HEADERS
        return FileResponse(path, media_type=ASSETS[name], headers=headers)

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/web/{name}", asset, methods=["GET"], include_in_schema=False)
