"""The JSON bodies of ``ctsam3d serve``'s requests, declared as pydantic models.

A body is read by ``app`` (bounded while it streams in) and validated here with ``parse_body``; a value
that does not fit is refused as an ``ApiError`` (400 "bad_request") naming the field, the first wrong
field in declaration order, in the words of the ``Described`` beside it. Each model keeps the order in
which the server checks what a request names: the image a session opens on is looked up (404) before
its geometry is read. Session options come from ``protocol.SESSION_OPTIONS``, declared there for both
the client and the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import ErrorDetails

from .. import protocol
from .parsing import ApiError, bad_request

Model = TypeVar("Model", bound=BaseModel)

# ------------------------------------------------------------------------------------ value types
Number = Annotated[float, Strict()]
"""A JSON number (NaN and infinities pass: the session refuses them as input, as it would locally)."""

FiniteNumber = Annotated[float, Strict(), Field(allow_inf_nan=False)]



def _list_of(count: int) -> BeforeValidator:
    """A JSON list of ``count`` items, checked before its items (so a list of the wrong length is refused
    as that, whatever is in it)."""

    def check(value: Any) -> Any:
        if not isinstance(value, list) or len(value) != count:
            raise ValueError(f"not a list of {count}")
        return value

    return BeforeValidator(check)


Point = Annotated[List[Number], _list_of(3)]

Corners = Annotated[List[Point], _list_of(2)]

Click = Annotated[Tuple[Point, StrictBool], _list_of(2)]

Digest = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True)
class Described:
    """How a field's wrong value is refused: ``what`` names it; ``kind`` is its shape ("numbers" with
    ``count``, "finite numbers", "boolean", "whole", "corners", "digest", "clicks", "object", or
    "geometry": an object whose fields' refusals start with ``what``)."""

    what: str
    kind: str
    count: int = 0

    def refusal(self, error: ErrorDetails, inner: Tuple[Any, ...], fields: Optional[Type[BaseModel]]) -> str:
        """The message for ``error``, found ``inner`` steps below this field's value."""
        if self.kind in ("numbers", "finite numbers"):
            if not inner:
                return f"{self.what} must be a list of {self.count} numbers"
            if error["type"] == "finite_number":
                return f"{self.what} must be finite numbers"
            return f"{self.what} must be a number, got {_json_type(error['input'])}"
        if self.kind == "corners":
            if not inner:
                return f"{self.what} must be two corners [[x, y, z], [x, y, z]]"
            return Described(self.what, "numbers", 3).refusal(error, inner[1:], None)
        if self.kind == "clicks":
            if len(inner) < 2:
                return "clicks must be a list of [[x, y, z], positive] pairs"
            if inner[1] == 0:
                return Described("a click's point", "numbers", 3).refusal(error, inner[2:], None)
            return "a click's sign must be true or false"
        if self.kind in ("object", "geometry") and inner and fields is not None:
            return refusal(fields, error, inner, prefix=f"{self.what} " if self.kind == "geometry" else "")
        return {
            "boolean": f"{self.what} must be true or false",
            "whole": f"{self.what} must be a whole number",
            "digest": f"{self.what} must be a SHA-256 in lowercase hex",
            "object": f"{self.what} must be an object",
            "geometry": f"{self.what} must be an object",
        }[self.kind]


def _json_type(value: Any) -> str:
    return type(value).__name__


def refusal(model: Type[BaseModel], error: ErrorDetails, location: Sequence[Any], prefix: str = "") -> str:
    """The message for ``error`` at ``location`` in ``model``: the ``Described`` of the field it is in."""
    field = model.model_fields[location[0]]
    described = next(item for item in field.metadata if isinstance(item, Described))
    nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
        else _optional_model(field.annotation)
    return prefix + described.refusal(error, tuple(location[1:]), nested)


def _optional_model(annotation: Any) -> Optional[Type[BaseModel]]:
    for argument in getattr(annotation, "__args__", ()):
        if isinstance(argument, type) and issubclass(argument, BaseModel):
            return argument
    return None


