"""The state of ``ctsam3d serve`` and the work behind its routes: authorisation, bounded body reading, the
sessions' jobs on the shared worker with their memory reservations, uploads, and opening sessions."""

from __future__ import annotations

import ctypes
import functools
import hmac
import json
import logging
import math
import sys
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__, protocol
from ..constants import MAX_OPEN_PATCHES
from ..interface import MaskUpdate, SessionInputError
from ..runtime import Runtime
from ..session import InteractiveSession
from ..torch_warnings import hide_torch_internal_warnings
from . import bounds, browsers
from .budget import MemoryBudget, OverBudgetError, Reservation
from .disconnects import ClientGoneError, unless_client_leaves
from .images import ImageCache, SessionImages
from .metrics import CONTENT_TYPE, Gauge, Metrics, resident_memory_bytes
from .parsing import ApiError, Geometry, bad_request, check_declared_length, parse_digest
from .previews import PreviewChannel, PreviewResponse, PreviewStream
from .registry import SessionRegistry
from .request_bodies import GeometryFields, OpenSession, SessionOptions
from .upload import receive_array, upload_overhead_bytes

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


@dataclass
class Hosted:
    """A session as the registry keeps it: with its memory reservation (``state``: ``state_bytes`` plus its
    open patches) and what bounds one job's work on it: the source voxels one patch covers, and the patches
    one click may open."""

    session: InteractiveSession
    state: Reservation
    state_bytes: int
    patch_voxels: int
    new_patches: int


@dataclass
class Outcome:
    """What a session job gives back; encoded off the worker thread."""

    update: MaskUpdate
    timing: Dict[str, float]
    clicks: int
    patches_open: int
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, session: InteractiveSession, update: MaskUpdate, **extra: Any) -> Outcome:
        return cls(update, dict(session.last_timing), len(session.clicks), session.patch_count, extra)

    def to_json(self) -> Dict[str, Any]:
        return {"update": protocol.encode_update(self.update), "timing": self.timing, "clicks": self.clicks,
                "patches_open": self.patches_open, **self.extra}


def check_count(session: InteractiveSession, expected: Optional[int]) -> None:
    count = len(session.clicks)
    if expected is not None and expected != count:
        raise ApiError(409, protocol.KIND_CLICK_COUNT,
                       f"the session has {count} clicks, not the {expected} this request expects", clicks=count)


def check_room(count: int) -> None:
    if count > MAX_SESSION_CLICKS:
        raise SessionInputError(f"this server takes at most {MAX_SESSION_CLICKS} clicks per session")


