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


def _error_response(status: int, kind: str, message: str, headers: Optional[Dict[str, str]] = None,
                    **extra: Any) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), "kind": kind, **extra}, status_code=status,
                        headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answers every refusal, the framework's own (404, 405...) and any crash (500, logged) in that format."""
    refusals: Dict[type, Tuple[int, str]] = {
        UnknownSessionError: (404, protocol.KIND_UNKNOWN_SESSION),
        SessionsFullError: (503, protocol.KIND_BUSY),
        QueueFullError: (429, protocol.KIND_BUSY),
    }

    async def refused(_: Request, error: Exception) -> JSONResponse:
        if isinstance(error, ApiError):
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return _error_response(error.status, error.kind, str(error), headers, **error.extra)
        if isinstance(error, protocol.WireError):
            return _error_response(error.status, error.kind, str(error))
        if isinstance(error, ClientGoneError):
            return _error_response(400, protocol.KIND_BAD_REQUEST, "the client went away before its answer was ready")
        if isinstance(error, OverBudgetError):
            return _error_response(503, protocol.KIND_BUSY, str(error), {"Retry-After": str(error.retry_after_s)})
        if isinstance(error, UnknownSessionError):
            return _error_response(404, protocol.KIND_UNKNOWN_SESSION, "no such session: it was closed, expired, or "
                                   "never opened (with this token)")
        status, kind = refusals[type(error)]
        return _error_response(status, kind, str(error))

    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = protocol.KIND_NOT_FOUND if error.status_code == 404 else protocol.KIND_BAD_REQUEST
        return _error_response(error.status_code, kind, str(error.detail), dict(error.headers or {}))

    async def crashed(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return _error_response(500, protocol.KIND_INTERNAL, f"internal server error ({type(error).__name__}; the "
                               "server's log has the details)")

    for error_type in (ApiError, protocol.WireError, OverBudgetError, ClientGoneError, *refusals):
        app.add_exception_handler(error_type, refused)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crashed)
