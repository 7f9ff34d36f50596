"""``RemoteSession``: an ``InteractiveSession`` whose network runs on a ``ctsam3d serve`` server.

Same methods, properties and errors as ``InteractiveSession`` (``add_click``, ``add_box``, ``undo``,
``set_clicks``, ``reset``, ``clicks``, ``mask``, ``mask_array()``, ``last_timing``, ``patch_count``;
``SessionInputError`` for bad input, IndexError when there is nothing to undo), for workstations
without a GPU. It needs only the standard library, numpy and SimpleITK: no torch.

The client keeps its own copy of the whole mask and of its prompts, and treats them as the truth:
- the image is uploaded once (and again only when the server no longer has it);
- every prompt states how many clicks the session should have (``expected_clicks``), so a retried
  request is never applied twice: on a mismatch the server's session is brought back to this client's
  prompts, then the prompt is sent again;
- when the server no longer knows the session (restarted, expired, or a load balancer moved the
  client to another replica) a new session is opened and the prompts replayed, without the caller
  noticing;
- a failed connection is retried with a growing backoff for about 16 s (longer than a server's restart),
  then raises ConnectionError naming the server. Cookies are kept, so a load balancer's affinity cookie
  holds the client to one replica.
"""

from __future__ import annotations

import functools
import http.client
import http.cookiejar
import json
import socket
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import SimpleITK as sitk

from . import __version__, protocol
from .inputs import as_box, box_centre
from .interface import (
    Click,
    MaskUpdate,
    PreviewCallback,
    ProgressCallback,
    SessionInputError,
    checked_corners,
    checked_point,
    kept_clicks,
)

__all__ = ["RemoteSession", "ServerError", "server_health"]

SESSION_OPTIONS = (*protocol.SESSION_OPTION_NAMES, "initial_mask")
"""The ``InteractiveSession`` options a remote session takes; device, precision and sampling are the server's."""

BACKOFF_S = 0.25
"""First wait before retrying a failed connection; doubled on each further try, up to ``MAX_BACKOFF_S``."""

MAX_BACKOFF_S = 2.0
"""Longest wait between two tries: with the default 10 retries a client keeps trying for 15.75 s, longer
than a server takes to restart (5 to 8 s to load the network)."""

RECOVERIES = 4
"""Most times one call re-opens a lost session or resynchronises a diverged one before giving up."""

T = TypeVar("T")

Corners = Tuple[Tuple[float, float, float], Tuple[float, float, float]]


