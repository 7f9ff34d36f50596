"""What ``ctsam3d serve`` refuses requests with (``ApiError``), and the checks of what is not a JSON body
(the path's digest, Content-Length, a stated geometry's bounds); the bodies are ``request_bodies``' models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from starlette.requests import Request

from .. import protocol
from . import bounds


class ApiError(Exception):
    """A refused request: answered with ``status`` and {"error": message, "kind": kind, **extra}."""

    def __init__(self, status: int, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.kind, self.extra = status, kind, extra


def bad_request(message: str) -> ApiError:
    return ApiError(400, protocol.KIND_BAD_REQUEST, message)


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
    def checked(cls, origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float],
                what: str) -> Geometry:
        """A stated geometry (already numbers), refused when no scanner makes it (``bounds.geometry_problem``)."""
        geometry = cls(list(origin), list(spacing), list(direction))
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
