"""The HTTP server of ``ctsam3d serve``: one network, many ``InteractiveSession``s, one per client session.

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
- ``DELETE /v1/sessions/{id}`` -> 204.

Every route but /health needs ``Authorization: Bearer TOKEN`` when the server has tokens; a session is
reachable only with the token that opened it. No CORS headers are sent, so browsers keep other sites'
pages out. Bodies are bounded before they are read (Content-Length) and while they are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hmac
import json
import logging
import math
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from .. import __version__, protocol
from ..constants import MAX_OPEN_PATCHES
from ..device import resolve_device
from ..inference import prepare_network, resolve_precision
from ..interface import Click, MaskUpdate, SessionInputError, checked_point
from ..session import InteractiveSession
from ..torch_warnings import hide_torch_internal_warnings
from . import bounds, browsers
from .bounds import ConnectionLimits
from .budget import MemoryBudget, OverBudgetError, Reservation, default_budget_bytes
from .connections import uvicorn_config
from .disconnects import ClientGoneError, unless_client_leaves
from .images import ImageCache, SessionImages
from .metrics import CONTENT_TYPE, Gauge, Metrics, resident_memory_bytes
from .parsing import (
    ApiError,
    Geometry,
    bad_request,
    check_declared_length,
    parse_boolean,
    parse_corners,
    parse_digest,
    parse_expected_clicks,
    parse_numbers,
    parse_options,
)
from .registry import QueueFullError, SessionRegistry, SessionsFullError, UnknownSessionError
from .upload import receive_array, upload_overhead_bytes
from .web import add_web_client

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 1 << 20
"""Largest JSON request body (a set_clicks of MAX_SESSION_CLICKS clicks takes about 20 kB)."""

MAX_SESSION_CLICKS = 256
"""Most clicks one session may hold: bounds the work of one request (set_clicks), which holds the
worker that every user shares."""

RENDERING_JOBS = ("click", "box", "set_clicks", "undo")
"""Jobs that render patches into the mask: each reserves the memory that takes while it runs."""

PATCH_OPENING_JOBS = ("click", "box", "set_clicks")
"""Jobs that may open patches: they reserve room for as many as one click may open, too."""

FALLBACK_BUDGET_BYTES = 8 << 30
"""The memory budget where the machine's memory cannot be read."""

def _error_response(status: int, kind: str, message: str, headers: Optional[Dict[str, str]] = None,
                    **extra: Any) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), "kind": kind, **extra}, status_code=status,
                        headers=headers)


@dataclass
class _Hosted:
    """A session as the registry keeps it: with its memory reservation (``state``: ``state_bytes`` plus its
    open patches) and what bounds one job's work on it: the source voxels one patch covers, and the patches
    one click may open."""

    session: InteractiveSession
    state: Reservation
    state_bytes: int
    patch_voxels: int
    new_patches: int


@dataclass
class _Outcome:
    """What a session job gives back; encoded off the worker thread."""

    update: MaskUpdate
    timing: Dict[str, float]
    clicks: int
    patches_open: int
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, session: InteractiveSession, update: MaskUpdate, **extra: Any) -> _Outcome:
        return cls(update, dict(session.last_timing), len(session.clicks), session.patch_count, extra)

    def to_json(self) -> Dict[str, Any]:
        return {"update": protocol.encode_update(self.update), "timing": self.timing, "clicks": self.clicks,
                "patches_open": self.patches_open, **self.extra}


def _check_count(session: InteractiveSession, expected: Optional[int]) -> None:
    count = len(session.clicks)
    if expected is not None and expected != count:
        raise ApiError(409, protocol.KIND_CLICK_COUNT,
                       f"the session has {count} clicks, not the {expected} this request expects", clicks=count)


def _check_room(count: int) -> None:
    if count > MAX_SESSION_CLICKS:
        raise SessionInputError(f"this server takes at most {MAX_SESSION_CLICKS} clicks per session")


