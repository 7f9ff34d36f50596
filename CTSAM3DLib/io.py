"""Reading scans and click lists, writing results, as the command line needs them."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import List, Tuple

import SimpleITK as sitk

Point = Tuple[float, float, float]


def read_image(path: Path) -> sitk.Image:
    """A scan from any file SimpleITK reads, or from a folder holding one DICOM series."""
    path = Path(path)
    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ValueError(f"{path}: the folder holds no DICOM series")
        if len(series) > 1:
            raise ValueError(f"{path}: the folder holds {len(series)} DICOM series ({', '.join(series)}); "
                             "give a folder with one series")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: SimpleITK cannot read this image: {str(error).strip().splitlines()[-1]}") from error


def write_image_atomically(image: sitk.Image, path: Path) -> None:
    """Writes ``image`` so that ``path`` appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".nrrd"
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, temporary, True)
        os.replace(temporary, path)
    except RuntimeError as error:
        raise ValueError(f"{path}: SimpleITK cannot write this format: {str(error).strip().splitlines()[-1]}") \
            from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def ras_to_lps(point: Point) -> Point:
    """3D Slicer's RAS world coordinates to ITK's LPS (x and y negated); its own inverse."""
    return (-point[0], -point[1], point[2])


def parse_point(text: str) -> Point:
    parts = text.replace(" ", "").split(",")
    if len(parts) != 3:
        raise ValueError(f"a point is X,Y,Z in millimetres, got {text!r}")
    try:
        return tuple(float(part) for part in parts)
    except ValueError as error:
        raise ValueError(f"a point is X,Y,Z in millimetres, got {text!r}") from error


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