def parse_body(model: Type[Model], body: Mapping[str, Any], context: Optional[Dict[str, Any]] = None) -> Model:
    """``body`` (a decoded JSON object) as ``model``; an ``ApiError`` for the first field that does not fit
    (within it, the outermost problem: a list of the wrong length before a wrong item in it)."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as invalid:
        errors = invalid.errors(include_url=False)
        unknown = sorted(str(error["loc"][-1]) for error in errors if error["type"] == "extra_forbidden")
        if unknown:
            raise bad_request(f"unknown option(s) {', '.join(unknown)}; a client may set "
                              f"{', '.join(protocol.SESSION_OPTION_NAMES)}") from None
        first_field = errors[0]["loc"][0]
        error = min((e for e in errors if e["loc"][0] == first_field), key=lambda e: len(e["loc"]))
        raise bad_request(refusal(model, error, error["loc"])) from None


def _described(what: str, kind: str, count: int = 0) -> Described:
    return Described(what, kind, count)


# ------------------------------------------------------------------------------------ the models
_OPTION_TYPES = {
    protocol.OPTION_BOOLEAN: (Optional[StrictBool], "boolean"),
    protocol.OPTION_WHOLE: (Optional[StrictInt], "whole"),
    protocol.OPTION_CORNERS: (Optional[Corners], "corners"),
}

SessionOptions: Type[BaseModel] = create_model(
    "SessionOptions",
    __config__=ConfigDict(extra="forbid"),
    **{option.name: (Annotated[_OPTION_TYPES[option.kind][0], _described(option.name, _OPTION_TYPES[option.kind][1])],
                     None)
       for option in protocol.SESSION_OPTIONS},
)
"""The "options" of a session-opening request, one field per ``protocol.SESSION_OPTIONS``; any other
name is refused."""


class GeometryFields(BaseModel):
    """Where an array lies in the world: origin (LPS mm), spacing (mm), direction (3x3, row-major)."""

    origin: Annotated[List[FiniteNumber], _list_of(3), _described("origin", "finite numbers", 3)]
    spacing: Annotated[List[FiniteNumber], _list_of(3),
                       _described("spacing", "finite numbers", 3)]
    direction: Annotated[List[FiniteNumber], _list_of(9),
                         _described("direction", "finite numbers", 9)]


class OpenSession(BaseModel):
    """POST /v1/sessions: an uploaded image (which the server must hold: 404 "unknown_image" first), its
    geometry, the session's options and optionally an initial mask (uploaded, uint8) with its geometry."""

    image: Annotated[Digest, _described("image", "digest")]
    origin: Annotated[List[FiniteNumber], _list_of(3),
                      _described("the image's origin", "finite numbers", 3)]
    spacing: Annotated[List[FiniteNumber], _list_of(3),
                       _described("the image's spacing", "finite numbers", 3)]
    direction: Annotated[List[FiniteNumber], _list_of(9),
                         _described("the image's direction", "finite numbers", 9)]
    options: Annotated[Optional[SessionOptions], _described("options", "object")] = None  # type: ignore[valid-type]
    initial_mask: Annotated[Optional[Digest], _described("initial_mask", "digest")] = None
    initial_mask_geometry: Annotated[Optional[GeometryFields], _described("initial_mask_geometry", "geometry")] = None

    @field_validator("image")
    @classmethod
    def _held(cls, digest: str, info: ValidationInfo) -> str:
        """The image must be one the server holds (``context["held"]``, a digest -> bool check)."""
        held = (info.context or {}).get("held")
        if held is not None and not held(digest):
            raise ApiError(404, protocol.KIND_UNKNOWN_IMAGE, f"the server does not hold the image {digest}: upload "
                           f"it with PUT {protocol.API}/images/{digest}", image=digest)
        return digest


class Prompt(BaseModel):
    """What every prompt may state: the click count the session must have (else 409 "click_count")."""

    expected_clicks: Annotated[Optional[StrictInt], _described("expected_clicks", "whole")] = None


class Growing(Prompt):
    """A prompt that may open patches: "previews" true streams the mask as it grows (see ``previews``)."""

    previews: Annotated[StrictBool, _described("previews", "boolean")] = False


class AddClick(Growing):
    """POST .../click."""

    point_lps: Annotated[Point, _described("point_lps", "numbers", 3)]
    positive: Annotated[StrictBool, _described("positive", "boolean")] = True


class AddBox(Growing):
    """POST .../box."""

    corners_lps: Annotated[Corners, _described("corners_lps", "corners")]


class SetClicks(BaseModel):
    """PUT .../clicks: the whole click list, [[x, y, z], positive] pairs, and "previews" as ``Growing``."""

    clicks: Annotated[List[Click], _described("clicks", "clicks")]
    previews: Annotated[StrictBool, _described("previews", "boolean")] = False


class Reset(BaseModel):
    """POST .../reset: optionally an initial mask (uploaded, uint8) with its geometry."""

    initial_mask: Annotated[Optional[Digest], _described("initial_mask", "digest")] = None
    initial_mask_geometry: Annotated[Optional[GeometryFields], _described("initial_mask_geometry", "geometry")] = None
