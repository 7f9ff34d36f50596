"""How ``ctsam3d serve`` answers what it refuses: one-line JSON {"error": message, "kind": one of
``protocol.KIND_*``, ...} with the status each refusal has (see ``protocol``)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import protocol
from .budget import OverBudgetError
from .disconnects import ClientGoneError
from .parsing import ApiError
from .registry import QueueFullError, SessionsFullError, UnknownSessionError

log = logging.getLogger(__name__)


_REFUSALS: Dict[type, Tuple[int, str]] = {
    UnknownSessionError: (404, protocol.KIND_UNKNOWN_SESSION),
    SessionsFullError: (503, protocol.KIND_BUSY),
    QueueFullError: (429, protocol.KIND_BUSY),
}


def _error_body(kind: str, message: str, **extra: Any) -> Dict[str, Any]:
    return {"error": " ".join(str(message).split()), "kind": kind, **extra}


def describe(error: BaseException) -> Tuple[int, Dict[str, Any], Optional[Dict[str, str]]]:
    """The status, JSON body and headers that answer ``error``: a refusal as its kind says, anything else
    a crash (500; the caller logs it). Shared by the error handlers and the last frame of a stream of previews."""
    if isinstance(error, ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error.status, _error_body(error.kind, str(error), **error.extra), headers
    if isinstance(error, protocol.WireError):
        return error.status, _error_body(error.kind, str(error)), None
    if isinstance(error, ClientGoneError):
        return 400, _error_body(protocol.KIND_BAD_REQUEST, "the client went away before its answer was ready"), None
    if isinstance(error, OverBudgetError):
        return 503, _error_body(protocol.KIND_BUSY, str(error)), {"Retry-After": str(error.retry_after_s)}
    if isinstance(error, UnknownSessionError):
        return 404, _error_body(protocol.KIND_UNKNOWN_SESSION, "no such session: it was closed, expired, or never "
                                "opened (with this token)"), None
    if type(error) in _REFUSALS:
        status, kind = _REFUSALS[type(error)]
        return status, _error_body(kind, str(error)), None
    return 500, _error_body(protocol.KIND_INTERNAL, f"internal server error ({type(error).__name__}; the server's "
                            "log has the details)"), None


def install_error_handlers(app: FastAPI) -> None:
    """Answers every refusal, the framework's own (404, 405...) and any crash (500, logged) in that format."""

    async def refused(_: Request, error: Exception) -> JSONResponse:
        status, body, headers = describe(error)
        return JSONResponse(body, status_code=status, headers=headers)

    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = protocol.KIND_NOT_FOUND if error.status_code == 404 else protocol.KIND_BAD_REQUEST
        return JSONResponse(_error_body(kind, str(error.detail)), status_code=error.status_code,
                            headers=dict(error.headers or {}))

    async def crashed(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        status, body, _ = describe(error)
        return JSONResponse(body, status_code=status)

    for error_type in (ApiError, protocol.WireError, OverBudgetError, ClientGoneError, *_REFUSALS):
        app.add_exception_handler(error_type, refused)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crashed)
