"""The wire format of ``ctsam3d serve``: the contract between the server and ``RemoteSession``, owned by
neither (numpy and stdlib only).

No pickle anywhere: requests and answers are JSON; arrays travel as zlib-compressed raw bytes in C
order, (z, y, x), with their dtype (one of ``DTYPES``, little-endian) and shape stated beside them.
An image is named by ``array_digest``, the SHA-256 of its voxel bytes, dtype and shape, so that a
client uploads a scan once and any later session on it (its own or another user's) names it only.

Mask updates (``encode_update``) are ``MaskUpdate``s: {"start": [x, y, z], "shape": [nz, ny, nx],
"dtype": "uint8", "data": base64 of the zlib-compressed mask bytes}.

Errors are one-line JSON objects {"error": message, "kind": one of the ``KIND_*`` names}.

A prompt that asks for previews ("previews": true) is answered, once its first preview or its result is
ready, with a stream of ``STREAM_MEDIA_TYPE``: one JSON object per line (a frame, ``frame_bytes``), zero
or more {"preview": update}, then exactly one last frame, {"answer": the answer a prompt without previews
gets} or {"status": the status it would have had, "error": ..., "kind": ...}. A prompt refused before
anything was streamed is answered as without previews (its status and JSON error).

Session options (``SESSION_OPTIONS``) are declared here once: the client encodes them with
``encode_session_options``, and the server builds its request model from the same declarations.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from .interface import MaskUpdate, checked_corners

API = "/v1"
"""Prefix of every versioned route."""

DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")
"""Voxel types an uploaded array may have (always little-endian on the wire)."""

DTYPE_HEADER = "X-Array-Dtype"
SHAPE_HEADER = "X-Array-Shape"

COMPRESSION_LEVEL = 1
"""zlib level 1: on a 139 MB float32 CT, 1.7 s for 47 MB, where level 6 takes 11.7 s for 42 MB."""

STREAM_MEDIA_TYPE = "application/x-ndjson"
"""The media type of a prompt's answer with previews: newline-delimited JSON frames."""

FRAME_PREVIEW = "preview"
FRAME_ANSWER = "answer"
FRAME_ERROR = "error"
"""The key that tells a streamed frame's kind (an error frame also carries "status" and "kind")."""

KIND_BAD_REQUEST = "bad_request"
"""The request does not follow the protocol (bad JSON, wrong types, unknown dtype, wrong byte count)."""
KIND_INPUT = "input"
"""The session refused an image, click or option (``SessionInputError`` on the client)."""
KIND_NOTHING_TO_UNDO = "nothing_to_undo"
KIND_CLICK_COUNT = "click_count"
"""``expected_clicks`` differs from the session's click count (the answer carries ``clicks``)."""
KIND_UNKNOWN_SESSION = "unknown_session"
KIND_UNKNOWN_IMAGE = "unknown_image"
KIND_UNAUTHORIZED = "unauthorized"
KIND_FORBIDDEN = "forbidden"
"""A server without tokens refused a request that looks like another site's web page (Host, Origin)."""
KIND_TOO_LARGE = "too_large"
KIND_BUSY = "busy"
"""Too many sessions open, or too many requests queued for one session."""
KIND_NOT_FOUND = "not_found"
KIND_INTERNAL = "internal"

OPTION_BOOLEAN = "boolean"
OPTION_WHOLE = "whole"
OPTION_CORNERS = "corners"
"""The kinds of session option: true or false; a whole number; two opposite corners [[x, y, z], [x, y, z]]
(LPS mm)."""


@dataclass(frozen=True)
class SessionOption:
    """An ``InteractiveSession`` option a client may choose for its session on the server: its name (the
    session's keyword and the key in a session's "options") and its kind (one of the ``OPTION_*``)."""

    name: str
    kind: str


SESSION_OPTIONS = (
    SessionOption("cross_patch", OPTION_BOOLEAN),
    SessionOption("max_patches", OPTION_WHOLE),
    SessionOption("box_lps", OPTION_CORNERS),
    SessionOption("cross_patch_box_lps", OPTION_CORNERS),
)
"""What a client may choose; device, precision and sampling are the server's. Absent or null: the
session's default."""

