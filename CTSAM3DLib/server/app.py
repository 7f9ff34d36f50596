"""The HTTP server of ``ctsam3d serve``: one network, many ``InteractiveSession``s, one per client session.

This module declares the routes: what each takes (its token, its body as a ``request_bodies`` model) and
what it does; ``host.Host`` holds the state and the work behind them, ``refusals`` the error answers.

Routes (JSON unless said; see ``CTSAM3DLib.protocol`` for the encodings and error format):

- ``GET /health`` (no token): status, sessions, queue length, device, precision, version, model.
- ``GET /metrics``: Prometheus text.
- ``HEAD /v1/images/{sha256}``: 200 when the server holds the array, else 404.
- ``PUT /v1/images/{sha256}``: zlib-compressed voxels, ``X-Array-Dtype`` and ``X-Array-Shape`` headers -> 201.
- ``POST /v1/sessions``: {"image", "origin", "spacing", "direction", "options", "initial_mask",
  "initial_mask_geometry"} -> 201 {"session", "device", "precision", "warnings", ...}.
- ``POST /v1/sessions/{id}/click`` {"point_lps", "positive", "expected_clicks"}, ``.../box`` {"corners_lps",
  "expected_clicks"}, ``.../undo`` {"expected_clicks"}, ``PUT .../clicks`` {"clicks": [[[x, y, z], positive],
  ...]}, ``POST .../reset`` {"initial_mask", "initial_mask_geometry"}, ``GET .../mask``: each answers
  {"update", "timing", "clicks", "patches_open"} (a box also its "click"). ``expected_clicks`` (optional)
  must equal the session's click count, else 409 with the count: a retried request is then never
  applied twice. Reset answers an empty update: the mask is then the initial mask, which the client has.
  A click, box or clicks request with "previews": true is answered with a stream of the previews of the
  mask as cross-patch prompting grows it, then that answer (``protocol.STREAM_MEDIA_TYPE``; see
  ``previews``).
- ``DELETE /v1/sessions/{id}`` -> 204.

Every route but /health needs ``Authorization: Bearer TOKEN`` when the server has tokens; a session is
reachable only with the token that opened it. No CORS headers are sent, so browsers keep other sites'
pages out. Bodies are bounded before they are read (Content-Length) and while they are read.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any, AsyncIterator, Dict, Mapping, Optional, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from .. import __version__, protocol
from ..interface import Click, MaskUpdate, PreviewCallback, checked_point, kept_clicks
from ..session import InteractiveSession
from . import bounds
from .background import BackgroundServer
from .budget import default_budget_bytes
from .host import FALLBACK_BUDGET_BYTES, Host, Outcome, check_count, check_room
from .metrics import RequestMetrics
from .parsing import ApiError
from .refusals import install_error_handlers
from .request_bodies import AddBox, AddClick, OpenSession, Prompt, Reset, SetClicks, parse_body
from .web import add_web_client

__all__ = ["BackgroundServer", "create_app"]


# ----------------------------------------------------------------------------------- what routes take
def _host(request: Request) -> Host:
    return request.app.state.server


Server = Annotated[Host, Depends(_host)]


async def _caller(request: Request) -> Optional[int]:
    """The authorisation of every route but /health: the index of the request's token (see
    ``Host.authorize``), before anything of the request is read."""
    return await _host(request).authorize(request)


async def _authorized(request: Request) -> bool:
    """Whether the request brings a valid token (/health shows its details only then)."""
    try:
        await _host(request).authorize(request)
    except ApiError:
        return False
    return True


Caller = Annotated[Optional[int], Depends(_caller)]
Authorized = Annotated[bool, Depends(_authorized)]


def _body(model: type) -> Any:
    """The request's JSON body as ``model`` (see ``request_bodies``): read once authorised, bounded while
    it streams in (``Host.read_json``), then validated. No route has a body parameter of its own, so the
    framework never reads a body unbounded."""

    async def read(request: Request, _: Caller) -> Any:
        server = _host(request)
        return parse_body(model, await server.read_json(request), {"held": server.holds})

    return Depends(read)


OpenSessionBody = Annotated[OpenSession, _body(OpenSession)]
AddClickBody = Annotated[AddClick, _body(AddClick)]
AddBoxBody = Annotated[AddBox, _body(AddBox)]
PromptBody = Annotated[Prompt, _body(Prompt)]
SetClicksBody = Annotated[SetClicks, _body(SetClicks)]
ResetBody = Annotated[Reset, _body(Reset)]


# ----------------------------------------------------------------------------------- the routes
async def health(server: Server, authorized: Authorized) -> Dict[str, Any]:
    return server.health(authorized)


async def metrics_text(server: Server, _: Caller) -> Response:
    return server.metrics_text()


async def has_image(digest: str, server: Server, _: Caller) -> Response:
    return Response(status_code=200 if protocol.is_digest(digest) and server.holds(digest) else 404)


async def put_image(digest: str, request: Request, server: Server, _: Caller) -> Response:
    return await server.receive_image(digest, request)


async def open_session(request: Request, server: Server, owner: Caller, body: OpenSessionBody) -> Response:
    return await server.open_session(request, owner, body)


async def click(session_id: str, request: Request, server: Server, owner: Caller, body: AddClickBody) -> Response:
    def work(session: InteractiveSession, preview: Optional[PreviewCallback] = None) -> Outcome:
        check_count(session, body.expected_clicks)
        check_room(len(session.clicks) + 1)
        return Outcome.of(session, session.add_click(body.point_lps, body.positive, preview=preview))

    return await server.answer(request, session_id, owner, "click", work, body.previews)


async def box(session_id: str, request: Request, server: Server, owner: Caller, body: AddBoxBody) -> Response:
    def work(session: InteractiveSession, preview: Optional[PreviewCallback] = None) -> Outcome:
        check_count(session, body.expected_clicks)
        check_room(len(session.clicks) + 1)
        update = session.add_box(*body.corners_lps, preview=preview)
        point_lps, positive = session.clicks[-1]
        return Outcome.of(session, update, click=[list(point_lps), positive])

    return await server.answer(request, session_id, owner, "box", work, body.previews)


async def undo(session_id: str, request: Request, server: Server, owner: Caller, body: PromptBody) -> Response:
    def work(session: InteractiveSession) -> Outcome:
        check_count(session, body.expected_clicks)
        try:
            return Outcome.of(session, session.undo())
        except IndexError as error:
            raise ApiError(409, protocol.KIND_NOTHING_TO_UNDO, str(error)) from error

    return await server.answer(request, session_id, owner, "undo", work)


async def set_clicks(session_id: str, request: Request, server: Server, owner: Caller, body: SetClicksBody) -> Response:
    clicks = [(list(point), positive) for point, positive in body.clicks]

    def work(session: InteractiveSession, preview: Optional[PreviewCallback] = None) -> Outcome:
        # A bounded step towards the clicks asked for; the answer's click count tells the client where
        # the session stands, and it sends the request again for the rest.
        check_room(len(clicks))
        wanted = [Click(checked_point(point), positive) for point, positive in clicks]
        step = clicks[:kept_clicks(wanted, session.clicks) + bounds.CLICKS_ADDED_PER_REQUEST]
        return Outcome.of(session, session.set_clicks(step, preview=preview))

    return await server.answer(request, session_id, owner, "set_clicks", work, body.previews)


async def reset(session_id: str, request: Request, server: Server, owner: Caller, body: ResetBody) -> Response:
    initial = server.initial_mask(body.initial_mask, body.initial_mask_geometry)

    def work(session: InteractiveSession) -> Outcome:
        session.reset(server.mask_image(initial, session.image))
        return Outcome.of(session, MaskUpdate.nothing())

    return await server.answer(request, session_id, owner, "reset", work)


async def mask(session_id: str, request: Request, server: Server, owner: Caller) -> Response:
    def work(session: InteractiveSession) -> Outcome:
        return Outcome.of(session, MaskUpdate((0, 0, 0), session.mask_array()))

    return await server.answer(request, session_id, owner, "mask", work)


async def close_session(session_id: str, server: Server, owner: Caller) -> Response:
    await asyncio.wrap_future(server.registry.close(session_id, owner))
    return Response(status_code=204)


def create_app(
    network: Any,
    *,
    device: Any = "auto",
    precision: str = "auto",
    tokens: Optional[Sequence[str]] = None,
    max_sessions: int = 32,
    max_sessions_per_token: Optional[int] = None,
    max_image_bytes: int = 1 << 30,
    image_cache_bytes: Optional[int] = None,
    idle_timeout_s: float = 1800.0,
    sweep_interval_s: Optional[float] = None,
    max_queued_per_session: int = 32,
    max_patches: int = bounds.DEFAULT_MAX_PATCHES,
    max_patch_source_voxels: int = bounds.DEFAULT_MAX_PATCH_SOURCE_VOXELS,
    max_memory_bytes: Optional[int] = None,
    model_info: Optional[Mapping[str, Any]] = None,
) -> FastAPI:
    """The server's FastAPI application around ``network`` (any ``PromptableNetwork``: tests and benchmarks
    pass stand-ins), prepared once for ``device`` at ``precision``.

    ``tokens``: bearer tokens, one of which every request but /health must bring (None: none needed, for a
    server on loopback only). One token may hold ``max_sessions_per_token`` sessions (default: a quarter of
    ``max_sessions`` when there are several tokens, all of them otherwise). ``max_image_bytes`` bounds one
    uploaded array (decompressed);
    ``image_cache_bytes`` (default: twice that) the uploaded arrays kept. Sessions idle for
    ``idle_timeout_s`` are closed, checked every ``sweep_interval_s`` (default: a quarter of the timeout,
    at most 30 s). ``max_patches`` bounds the option of that name a client may choose, and
    ``max_patch_source_voxels`` the source voxels one patch may cover (see ``bounds``).
    ``max_memory_bytes`` bounds uploads, cached images, sessions and the job on the worker together (see
    ``budget``; default: half of this machine's memory). ``model_info`` is
    shown by /health (e.g. the weights file and its SHA-256).
    """
    if min(max_sessions, max_image_bytes, idle_timeout_s, max_queued_per_session, max_patches,
           max_patch_source_voxels) <= 0:
        raise ValueError("max_sessions, max_image_bytes, idle_timeout_s, max_queued_per_session, max_patches and "
                         "max_patch_source_voxels must be positive")
    if tokens is not None and not tokens:
        raise ValueError("tokens must hold at least one token (or be None for a loopback-only server)")
    if max_sessions_per_token is None:
        max_sessions_per_token = max_sessions if tokens is None or len(tokens) < 2 else -(-max_sessions // 4)
    server = Host(network, device=device, precision=precision, tokens=tokens, max_sessions=max_sessions,
                  max_sessions_per_token=max_sessions_per_token,
                  max_image_bytes=max_image_bytes,
                  image_cache_bytes=image_cache_bytes if image_cache_bytes is not None else 2 * max_image_bytes,
                  idle_timeout_s=idle_timeout_s, sweep_interval_s=sweep_interval_s,
                  max_queued_per_session=max_queued_per_session, max_patches=max_patches,
                  max_patch_source_voxels=max_patch_source_voxels,
                  max_memory_bytes=max_memory_bytes or default_budget_bytes() or FALLBACK_BUDGET_BYTES,
                  model_info=model_info)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.registry.start()
        try:
            yield
        finally:
            server.registry.stop()

    app = FastAPI(title="CT-SAM3D", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    session = f"{protocol.API}/sessions/{{session_id}}"
    for path, methods, endpoint in [
        ("/health", ["GET"], health),
        ("/metrics", ["GET"], metrics_text),
        (f"{protocol.API}/images/{{digest}}", ["HEAD"], has_image),
        (f"{protocol.API}/images/{{digest}}", ["PUT"], put_image),
        (f"{protocol.API}/sessions", ["POST"], open_session),
        (f"{session}/click", ["POST"], click),
        (f"{session}/box", ["POST"], box),
        (f"{session}/undo", ["POST"], undo),
        (f"{session}/clicks", ["PUT"], set_clicks),
        (f"{session}/reset", ["POST"], reset),
        (f"{session}/mask", ["GET"], mask),
        (session, ["DELETE"], close_session),
    ]:
        app.add_api_route(path, endpoint, methods=methods)
    add_web_client(app)
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=server.metrics, routes=lambda: app.router.routes)
    return app