class ServerError(RuntimeError):
    """An answer of the server that is neither a result nor a refusal of the caller's input."""

    def __init__(self, message: str, status: Optional[int] = None, kind: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class _RecoverableError(ServerError):
    """A refusal that a session may recover from by itself (lost session, click-count mismatch, missing
    image); a ServerError like any other when it cannot."""


_RECOVERABLE = (protocol.KIND_UNKNOWN_SESSION, protocol.KIND_CLICK_COUNT, protocol.KIND_UNKNOWN_IMAGE)


def _whole_body(status: int, response: Any) -> Tuple[int, bytes]:
    return status, response.read()


def _json_answer(status: int, response: Any) -> Tuple[int, Any]:
    """The answer's JSON (a body that is not JSON as an error naming its start)."""
    data = response.read()
    try:
        return status, json.loads(data) if data else {}
    except ValueError:
        return status, {"error": data[:200].decode("utf-8", "replace")}


class _Client:
    """HTTP to one server: retries of failed connections, JSON in and out, refusals as exceptions."""

    def __init__(self, url: str, token: Optional[str], timeout: float, retries: int) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.headers = {"User-Agent": f"ctsam3d/{__version__}", "Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token.strip()}"
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def exchange(self, method: str, path: str, body: Optional[bytes] = None,
                 headers: Optional[Mapping[str, str]] = None, retries: Optional[int] = None,
                 read: Callable[[int, Any], Tuple[int, Any]] = _whole_body) -> Tuple[int, Any]:
        """The status and body of the server's answer (as ``read(status, response)`` gives them: by default the
        body's bytes); ConnectionError when it cannot be reached (after ``retries`` further tries) or does not
        answer within the timeout (not retried: the server is busy, not gone)."""
        attempts = 1 + (self.retries if retries is None else retries)
        problem: object = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))
            request = urllib.request.Request(self.url + path, data=body, method=method,
                                             headers={**self.headers, **(headers or {})})
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    return read(response.status, response)
            except urllib.error.HTTPError as error:
                with error:
                    return read(error.code, error)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                problem = getattr(error, "reason", error)
                if isinstance(problem, (socket.timeout, TimeoutError)):
                    raise ConnectionError(f"the CT-SAM3D server at {self.url} did not answer {method} {path} "
                                          f"within {self.timeout:g} s") from error
        raise ConnectionError(f"cannot reach the CT-SAM3D server at {self.url} ({problem}; tried {attempts} times)")

    def call(self, method: str, path: str, payload: Optional[Mapping[str, Any]] = None,
             body: Optional[bytes] = None, headers: Optional[Mapping[str, str]] = None,
             on_preview: Optional[Callable[[Mapping[str, Any]], None]] = None) -> Dict[str, Any]:
        """A request with a JSON ``payload`` (or a raw ``body``) whose answer is JSON; refusals raise:
        SessionInputError (the input), IndexError (nothing to undo), PermissionError (the token),
        ``_RecoverableError`` (what a session recovers from), ServerError (anything else). With
        ``on_preview`` the prompt asks for previews, and each is handed to it (encoded) as it arrives."""
        if payload is not None:
            if on_preview is not None:
                payload = {**payload, "previews": True}
            body = json.dumps(payload, allow_nan=False).encode("utf-8")
            headers = {"Content-Type": "application/json"}
        if on_preview is not None:
            headers = {**(headers or {}), "Accept": f"{protocol.STREAM_MEDIA_TYPE}, application/json"}
        read = _json_answer if on_preview is None else functools.partial(self._streamed_answer, on_preview)
        status, answer = self.exchange(method, path, body, headers, read=read)
        if 200 <= status < 300:
            return answer
        message = str(answer.get("error", f"HTTP {status}")) if isinstance(answer, dict) else f"HTTP {status}"
        kind = answer.get("kind") if isinstance(answer, dict) else None
        if kind == protocol.KIND_INPUT or status == 413:
            raise SessionInputError(message)
        if kind == protocol.KIND_NOTHING_TO_UNDO:
            raise IndexError(message)
        if status == 401:
            raise PermissionError(f"the CT-SAM3D server at {self.url} refused the request: {message}")
        error = _RecoverableError if kind in _RECOVERABLE else ServerError
        raise error(f"the CT-SAM3D server at {self.url} answered {method} {path} with {status}: {message}",
                    status, kind)

    def _streamed_answer(self, on_preview: Callable[[Mapping[str, Any]], None], status: int,
                         response: Any) -> Tuple[int, Any]:
        """The answer of a prompt that asked for previews: each preview frame handed to ``on_preview`` as it
        arrives, then the last frame's answer, or its error with the status it states. A refusal before the
        stream, or a server that streams nothing (an older one), answers plain JSON."""
        if not response.headers.get("Content-Type", "").startswith(protocol.STREAM_MEDIA_TYPE):
            return _json_answer(status, response)
        try:
            for line in response:
                kind, frame = protocol.read_frame(line)
                if kind == protocol.FRAME_PREVIEW:
                    on_preview(frame[kind])
                elif kind == protocol.FRAME_ANSWER:
                    return status, frame[kind]
                elif isinstance(frame.get("status"), int):
                    return frame["status"], frame
                else:
                    raise protocol.WireError(f"an error frame without its status: {line[:200]!r}")
        except protocol.WireError as error:
            raise ServerError(f"the CT-SAM3D server at {self.url} sent a malformed answer: {error}") from error
        raise ServerError(f"the CT-SAM3D server at {self.url} ended its answer before its last frame")

    def has(self, digest: str) -> bool:
        status, data = self.exchange("HEAD", f"{protocol.API}/images/{digest}")
        if status in (200, 404):
            return status == 200
        if status == 401:
            raise PermissionError(f"the CT-SAM3D server at {self.url} refused the request: its bearer token is "
                                  "missing or not one the server accepts")
        raise ServerError(f"the CT-SAM3D server at {self.url} answered HEAD with {status}", status)


def server_health(url: str, token: Optional[str] = None, timeout: float = 30.0, retries: int = 2) -> Dict[str, Any]:
    """The server's /health answer (status, version, device, precision, model, sessions, queue), once it has
    accepted ``token`` too (/health itself needs none): ConnectionError when it cannot be reached,
    PermissionError when it refuses the token."""
    client = _Client(url, token, timeout, retries)
    health = client.call("GET", "/health")
    client.has("0" * 64)
    return health