SESSION_OPTION_NAMES = tuple(option.name for option in SESSION_OPTIONS)


def encode_session_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """The "options" of a session-opening request from ``InteractiveSession`` keywords (those of
    ``SESSION_OPTIONS`` that are given and not None); corners that are not two points of 3 finite numbers
    are refused with a ``SessionInputError``, as the session refuses them."""
    encoded: Dict[str, Any] = {}
    for option in SESSION_OPTIONS:
        value = options.get(option.name)
        if value is None:
            continue
        if option.kind == OPTION_BOOLEAN:
            encoded[option.name] = bool(value)
        elif option.kind == OPTION_WHOLE:
            encoded[option.name] = int(value)
        else:
            encoded[option.name] = [list(corner) for corner in checked_corners(value, option.name)]
    return encoded


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WHOLE = re.compile(r"^[0-9]{1,18}$")
"""A whole number in ASCII digits (str.isdigit also takes the likes of "²", which int() refuses)."""


class WireError(ValueError):
    """A payload that breaks the wire format; ``status`` and ``kind`` are how the server refuses it."""

    def __init__(self, message: str, status: int = 400, kind: str = KIND_BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def wire_array(array: np.ndarray) -> np.ndarray:
    """``array`` as it travels: 3D, C-contiguous, little-endian, of one of ``DTYPES`` (a view when it is
    already so)."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise WireError(f"expected a 3D (z, y, x) array, got {array.ndim} dimensions")
    if array.dtype.name not in DTYPES:
        raise WireError(f"voxels of type {array.dtype} cannot be sent; use one of {', '.join(DTYPES)}")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def array_digest(array: np.ndarray) -> str:
    """The SHA-256 (hex) that names an array on the wire: of a header with its dtype and shape, then its
    voxel bytes as ``wire_array`` lays them out. Both ends compute it here, so they cannot disagree."""
    array = wire_array(array)
    digest = digest_start(array.dtype, array.shape)
    digest.update(_raw(array))
    return digest.hexdigest()


def digest_start(dtype: np.dtype, shape: Sequence[int]) -> Any:
    """The SHA-256 of ``array_digest`` before the voxel bytes: fed them as they arrive, it names the array."""
    nz, ny, nx = shape
    return hashlib.sha256(f"ctsam3d-array-v1 {dtype.name} {nz} {ny} {nx}\n".encode("ascii"))


def is_digest(text: Any) -> bool:
    return isinstance(text, str) and bool(_SHA256.match(text))


def is_whole_number(text: str) -> bool:
    return bool(_WHOLE.match(text))


def array_headers(array: np.ndarray) -> Dict[str, str]:
    """The headers that state an uploaded array's dtype and shape."""
    array = wire_array(array)
    return {DTYPE_HEADER: array.dtype.name, SHAPE_HEADER: ",".join(str(n) for n in array.shape)}


def parse_dtype(text: str) -> np.dtype:
    if text not in DTYPES:
        raise WireError(f"{DTYPE_HEADER} must be one of {', '.join(DTYPES)}, got {text!r}")
    return np.dtype(text).newbyteorder("<")


def parse_shape(text: str) -> Tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(_WHOLE.match(part.strip()) for part in parts):
        raise WireError(f"{SHAPE_HEADER} must be nz,ny,nx (three whole numbers), got {text!r}")
    shape = tuple(int(part) for part in parts)
    if min(shape) < 1:
        raise WireError(f"{SHAPE_HEADER} must have no empty axis, got {text!r}")
    return shape


def compress(array: np.ndarray) -> bytes:
    """An array's bytes (as ``wire_array`` lays them out), zlib-compressed."""
    return zlib.compress(_raw(wire_array(array)), COMPRESSION_LEVEL)


def _raw(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (an empty array too, which memoryview.cast refuses)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def compressed_limit(raw_bytes: int) -> int:
    """The most bytes zlib can make of ``raw_bytes`` incompressible bytes (stored blocks: 5 bytes per
    16 kB, plus the stream's header and checksum), with room to spare."""
    return raw_bytes + raw_bytes // 1000 + 1024


def inflate(data: bytes, expected_bytes: int) -> bytes:
    """Decompresses ``data``, which must give exactly ``expected_bytes``. Never expands more than one
    byte past that: a compression bomb is refused (413) after ``expected_bytes + 1`` bytes, whatever
    it would have grown to."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, expected_bytes + 1)
    except zlib.error as error:
        raise WireError(f"the body is not zlib-compressed data ({error})") from error
    if len(raw) > expected_bytes:
        raise WireError(f"the body decompresses to more than the {expected_bytes} bytes its dtype and shape "
                        "state", status=413, kind=KIND_TOO_LARGE)
    if not inflater.eof:
        raise WireError(f"the compressed body is truncated: it gives {len(raw)} of {expected_bytes} bytes")
    if inflater.unused_data:
        raise WireError(f"{len(inflater.unused_data)} bytes follow the end of the compressed body")
    if len(raw) != expected_bytes:
        raise WireError(f"the body decompresses to {len(raw)} bytes, but its dtype and shape make "
                        f"{expected_bytes}")
    return raw


def decode_array(data: bytes, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
    """The array held by a compressed body of stated ``dtype`` and ``shape`` (see ``inflate``)."""
    raw = inflate(data, math.prod(shape) * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def encode_update(update: MaskUpdate) -> Dict[str, Any]:
    """A ``MaskUpdate`` as JSON-ready values."""
    return {
        "start": [int(v) for v in update.start],
        "shape": [int(n) for n in update.mask.shape],
        "dtype": "uint8",
        "data": base64.b64encode(compress(update.mask.astype(np.uint8, copy=False))).decode("ascii"),
    }


def decode_update(payload: Mapping[str, Any], volume_shape: Sequence[int]) -> MaskUpdate:
    """The ``MaskUpdate`` in an answer, checked to fit a whole mask of ``volume_shape`` (z, y, x)."""
    try:
        start = tuple(int(v) for v in payload["start"])
        shape = tuple(int(n) for n in payload["shape"])
        data = base64.b64decode(payload["data"], validate=True)
        dtype = payload["dtype"]
    except (KeyError, TypeError, ValueError, binascii.Error) as error:
        raise WireError(f"malformed mask update ({error!r})") from error
    if dtype != "uint8" or len(start) != 3 or len(shape) != 3 or min(shape) < 0:
        raise WireError(f"malformed mask update: start {start}, shape {shape}, dtype {dtype!r}")
    if min(shape) == 0:
        return MaskUpdate.nothing()
    if min(start) < 0 or any(s + n > size for s, n, size in zip(start[::-1], shape, volume_shape)):
        raise WireError(f"the mask update's box (start {start}, shape {shape}) leaves the image {tuple(volume_shape)}")
    return MaskUpdate(start, decode_array(data, np.dtype(np.uint8), shape).copy())


def frame_bytes(frame: Mapping[str, Any]) -> bytes:
    """One frame of a streamed answer: compact JSON on one line (JSON escapes every newline in a string)."""
    return json.dumps(frame, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def read_frame(line: bytes) -> Tuple[str, Dict[str, Any]]:
    """A streamed frame's kind (``FRAME_PREVIEW``, ``FRAME_ANSWER`` or ``FRAME_ERROR``) and the frame itself."""
    try:
        frame = json.loads(line)
    except ValueError as error:
        raise WireError(f"a streamed frame is not JSON ({error})") from error
    if isinstance(frame, dict):
        for kind in (FRAME_PREVIEW, FRAME_ANSWER, FRAME_ERROR):
            if kind in frame:
                return kind, frame
    raise WireError(f"a streamed frame is none of {FRAME_PREVIEW}, {FRAME_ANSWER}, {FRAME_ERROR}: "
                    f"{line[:80]!r}")


def read_tokens(path: Union[str, Path]) -> List[str]:
    """The bearer tokens in a token file: one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    tokens = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    tokens = [token for token in tokens if token and not token.startswith("#")]
    if not tokens:
        raise ValueError(f"{path} holds no token (one per line)")
    if any(not token.isascii() or any(c.isspace() for c in token) for token in tokens):
        raise ValueError(f"{path}: a token must be printable ASCII without spaces")
    return tokens
