"""Click lists as the command line takes them: numbers typed as X,Y,Z, and points files (CSV, or a 3D
Slicer markups file)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Tuple

Point = Tuple[float, float, float]


def parse_numbers(text: str, count: int, form: str) -> Tuple[float, ...]:
    """``count`` comma-separated numbers; ValueError saying the ``form`` (e.g. "a point is X,Y,Z")."""
    parts = text.replace(" ", "").split(",")
    try:
        numbers = tuple(float(part) for part in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != count:
        raise ValueError(f"{form} in millimetres, got {text!r}")
    return numbers


def parse_point(text: str) -> Point:
    return parse_numbers(text, 3, "a point is X,Y,Z")


def read_points_file(path: Path, default_ras: bool) -> List[Tuple[Point, bool, bool]]:
    """(point, is_ras, positive) rows from a CSV (columns x, y, z and optionally label: 1 positive,
    0 negative) or a 3D Slicer markups file (.mrk.json; its coordinate system is honoured, points
    whose label starts with '-' or in a list named like 'negative' are negative)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"points file not found: {path}")
    if path.name.lower().endswith(".json"):
        return _read_markups(path)
    rows = []
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        missing = {"x", "y", "z"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: a points CSV needs columns x, y, z (missing {', '.join(sorted(missing))})")
        for number, row in enumerate(reader, start=2):
            try:
                point = (float(row["x"]), float(row["y"]), float(row["z"]))
                positive = str(row.get("label", "1")).strip().lower() not in ("0", "negative", "false")
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: {error}") from error
            rows.append((point, default_ras, positive))
    return rows


def _read_markups(path: Path) -> List[Tuple[Point, bool, bool]]:
    try:
        content = json.loads(path.read_text())
        markups = content["markups"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a 3D Slicer markups file ({error})") from error
    rows = []
    for markup in markups:
        is_ras = str(markup.get("coordinateSystem", "LPS")).upper() == "RAS"
        negative_list = "negative" in str(markup.get("name", "")).lower()
        for control_point in markup.get("controlPoints", []):
            position = control_point.get("position")
            if position is None or len(position) != 3:
                raise ValueError(f"{path}: control point {control_point.get('id', '?')} has no 3D position")
            negative = negative_list or str(control_point.get("label", "")).startswith("-")
            rows.append((tuple(float(v) for v in position), is_ras, not negative))
    return rows