# ----------------------------------------------------------------------------------- the host
class Host:
    """The server's state (the runtime, the tokens, the sessions, the images, the memory budget) and the work
    behind its routes (``app`` declares the routes and what each takes)."""

    def __init__(self, network: Any, *, device: Any, precision: str, tokens: Optional[Sequence[str]],
                 max_sessions: int, max_sessions_per_token: int, max_image_bytes: int, image_cache_bytes: int,
                 idle_timeout_s: float,
                 sweep_interval_s: Optional[float], max_queued_per_session: int, max_patches: int,
                 max_patch_source_voxels: int, max_memory_bytes: int, model_info: Optional[Mapping[str, Any]]) -> None:
        # Prepared (and warmed up) now rather than at the first user's click; every session runs on it.
        self.runtime = Runtime(network, device, precision)
        self.device, self.precision = self.runtime.device, self.runtime.precision
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
                     work: Callable[..., Outcome], previews: bool = False) -> Response:
        """Runs ``work(session)`` on the worker, behind the session's earlier requests, and answers its outcome
        (encoded off the worker); the session's refusals become 400 "input" answers. With ``previews`` the
        work is ``work(session, preview=...)``, and what it previews is streamed before the answer (see
        ``previews``)."""
        what = f"the work of this {kind}"
        channel = PreviewChannel() if previews else None
        task = work if channel is None else functools.partial(work, preview=channel.put)

        def guarded(hosted: Hosted) -> Outcome:
            clicks, discarded = hosted.session.clicks, False
            try:
                with self.budget.reserve(self._work_bytes(hosted, kind), what):
                    return task(hosted.session)
            except SessionInputError as error:
                raise ApiError(400, protocol.KIND_INPUT, str(error)) from error
            except (ApiError, OverBudgetError, ClientGoneError):
                # A click abandoned for a departed client left the session as before it (a set_clicks: with
                # the clicks before it), which the client finds out from the click count next time.
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
        if channel is not None:
            stream = PreviewStream(request, job, channel, Outcome.to_json)
            return PreviewResponse(await stream.first_frame(), stream)
        outcome = await unless_client_leaves(request, job)
        return JSONResponse(await run_in_threadpool(outcome.to_json))

    def _work_bytes(self, hosted: Hosted, kind: str) -> int:
        """What a job of this kind on this session may hold while it runs: rendering its patches into the mask,
        and the patches it may open."""
        if kind not in RENDERING_JOBS:
            return 0
        patches = hosted.new_patches if kind in PATCH_OPENING_JOBS else 0
        return hosted.patch_voxels * bounds.RENDER_BYTES_PER_SOURCE_VOXEL + patches * self.patch_bytes

    def _close_orphan(self, opening: Future, session_id: str, owner: Optional[int]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self.registry.close(session_id, owner)

    def _count_patches(self, hosted: Hosted) -> None:
        """Counts the patches a job left open in the session's reservation, measuring one patch's memory
        the first time there is one (the worker thread runs this, so no job changes it meanwhile)."""
        patches = hosted.session.patches
        if patches and not self._patch_measured:
            self.patch_bytes, self._patch_measured = bounds.patch_bytes(patches[0]), True
        hosted.state.resize(hosted.state_bytes + len(patches) * self.patch_bytes, force=True)

    def holds(self, digest: str) -> bool:
        return self.images.get(digest) is not None

    def array_of(self, digest: str, what: str) -> np.ndarray:
        array = self.images.get(digest)
        if array is None:
            raise ApiError(404, protocol.KIND_UNKNOWN_IMAGE, f"the server does not hold the {what} {digest}: upload it "
                           f"with PUT {protocol.API}/images/{digest}", image=digest)
        return array

    def initial_mask(self, digest: Optional[str], geometry: Optional[GeometryFields]
                     ) -> Optional[Tuple[np.ndarray, Optional[Geometry]]]:
        """The uploaded initial mask a request names, with its geometry when it states one."""
        if digest is None:
            return None
        array = self.array_of(digest, "initial mask")
        if array.dtype != np.uint8:
            raise bad_request(f"an initial mask must be uploaded as uint8, not {array.dtype.name}")
        if geometry is None:
            return array, None
        return array, Geometry.checked(geometry.origin, geometry.spacing, geometry.direction, "initial_mask_geometry")

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

    # ------------------------------------------------------------------ the work of routes
    def health(self, authorized: bool) -> Dict[str, Any]:
        """Up or not, for anyone; the details (model, activity, limits) only with a valid token."""
        if not authorized:
            return {"status": "ok"}
        return {"status": "ok", "version": __version__, "sessions": len(self.registry),
                "max_sessions": self.registry.max_sessions, "queue": self.registry.pending(),
                "device": str(self.device), "precision": self.precision, "model": self.model_info,
                "max_image_bytes": self.max_image_bytes,
                "memory": {"budget_bytes": self.budget.limit_bytes, "reserved_bytes": self.budget.used_bytes}}

    def metrics_text(self) -> Response:
        """The metrics in Prometheus' text format, with the gauges of now."""
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

    async def receive_image(self, digest: str, request: Request) -> Response:
        """The body streams through ``receive_array`` (bounded by the stated dtype and shape, and by the
        memory budget); it is never read whole by the framework."""
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

    async def open_session(self, request: Request, owner: Optional[int], body: OpenSession) -> JSONResponse:
        """Opens a session on an uploaded image, for ``owner`` (a token's index)."""
        array = self.array_of(body.image, "image")
        geometry = Geometry.checked(body.origin, body.spacing, body.direction, "the image's")
        options = {name: value for name, value in (body.options or SessionOptions()).model_dump().items()
                   if value is not None}
        if options.get("max_patches", 0) > self.max_patches:
            raise ApiError(400, protocol.KIND_INPUT, f"max_patches is at most {self.max_patches} on this server "
                           f"(ctsam3d serve --max-patches), got {options['max_patches']}")
        covered = bounds.patch_source_voxels(array.shape[::-1], geometry.spacing, geometry.direction)
        if covered > self.max_patch_source_voxels:
            raise ApiError(400, protocol.KIND_INPUT, f"at this spacing and direction one 96 mm patch covers {covered} "
                           f"voxels of the image; this server takes at most {self.max_patch_source_voxels}: "
                           "resample the image to a coarser spacing")
        initial = self.initial_mask(body.initial_mask, body.initial_mask_geometry)
        cautions: List[str] = []
        state_bytes = bounds.session_state_bytes(array)
        new_patches = 1 if options.get("cross_patch") is False else options.get("max_patches", MAX_OPEN_PATCHES) + 1
        state = self.budget.reserve(state_bytes, "a new session")
        try:
            image, give_back = await run_in_threadpool(self.session_images.acquire, (body.image, geometry.key()),
                                                       array.nbytes, lambda: geometry.image(array))
        except BaseException:
            state.release()
            raise

        def release() -> None:
            state.release()
            give_back()

        def build() -> Hosted:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hide_torch_internal_warnings()
                try:
                    session = InteractiveSession(self.runtime, image, initial_mask=self.mask_image(initial, image),
                                                 **options)
                except ValueError as error:  # SessionInputError, or an option the session refuses
                    raise ApiError(400, protocol.KIND_INPUT, str(error)) from error
            cautions.extend(str(warning.message) for warning in caught)
            return Hosted(session, state, state_bytes, covered, new_patches)

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


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, where there is one (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