# ----------------------------------------------------------------------------------- the server
class _Server:
    """The application's state and its route handlers (``create_app`` wires them into FastAPI)."""

    def __init__(self, network: Any, *, device: Any, precision: str, tokens: Optional[Sequence[str]],
                 max_sessions: int, max_sessions_per_token: int, max_image_bytes: int, image_cache_bytes: int,
                 idle_timeout_s: float,
                 sweep_interval_s: Optional[float], max_queued_per_session: int, max_patches: int,
                 max_patch_source_voxels: int, max_memory_bytes: int, model_info: Optional[Mapping[str, Any]]) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(network, self.device, precision)
        self.network = network
        # Prepared (and warmed up) now rather than at the first user's click; every session then gets this
        # prepared network back from prepare_network, which keeps it.
        prepare_network(network, self.device, self.precision)
        self.patch_bytes = bounds.PATCH_BYTES_ESTIMATE
        self._patch_measured = False
        self.tokens = None if tokens is None else [token.encode("utf-8") for token in tokens]
        self.max_image_bytes = max_image_bytes
        self.max_patches = max_patches
        self.max_patch_source_voxels = max_patch_source_voxels
        self.model_info = dict(model_info or {})
        self.metrics = Metrics()
        self.images = ImageCache(image_cache_bytes)
        self.budget = MemoryBudget(max_memory_bytes, reclaim=self.images.reclaim)
        self.session_images = SessionImages(self.budget)
        self.registry = SessionRegistry(self.metrics, max_sessions=max_sessions, idle_timeout_s=idle_timeout_s,
                                        max_sessions_per_owner=max_sessions_per_token,
                                        max_pending_per_session=max_queued_per_session,
                                        sweep_interval_s=sweep_interval_s, release=self._release_memory)

    # ------------------------------------------------------------------ plumbing
    async def authorize(self, request: Request) -> Optional[int]:
        """The index of the request's token (None on a server without tokens); 401 without a valid one.
        Every token is compared, in constant time, so the answer's timing tells nothing about them."""
        if self.tokens is None:
            problem = browsers.browser_problem(request.headers)
            if problem:
                raise ApiError(403, protocol.KIND_FORBIDDEN, problem)
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, protocol.KIND_UNAUTHORIZED, "this server needs a token: Authorization: Bearer TOKEN")
        presented = given.strip().encode("latin-1")
        match = None
        for index, token in enumerate(self.tokens):
            if hmac.compare_digest(presented, token) and match is None:
                match = index
        if match is None:
            raise ApiError(401, protocol.KIND_UNAUTHORIZED, "the bearer token is not one this server accepts")
        return match

    async def read_body(self, request: Request, limit: int) -> bytes:
        """The request body, refused with 413 past ``limit`` bytes: by its Content-Length before anything is
        read, and while it streams in (a chunked body states no length)."""
        check_declared_length(request, limit)
        chunks = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, protocol.KIND_TOO_LARGE,
                                   f"the body exceeds the {limit} bytes this request takes")
                chunks.append(chunk)
        except ClientDisconnect as error:
            raise bad_request("the client went away before its body arrived") from error
        return b"".join(chunks)

    async def read_json(self, request: Request) -> Dict[str, Any]:
        check_declared_length(request, MAX_JSON_BYTES)
        if self.tokens is None and not browsers.is_json(request.headers.get("content-type", "")):
            raise ApiError(415, protocol.KIND_BAD_REQUEST,
                           "send the request's JSON with Content-Type: application/json")
        body = await self.read_body(request, MAX_JSON_BYTES)
        try:
            value = json.loads(body) if body else {}
        except ValueError as error:
            raise bad_request(f"the body is not valid JSON ({error})") from error
        except RecursionError as error:
            raise bad_request("the body's JSON is nested too deeply") from error
        if not isinstance(value, dict):
            raise bad_request("the body must be a JSON object")
        return value

    async def answer(self, request: Request, session_id: str, owner: Optional[int], kind: str,
                     work: Callable[[InteractiveSession], _Outcome]) -> JSONResponse:
        """Runs ``work(session)`` on the worker, behind the session's earlier requests, and answers its outcome
        (encoded off the worker); the session's refusals become 400 "input" answers."""
        what = f"the work of this {kind}"

        def guarded(hosted: _Hosted) -> _Outcome:
            clicks, discarded = hosted.session.clicks, False
            try:
                with self.budget.reserve(self._work_bytes(hosted, kind), what):
                    return work(hosted.session)
            except SessionInputError as error:
                raise ApiError(400, protocol.KIND_INPUT, str(error)) from error
            except (ApiError, OverBudgetError):
                raise
            except Exception:
                if hosted.session.clicks != clicks:
                    # The session failed half way through a change and cannot be trusted to undo it: it is
                    # closed, and the client (404) opens a new one and replays its own prompts.
                    log.warning("closed session %s: its %s failed half way", session_id[:8], kind)
                    self.registry.discard(session_id)
                    discarded = True
                raise
            finally:
                if not discarded:
                    self._count_patches(hosted)

        # Refused at once when the work would not fit now; reserved for real when it runs.
        job = self.registry.run(session_id, owner, kind, guarded,
                                admit=lambda hosted: self.budget.check(self._work_bytes(hosted, kind), what))
        outcome = await unless_client_leaves(request, job)
        return JSONResponse(await run_in_threadpool(outcome.to_json))

    def _work_bytes(self, hosted: _Hosted, kind: str) -> int:
        """What a job of this kind on this session may hold while it runs: rendering its patches into the mask,
        and the patches it may open."""
        if kind not in RENDERING_JOBS:
            return 0
        patches = hosted.new_patches if kind in PATCH_OPENING_JOBS else 0
        return hosted.patch_voxels * bounds.RENDER_BYTES_PER_SOURCE_VOXEL + patches * self.patch_bytes

    def _close_orphan(self, opening: Future, session_id: str, owner: Optional[int]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self.registry.close(session_id, owner)

    def _count_patches(self, hosted: _Hosted) -> None:
        """Counts the patches a job left open in the session's reservation, measuring one patch's memory
        the first time there is one (the worker thread runs this, so no job changes it meanwhile)."""
        patches = hosted.session.patches
        if patches and not self._patch_measured:
            self.patch_bytes, self._patch_measured = bounds.patch_bytes(patches[0]), True
        hosted.state.resize(hosted.state_bytes + len(patches) * self.patch_bytes, force=True)

    def array_of(self, digest: str, what: str) -> np.ndarray:
        array = self.images.get(digest)
        if array is None:
            raise ApiError(404, protocol.KIND_UNKNOWN_IMAGE, f"the server does not hold the {what} {digest}: upload it "
                           f"with PUT {protocol.API}/images/{digest}", image=digest)
        return array

    def initial_mask(self, body: Mapping[str, Any]) -> Optional[Tuple[np.ndarray, Optional[Geometry]]]:
        """The uploaded initial mask a request names, with its geometry when it states one."""
        if body.get("initial_mask") is None:
            return None
        array = self.array_of(parse_digest(body["initial_mask"], "initial_mask"), "initial mask")
        if array.dtype != np.uint8:
            raise bad_request(f"an initial mask must be uploaded as uint8, not {array.dtype.name}")
        geometry = body.get("initial_mask_geometry")
        if geometry is None:
            return array, None
        if not isinstance(geometry, dict):
            raise bad_request("initial_mask_geometry must be an object")
        return array, Geometry.parse(geometry, "initial_mask_geometry")

    @staticmethod
    def mask_image(mask: Optional[Tuple[np.ndarray, Optional[Geometry]]], image: sitk.Image) -> Optional[sitk.Image]:
        """The initial mask as an image, on its stated grid or else the image's (the session checks it)."""
        if mask is None:
            return None
        array, geometry = mask
        return (geometry or Geometry.of(image)).image(array)

    def _release_memory(self) -> None:
        """Hands the memory of dropped sessions back: the GPU's to the device, and the heap's to the system
        (glibc would keep it for reuse, and the server's footprint would stay that of its busiest hour)."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        trim = _malloc_trim()
        if trim is not None:
            trim(0)

    # ------------------------------------------------------------------ routes
    async def health(self, request: Request) -> Dict[str, Any]:
        """Up or not, for anyone; the details (model, activity, limits) only with a valid token."""
        try:
            await self.authorize(request)
        except ApiError:
            return {"status": "ok"}
        return {"status": "ok", "version": __version__, "sessions": len(self.registry),
                "max_sessions": self.registry.max_sessions, "queue": self.registry.pending(),
                "device": str(self.device), "precision": self.precision, "model": self.model_info,
                "max_image_bytes": self.max_image_bytes,
                "memory": {"budget_bytes": self.budget.limit_bytes, "reserved_bytes": self.budget.used_bytes}}

    async def metrics_text(self, request: Request) -> Response:
        await self.authorize(request)
        gauges = [
            Gauge("ctsam3d_sessions_open", "Sessions open now.", len(self.registry)),
            Gauge("ctsam3d_queue_length", "Jobs waiting for the network worker.", self.registry.pending()),
            Gauge("ctsam3d_images_cached", "Uploaded arrays held.", len(self.images)),
            Gauge("ctsam3d_images_cached_bytes", "Bytes of uploaded arrays held.", self.images.bytes),
            Gauge("ctsam3d_memory_budget_bytes", "The memory budget (--max-memory-mb).", self.budget.limit_bytes),
            Gauge("ctsam3d_memory_reserved_bytes", "Bytes reserved in the memory budget now.", self.budget.used_bytes),
        ]
        resident = resident_memory_bytes()
        if resident is not None:
            gauges.append(Gauge("process_resident_memory_bytes", "Resident memory of the server process.", resident))
        if self.device.type == "cuda":
            import torch

            gauges += [
                Gauge("ctsam3d_gpu_memory_allocated_bytes", "GPU memory held by tensors.",
                      torch.cuda.memory_allocated(self.device)),
                Gauge("ctsam3d_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator.",
                      torch.cuda.memory_reserved(self.device)),
            ]
        return Response(self.metrics.render(gauges), media_type=CONTENT_TYPE)

    async def has_image(self, digest: str, request: Request) -> Response:
        await self.authorize(request)
        return Response(status_code=200 if protocol.is_digest(digest) and self.images.get(digest) is not None else 404)

    async def put_image(self, digest: str, request: Request) -> Response:
        await self.authorize(request)
        parse_digest(digest, "the image's name")
        dtype = protocol.parse_dtype(request.headers.get(protocol.DTYPE_HEADER, ""))
        shape = protocol.parse_shape(request.headers.get(protocol.SHAPE_HEADER, ""))
        raw_bytes = math.prod(shape) * dtype.itemsize
        if raw_bytes > self.max_image_bytes:
            raise ApiError(413, protocol.KIND_TOO_LARGE, f"the array is {raw_bytes / 2**20:.1f} MiB; this server takes "
                           f"at most {self.max_image_bytes / 2**20:.1f} MiB (ctsam3d serve --max-image-mb)")
        compressed_limit = protocol.compressed_limit(raw_bytes)
        check_declared_length(request, compressed_limit)
        needed = raw_bytes + upload_overhead_bytes(raw_bytes)
        if needed > self.budget.limit_bytes:
            raise ApiError(413, protocol.KIND_TOO_LARGE,
                           f"receiving the array takes {needed / 2**20:.1f} MiB, more than this server's whole "
                           f"memory budget ({self.budget.limit_bytes / 2**20:.1f} MiB, ctsam3d serve --max-memory-mb)")
        reservation = self.budget.reserve(needed, "this upload")
        try:
            array = await receive_array(request.stream(), dtype, shape, digest, compressed_limit)
        except BaseException as error:
            reservation.release()
            if isinstance(error, ClientDisconnect):
                raise bad_request("the client went away before its body arrived") from error
            raise
        reservation.resize(raw_bytes)
        self.images.put(digest, array, reservation)
        return JSONResponse({"image": digest, "bytes": raw_bytes}, status_code=201)

    async def open_session(self, request: Request) -> JSONResponse:
        owner = await self.authorize(request)
        body = await self.read_json(request)
        digest = parse_digest(body.get("image"), "image")
        array = self.array_of(digest, "image")
        geometry = Geometry.parse(body, "the image's")
        options = parse_options(body.get("options"), self.max_patches)
        covered = bounds.patch_source_voxels(array.shape[::-1], geometry.spacing, geometry.direction)
        if covered > self.max_patch_source_voxels:
            raise ApiError(400, protocol.KIND_INPUT, f"at this spacing and direction one 96 mm patch covers {covered} "
                           f"voxels of the image; this server takes at most {self.max_patch_source_voxels}: "
                           "resample the image to a coarser spacing")
        initial = self.initial_mask(body)
        cautions: List[str] = []
        state_bytes = bounds.session_state_bytes(array)
        new_patches = 1 if options.get("cross_patch") is False else options.get("max_patches", MAX_OPEN_PATCHES) + 1
        state = self.budget.reserve(state_bytes, "a new session")
        try:
            image, give_back = await run_in_threadpool(self.session_images.acquire, (digest, geometry.key()),
                                                       array.nbytes, lambda: geometry.image(array))
        except BaseException:
            state.release()
            raise

        def release() -> None:
            state.release()
            give_back()

        def build() -> _Hosted:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hide_torch_internal_warnings()
                try:
                    session = InteractiveSession(self.network, image, device=self.device, precision=self.precision,
                                                 initial_mask=self.mask_image(initial, image), **options)
                except ValueError as error:  # SessionInputError, or an option the session refuses
                    raise ApiError(400, protocol.KIND_INPUT, str(error)) from error
            cautions.extend(str(warning.message) for warning in caught)
            return _Hosted(session, state, state_bytes, covered, new_patches)

        try:
            session_id, future = self.registry.open(owner, build, release)
        except BaseException:
            release()
            raise
        try:
            await unless_client_leaves(request, future)
        except ClientGoneError:
            # Opened after all (the client left while it ran): nobody will use it or close it.
            future.add_done_callback(lambda done: self._close_orphan(done, session_id, owner))
            raise
        return JSONResponse({"session": session_id, "clicks": 0, "patches_open": 0, "device": str(self.device),
                             "precision": self.precision, "warnings": cautions}, status_code=201)

    async def click(self, session_id: str, request: Request) -> Response:
        owner = await self.authorize(request)
        body = await self.read_json(request)
        point = parse_numbers(body.get("point_lps"), 3, "point_lps")
        positive = parse_boolean(body.get("positive", True), "positive")
        expected = parse_expected_clicks(body)

        def work(session: InteractiveSession) -> _Outcome:
            _check_count(session, expected)
            _check_room(len(session.clicks) + 1)
            return _Outcome.of(session, session.add_click(point, positive))

        return await self.answer(request, session_id, owner, "click", work)

    async def box(self, session_id: str, request: Request) -> Response:
        owner = await self.authorize(request)
        body = await self.read_json(request)
        corners = parse_corners(body.get("corners_lps"), "corners_lps")
        expected = parse_expected_clicks(body)

        def work(session: InteractiveSession) -> _Outcome:
            _check_count(session, expected)
            _check_room(len(session.clicks) + 1)
            update = session.add_box(*corners)
            point_lps, positive = session.clicks[-1]
            return _Outcome.of(session, update, click=[list(point_lps), positive])

        return await self.answer(request, session_id, owner, "box", work)

    async def undo(self, session_id: str, request: Request) -> Response:
        owner = await self.authorize(request)
        expected = parse_expected_clicks(await self.read_json(request))

        def work(session: InteractiveSession) -> _Outcome:
            _check_count(session, expected)
            try:
                return _Outcome.of(session, session.undo())
            except IndexError as error:
                raise ApiError(409, protocol.KIND_NOTHING_TO_UNDO, str(error)) from error

        return await self.answer(request, session_id, owner, "undo", work)

    async def set_clicks(self, session_id: str, request: Request) -> Response:
        owner = await self.authorize(request)
        listed = (await self.read_json(request)).get("clicks")
        if not isinstance(listed, list) or not all(isinstance(item, list) and len(item) == 2 for item in listed):
            raise bad_request("clicks must be a list of [[x, y, z], positive] pairs")
        clicks = [(parse_numbers(point, 3, "a click's point"), parse_boolean(positive, "a click's sign"))
                  for point, positive in listed]

        def work(session: InteractiveSession) -> _Outcome:
            # A bounded step towards the clicks asked for; the answer's click count tells the client where
            # the session stands, and it sends the request again for the rest.
            _check_room(len(clicks))
            wanted = [Click(checked_point(point), positive) for point, positive in clicks]
            current = session.clicks
            common = 0
            while common < min(len(wanted), len(current)) and wanted[common] == current[common]:
                common += 1
            step = clicks[:common + bounds.CLICKS_ADDED_PER_REQUEST]
            return _Outcome.of(session, session.set_clicks(step))

        return await self.answer(request, session_id, owner, "set_clicks", work)

    async def reset(self, session_id: str, request: Request) -> Response:
        owner = await self.authorize(request)
        initial = self.initial_mask(await self.read_json(request))

        def work(session: InteractiveSession) -> _Outcome:
            session.reset(self.mask_image(initial, session.image))
            return _Outcome.of(session, MaskUpdate.nothing())

        return await self.answer(request, session_id, owner, "reset", work)

    async def mask(self, session_id: str, request: Request) -> Response:
        owner = await self.authorize(request)
        def work(session: InteractiveSession) -> _Outcome:
            return _Outcome.of(session, MaskUpdate((0, 0, 0), session.mask_array()))

        return await self.answer(request, session_id, owner, "mask", work)

    async def close_session(self, session_id: str, request: Request) -> Response:
        owner = await self.authorize(request)
        await asyncio.wrap_future(self.registry.close(session_id, owner))
        return Response(status_code=204)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, where there is one (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")
"""The methods metrics name; any other is counted as "other" (made-up methods made 213 MB of metrics)."""


class _RequestMetrics:
    """ASGI middleware: each answered request's latency and status, labelled by route template (never by
    the path itself, which holds session ids) and method (one of ``KNOWN_METHODS`` or "other")."""

    def __init__(self, app: Any, metrics: Metrics, routes: Callable[[], Sequence[Any]]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def record_status(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.observe_request(self._route(scope), method, status[0], time.perf_counter() - started)

    def _route(self, scope: Dict[str, Any]) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"


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
    server = _Server(network, device=device, precision=precision, tokens=tokens, max_sessions=max_sessions,
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
        ("/health", ["GET"], server.health),
        ("/metrics", ["GET"], server.metrics_text),
        (f"{protocol.API}/images/{{digest}}", ["HEAD"], server.has_image),
        (f"{protocol.API}/images/{{digest}}", ["PUT"], server.put_image),
        (f"{protocol.API}/sessions", ["POST"], server.open_session),
        (f"{session}/click", ["POST"], server.click),
        (f"{session}/box", ["POST"], server.box),
        (f"{session}/undo", ["POST"], server.undo),
        (f"{session}/clicks", ["PUT"], server.set_clicks),
        (f"{session}/reset", ["POST"], server.reset),
        (f"{session}/mask", ["GET"], server.mask),
        (session, ["DELETE"], server.close_session),
    ]:
        app.add_api_route(path, endpoint, methods=methods)
    add_web_client(app)

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
    app.add_middleware(_RequestMetrics, metrics=server.metrics, routes=lambda: app.router.routes)
    return app


class BackgroundServer:
    """An app served by uvicorn on a thread of this process, on loopback by default: for tests, benchmarks
    and programs that embed the server. ``port`` 0 takes a free port (``port`` then tells which)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 limits: Optional[ConnectionLimits] = None) -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.limits = limits or ConnectionLimits()
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._server = uvicorn.Server(uvicorn_config(self.app, self.host, self.port, self.limits, self.log_level))
        self._thread = threading.Thread(target=self._server.run, name="ctsam3d-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"uvicorn on {self.url} did not stop within {timeout_s} s")

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