@dataclass(frozen=True)
class _Prompt:
    """One prompt of the session: a click, or a box (with the click at its centre that it adds)."""

    click: Click
    corners: Optional[Corners] = None


@dataclass(frozen=True)
class _Upload:
    """An array for the server, with its name there."""

    array: np.ndarray
    digest: str


@dataclass(frozen=True)
class _InitialMask:
    upload: _Upload
    geometry: Dict[str, List[float]]
    mask: np.ndarray
    """The mask as the session sees it: 0/1 uint8, (z, y, x)."""


def _geometry(image: sitk.Image) -> Dict[str, List[float]]:
    return {"origin": list(image.GetOrigin()), "spacing": list(image.GetSpacing()),
            "direction": list(image.GetDirection())}


def _upload_of(array: np.ndarray) -> _Upload:
    try:
        array = protocol.wire_array(array)
    except protocol.WireError as error:
        raise SessionInputError(str(error)) from error
    return _Upload(array, protocol.array_digest(array))


def _checked_image(image: Any, what: str) -> sitk.Image:
    if not isinstance(image, sitk.Image):
        raise SessionInputError(f"{what} must be a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SessionInputError(f"{what} must be a 3D scalar image, got {image.GetDimension()}D with "
                                f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    return image


def _initial_mask(mask: Optional[sitk.Image]) -> Optional[_InitialMask]:
    if mask is None:
        return None
    inside = (sitk.GetArrayViewFromImage(_checked_image(mask, "the initial mask")) != 0).astype(np.uint8)
    return _InitialMask(_upload_of(inside), _geometry(mask), inside)


class RemoteSession:
    """Click-driven segmentation of one CT by a CT-SAM3D server (``ctsam3d serve``); see the module docstring.

    ``url``: the server, e.g. http://gpu-server:8000. ``token``: its bearer token (needed unless it
    serves loopback only). ``timeout``: seconds to wait for one answer (a click may queue behind other
    users' clicks). ``retries``: further tries of a failed connection. ``session_options``: those of
    ``InteractiveSession`` listed in ``SESSION_OPTIONS``. ``device`` and ``precision`` tell what the server
    runs on. ``close()`` (or leaving a ``with`` block) frees the session on the server at once; otherwise
    it goes after the server's idle timeout. Like ``InteractiveSession``, one thread at a time uses it.
    """

    def __init__(self, url: str, image: sitk.Image, token: Optional[str] = None, *, timeout: float = 300.0,
                 retries: int = 10, **session_options: Any) -> None:
        unknown = sorted(set(session_options) - set(SESSION_OPTIONS))
        if unknown:
            raise TypeError(f"RemoteSession takes no option {', '.join(unknown)} (it takes "
                            f"{', '.join(SESSION_OPTIONS)}; device, precision and sampling are the server's choice)")
        self._client = _Client(url, token, timeout, retries)
        self.url = self._client.url
        self.image = _checked_image(image, "the image")
        self._image = _upload_of(sitk.GetArrayViewFromImage(image))
        self._options = protocol.encode_session_options(session_options)
        self._initial = _initial_mask(session_options.get("initial_mask"))
        self._mask = self._starting_mask(self._initial)
        self._prompts: List[_Prompt] = []
        self._session_id: Optional[str] = None
        self._closed = False
        self._max_image_bytes: Optional[int] = None
        self._warned = False
        self.device = ""
        """The server's device (e.g. "cuda"), as it reported it."""
        self.precision = ""
        """The precision the server runs the network at."""
        self.last_timing: Dict[str, float] = {}
        """The server's timing of the last click (as ``InteractiveSession.last_timing``)."""
        self._patch_count = 0
        self._unsure = False
        """Whether the server's session may differ from this client's prompts (a request broke off)."""
        self._open()

    # ----------------------------------------------------------------- state
    @property
    def session_id(self) -> Optional[str]:
        """The server's name for this session (it changes when the session is opened again)."""
        return self._session_id

    @property
    def clicks(self) -> List[Click]:
        return [prompt.click for prompt in self._prompts]

    @property
    def patch_count(self) -> int:
        return self._patch_count

    @property
    def mask(self) -> sitk.Image:
        """The current mask: uint8 0/1 with the image's size, origin, spacing and direction."""
        image = sitk.GetImageFromArray(self._mask)
        image.CopyInformation(self.image)
        return image

    def mask_array(self) -> np.ndarray:
        """A copy of the current mask as a (z, y, x) uint8 array."""
        return self._mask.copy()

    # ----------------------------------------------------------------- prompts
    def add_click(self, point_lps: Sequence[float], positive: bool = True,
                  progress: Optional[ProgressCallback] = None,
                  preview: Optional[PreviewCallback] = None) -> MaskUpdate:
        """Adds a positive or negative click at a world point (LPS mm); returns what it changed. ``progress``
        hears (0, 1) before the request and (decoded, decoded) after it (the server does not report the
        patches as it goes); an exception from it before the request cancels the click. ``preview`` is
        shown the server's previews as they arrive, the same ``MaskUpdate``s as ``InteractiveSession``'s
        (a slow reader may miss some: the server sends the newest); an exception from it abandons the click
        (the server, told by the closed connection, abandons it too or finishes it: the next call brings the
        server back to this client's prompts)."""
        click = Click(checked_point(point_lps), bool(positive))
        update, _ = self._prompt("click", {"point_lps": list(click.point_lps), "positive": click.positive},
                                 progress, preview)
        self._prompts.append(_Prompt(click))
        return update

    def add_box(self, corner_a_lps: Sequence[float], corner_b_lps: Sequence[float],
                progress: Optional[ProgressCallback] = None,
                preview: Optional[PreviewCallback] = None) -> MaskUpdate:
        """Prompts with a box (two opposite LPS corners), as ``InteractiveSession.add_box``; ``progress`` and
        ``preview`` as ``add_click``."""
        corners = checked_corners((corner_a_lps, corner_b_lps), "a box")
        click = Click(box_centre(as_box(*corners)), True)
        update, _ = self._prompt("box", {"corners_lps": [list(c) for c in corners]}, progress, preview)
        self._prompts.append(_Prompt(click, corners))
        return update

    def undo(self) -> MaskUpdate:
        """Takes back the last prompt; IndexError when there is none."""
        answer = self._on_session("POST", "undo", {"expected_clicks": len(self._prompts)})
        self._prompts.pop()
        return self._apply(answer)

    def set_clicks(self, clicks: Sequence[Tuple[Sequence[float], bool]],
                   progress: Optional[ProgressCallback] = None,
                   preview: Optional[PreviewCallback] = None) -> MaskUpdate:
        """Makes the click list equal ``clicks`` ((point_lps, positive) pairs), as
        ``InteractiveSession.set_clicks``: prompts they share with the current ones at the start stay.
        ``progress`` and ``preview`` as ``add_click``; if either stops it, the clicks the server had added
        in earlier requests stay applied."""
        wanted = [Click(checked_point(point), bool(positive)) for point, positive in clicks]
        if progress is not None:
            progress(0, 1)
        payload = {"clicks": [[list(c.point_lps), c.positive] for c in wanted]}
        kept = kept_clicks(wanted, self.clicks)
        updates = []
        for answer in self._in_steps(lambda: self._on_session("PUT", "clicks", payload, preview), len(wanted)):
            updates.append(self._apply(answer))
            reached = min(max(int(answer.get("clicks", len(wanted))), 0), len(wanted))
            shared = min(kept, reached)
            self._prompts = self._prompts[:shared] + [_Prompt(click) for click in wanted[shared:reached]]
        return self._finish(self._enclosing(updates), progress)

    def reset(self, initial_mask: Optional[sitk.Image] = None) -> None:
        """Forgets every prompt; starts again from ``initial_mask`` (on the image's grid; nonzero is inside),
        or from nothing."""
        initial = _initial_mask(initial_mask)
        self._after_uploads([] if initial is None else [initial.upload],
                            lambda: self._on_session("POST", "reset", self._initial_payload(initial)))
        self._initial = initial
        self._prompts = []
        self._mask = self._starting_mask(initial)
        self.last_timing = {}
        self._patch_count = 0

    def close(self) -> None:
        """Closes the session on the server. A server that is gone, or no longer knows the session, is no
        error here: either way nothing is left to free."""
        if self._closed:
            return
        self._closed = True
        if self._session_id is None:
            return
        try:
            status, data = self._client.exchange("DELETE", f"{protocol.API}/sessions/{self._session_id}", retries=0)
        except ConnectionError:
            return
        if status not in (204, 404):
            raise ServerError(f"the CT-SAM3D server at {self.url} answered DELETE with {status}: "
                              f"{data[:200].decode('utf-8', 'replace')}", status)

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- internals
    def _prompt(self, action: str, payload: Dict[str, Any], progress: Optional[ProgressCallback],
                preview: Optional[PreviewCallback]) -> Tuple[MaskUpdate, Dict[str, Any]]:
        if progress is not None:
            progress(0, 1)
        answer = self._on_session("POST", action, {**payload, "expected_clicks": len(self._prompts)}, preview)
        return self._finish(self._apply(answer), progress), answer

    def _finish(self, update: MaskUpdate, progress: Optional[ProgressCallback]) -> MaskUpdate:
        if progress is not None:
            decoded = int(self.last_timing.get("patches_decoded", 1))
            progress(decoded, decoded)
        return update

    def _apply(self, answer: Mapping[str, Any]) -> MaskUpdate:
        """Applies an answer's update to this client's mask; takes its timing and patch count."""
        update = protocol.decode_update(answer["update"], self._mask.shape)
        update.apply_to(self._mask)
        self.last_timing = {str(name): float(value) for name, value in answer.get("timing", {}).items()}
        self._patch_count = int(answer.get("patches_open", 0))
        return update

    def _on_session(self, method: str, action: str, payload: Optional[Mapping[str, Any]] = None,
                    preview: Optional[PreviewCallback] = None) -> Dict[str, Any]:
        """A request on the session, after re-opening it when the server lost it, or bringing it back to this
        client's prompts when it diverged (``expected_clicks`` did not match) or may have (an earlier request
        broke off before its answer: ``_unsure``). ``preview`` is shown the request's previews."""
        if self._closed:
            raise RuntimeError("this RemoteSession was closed")
        on_preview = None if preview is None else (
            lambda encoded: preview(protocol.decode_update(encoded, self._mask.shape)))
        recovery: Optional[str] = None
        for attempt in range(RECOVERIES + 1):
            try:
                if recovery == protocol.KIND_UNKNOWN_SESSION:
                    self._open()
                elif recovery == protocol.KIND_CLICK_COUNT or self._unsure:
                    self._synchronise(fresh=False)
                return self._answer_of(method, action, payload, on_preview)
            except _RecoverableError as refusal:
                recoverable = (protocol.KIND_UNKNOWN_SESSION, protocol.KIND_CLICK_COUNT)
                if refusal.kind not in recoverable or attempt == RECOVERIES:
                    raise
                recovery = refusal.kind
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _answer_of(self, method: str, action: str, payload: Optional[Mapping[str, Any]],
                   on_preview: Optional[Callable[[Mapping[str, Any]], None]]) -> Dict[str, Any]:
        """The server's answer to a request on the session. When it breaks off without one (the connection,
        or the caller's preview, stopped it), the server may have done the work or not: ``_unsure`` makes the
        next request bring the server back to this client's prompts first."""
        try:
            return self._client.call(method, f"{protocol.API}/sessions/{self._session_id}/{action}", payload,
                                     on_preview=on_preview)
        except (ServerError, SessionInputError, IndexError, PermissionError) as refusal:
            if getattr(refusal, "status", 0) is None:
                self._unsure = True
            raise
        except BaseException:
            self._unsure = True
            raise

    def _open(self) -> None:
        """Opens a session on the server (uploading what it lacks) and replays this client's prompts."""
        body = {"image": self._image.digest, **_geometry(self.image), "options": self._options,
                **self._initial_payload(self._initial)}
        uploads = [self._image] + ([self._initial.upload] if self._initial is not None else [])
        answer = self._after_uploads(uploads, lambda: self._client.call("POST", f"{protocol.API}/sessions", body))
        self._session_id = answer["session"]
        self.device, self.precision = str(answer.get("device", "")), str(answer.get("precision", ""))
        if not self._warned:
            self._warned = True
            for message in answer.get("warnings", []):
                warnings.warn(f"server: {message}", stacklevel=3)
        if self._prompts:
            self._synchronise(fresh=True)
        self._unsure = False

    def _after_uploads(self, uploads: Sequence[_Upload], request: Callable[[], T]) -> T:
        """``request()`` once the server holds ``uploads``; once more if it dropped one of them meanwhile (its
        cache is shared by every user)."""
        for attempt in range(2):
            for upload in uploads:
                self._upload(upload)
            try:
                return request()
            except _RecoverableError as refusal:
                if refusal.kind != protocol.KIND_UNKNOWN_IMAGE or attempt:
                    raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _synchronise(self, fresh: bool) -> None:
        """Brings the server's session to this client's prompts, then takes its whole mask. Clicks alone
        are set in one request; boxes are replayed one by one from the start (set_clicks knows no boxes)."""
        session = f"{protocol.API}/sessions/{self._session_id}"
        if any(prompt.corners is not None for prompt in self._prompts):
            if not fresh:
                self._after_uploads([] if self._initial is None else [self._initial.upload],
                                    lambda: self._client.call("POST", f"{session}/reset",
                                                              self._initial_payload(self._initial)))
            for count, prompt in enumerate(self._prompts):
                if prompt.corners is None:
                    self._client.call("POST", f"{session}/click", {
                        "point_lps": list(prompt.click.point_lps), "positive": prompt.click.positive,
                        "expected_clicks": count})
                else:
                    self._client.call("POST", f"{session}/box", {
                        "corners_lps": [list(c) for c in prompt.corners], "expected_clicks": count})
        else:
            payload = {"clicks": [[list(prompt.click.point_lps), prompt.click.positive] for prompt in self._prompts]}
            for _ in self._in_steps(lambda: self._client.call("PUT", f"{session}/clicks", payload), len(self._prompts)):
                pass
        answer = self._client.call("GET", f"{session}/mask")
        self._mask = protocol.decode_update(answer["update"], self._mask.shape).mask
        self._patch_count = int(answer.get("patches_open", 0))
        self._unsure = False

    def _in_steps(self, put_clicks: Callable[[], Dict[str, Any]], count: int) -> Iterator[Dict[str, Any]]:
        """The answers of ``PUT .../clicks`` sent until the session holds all ``count`` clicks: a server adds
        a bounded number per request (each waits its turn behind other users) and says how far it got."""
        reached = -1
        while True:
            answer = put_clicks()
            yield answer
            previous, reached = reached, int(answer.get("clicks", count))
            if reached >= count:
                return
            if reached <= previous:
                raise ServerError(f"the CT-SAM3D server at {self.url} stopped at {reached} of the {count} clicks sent")

    def _enclosing(self, updates: Sequence[MaskUpdate]) -> MaskUpdate:
        """One update covering several, read from this client's mask (which holds them all)."""
        boxes = [(np.array(u.start), np.array(u.start) + u.size) for u in updates if not u.empty]
        if not boxes:
            return MaskUpdate.nothing()
        low = np.min([box[0] for box in boxes], axis=0)
        high = np.max([box[1] for box in boxes], axis=0)
        slices = tuple(slice(a, b) for a, b in zip(low[::-1], high[::-1]))
        return MaskUpdate(tuple(int(v) for v in low), self._mask[slices].copy())

    def _upload(self, upload: _Upload) -> None:
        """Sends an array unless the server has it already."""
        if self._client.has(upload.digest):
            return
        if self._max_image_bytes is None:
            self._max_image_bytes = int(self._client.call("GET", "/health").get("max_image_bytes", 0))
        if self._max_image_bytes and upload.array.nbytes > self._max_image_bytes:
            raise SessionInputError(f"the image is {upload.array.nbytes / 2**20:.1f} MiB; the server at {self.url} "
                                    f"takes at most {self._max_image_bytes / 2**20:.1f} MiB")
        self._client.call("PUT", f"{protocol.API}/images/{upload.digest}", body=protocol.compress(upload.array),
                          headers={**protocol.array_headers(upload.array), "Content-Type": "application/octet-stream"})

    @staticmethod
    def _initial_payload(initial: Optional[_InitialMask]) -> Dict[str, Union[str, None, Dict[str, List[float]]]]:
        if initial is None:
            return {"initial_mask": None}
        return {"initial_mask": initial.upload.digest, "initial_mask_geometry": initial.geometry}

    def _starting_mask(self, initial: Optional[_InitialMask]) -> np.ndarray:
        if initial is not None and initial.mask.shape == self._image.array.shape:
            return initial.mask.copy()
        return np.zeros(self._image.array.shape, dtype=np.uint8)
