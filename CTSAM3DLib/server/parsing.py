"""Parsing the JSON and headers of ``ctsam3d serve``'s requests: every malformed value refused as an
``ApiError`` (400 unless said) naming the field, before any work is queued."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from starlette.requests import Request

from .. import protocol
from . import bounds

SESSION_OPTIONS = ("cross_patch", "max_patches", "box_lps", "cross_patch_box_lps")
"""``InteractiveSession`` options a client may choose; device, precision and sampling are the server's."""


class ApiError(Exception):
    """A refused request: answered with ``status`` and {"error": message, "kind": kind, **extra}."""

    def __init__(self, status: int, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.kind, self.extra = status, kind, extra


def bad_request(message: str) -> ApiError:
    return ApiError(400, protocol.KIND_BAD_REQUEST, message)


def parse_number(value: Any, what: str) -> float:
    """A JSON number (NaN and infinities pass: the session refuses them as input, as it would locally)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{what} must be a number, got {type(value).__name__}")
    return float(value)


def parse_numbers(value: Any, count: int, what: str) -> List[float]:
    if not isinstance(value, list) or len(value) != count:
        raise bad_request(f"{what} must be a list of {count} numbers")
    return [parse_number(item, what) for item in value]


def parse_finite_numbers(value: Any, count: int, what: str) -> List[float]:
    numbers = parse_numbers(value, count, what)
    if not all(math.isfinite(v) for v in numbers):
        raise bad_request(f"{what} must be finite numbers")
    return numbers


def parse_boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"{what} must be true or false")
    return value


def parse_whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{what} must be a whole number")
    return value


def parse_corners(value: Any, what: str) -> Tuple[List[float], List[float]]:
    if not isinstance(value, list) or len(value) != 2:
        raise bad_request(f"{what} must be two corners [[x, y, z], [x, y, z]]")
    return parse_numbers(value[0], 3, what), parse_numbers(value[1], 3, what)


def parse_expected_clicks(body: Mapping[str, Any]) -> Optional[int]:
    value = body.get("expected_clicks")
    return None if value is None else parse_whole(value, "expected_clicks")


def parse_digest(value: Any, what: str) -> str:
    if not protocol.is_digest(value):
        raise bad_request(f"{what} must be a SHA-256 in lowercase hex")
    return value


def check_declared_length(request: Request, limit: int) -> None:
    """413 when the request's Content-Length passes ``limit``, before anything is read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not protocol.is_whole_number(declared.strip()):
            raise bad_request("Content-Length is not a whole number")
        if int(declared) > limit:
            raise ApiError(413, protocol.KIND_TOO_LARGE, f"the body is {int(declared)} bytes; this request takes "
                           f"at most {limit}")


@dataclass(frozen=True)
class Geometry:
    origin: List[float]
    spacing: List[float]
    direction: List[float]

    @classmethod
    def parse(cls, body: Mapping[str, Any], what: str) -> Geometry:
        geometry = cls(parse_finite_numbers(body.get("origin"), 3, f"{what} origin"),
                       parse_finite_numbers(body.get("spacing"), 3, f"{what} spacing"),
                       parse_finite_numbers(body.get("direction"), 9, f"{what} direction"))
        problem = bounds.geometry_problem(geometry.origin, geometry.spacing, geometry.direction)
        if problem:
            raise bad_request(f"{what} {problem}")
        return geometry

    def key(self) -> Tuple[float, ...]:
        return (*self.origin, *self.spacing, *self.direction)

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(list(image.GetOrigin()), list(image.GetSpacing()), list(image.GetDirection()))

    def image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


def parse_options(value: Any, max_patches: int) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("options must be an object")
    unknown = sorted(set(value) - set(SESSION_OPTIONS))
    if unknown:
        raise bad_request(f"unknown option(s) {', '.join(unknown)}; a client may set {', '.join(SESSION_OPTIONS)}")
    options: Dict[str, Any] = {}
    if value.get("cross_patch") is not None:
        options["cross_patch"] = parse_boolean(value["cross_patch"], "cross_patch")
    if value.get("max_patches") is not None:
        options["max_patches"] = parse_whole(value["max_patches"], "max_patches")
        if options["max_patches"] > max_patches:
            raise ApiError(400, protocol.KIND_INPUT, f"max_patches is at most {max_patches} on this server (ctsam3d "
                           f"serve --max-patches), got {options['max_patches']}")
    for name in ("box_lps", "cross_patch_box_lps"):
        if value.get(name) is not None:
            options[name] = parse_corners(value[name], name)
    return options
