"""Folders of labelled CT scans, in the layouts that training and evaluation read.

A *case* is a folder holding the scan as ``ct.nii.gz`` (or ``ct.nii``) and its labels in one of:

- TotalSegmentator: ``segmentations/<structure>.nii.gz``, one binary mask per structure;
- label map: ``labels.nii.gz`` (integer ids, 0 = background) with ``labels.csv`` giving at least the
  columns ``id`` and ``structure`` (extra columns are ignored); only the ids that occur in the map
  are listed as structures, so a 117-row TotalSegmentator table over a map holding 41 ids lists 41;
- single masks: ``<structure>.nii.gz`` files beside the CT (e.g. ``aorta.nii.gz``);
- no labels at all (a scan kept for inference only): the case has no structures.

``find_cases(root)`` accepts either one case folder or a folder of case folders. Every mask is
returned in the CT's voxel grid as a uint8 0/1 image; a mask whose geometry differs from the CT's is
an error, never silently resampled.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

IMAGE_NAMES = ("ct.nii.gz", "ct.nii")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_MAP_NAME = "labels.nii.gz"
LABEL_TABLE_NAME = "labels.csv"
SEGMENTATIONS_DIR = "segmentations"

LAYOUT_TOTALSEGMENTATOR = "totalsegmentator"
LAYOUT_LABEL_MAP = "label_map"
LAYOUT_MASKS = "masks"
LAYOUT_UNLABELLED = "unlabelled"

# Geometry tolerances: NIfTI stores float32 affines, so exact equality is too strict.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_MM = 1e-3
_DIRECTION_ATOL = 1e-4


class DatasetError(ValueError):
    """A data folder that does not follow one of the supported layouts."""


def _strip_nifti_suffix(name: str) -> Optional[str]:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_image(folder: Path) -> Optional[Path]:
    for name in IMAGE_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def check_same_geometry(image: sitk.Image, reference: sitk.Image, what: str) -> None:
    """Raise `DatasetError` naming ``what`` unless ``image`` lies on ``reference``'s voxel grid."""
    problems = []
    if image.GetSize() != reference.GetSize():
        problems.append(f"size {image.GetSize()} != {reference.GetSize()}")
    if not np.allclose(image.GetSpacing(), reference.GetSpacing(), rtol=_SPACING_RTOL, atol=0.0):
        problems.append(f"spacing {image.GetSpacing()} != {reference.GetSpacing()}")
    if not np.allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0.0, atol=_ORIGIN_ATOL_MM):
        problems.append(f"origin {image.GetOrigin()} != {reference.GetOrigin()}")
    if not np.allclose(image.GetDirection(), reference.GetDirection(), rtol=0.0, atol=_DIRECTION_ATOL):
        problems.append(f"direction {image.GetDirection()} != {reference.GetDirection()}")
    if problems:
        raise DatasetError(f"{what} does not lie on the CT's voxel grid: " + "; ".join(problems))


def _binary_on_grid(array_zyx: np.ndarray, image: sitk.Image) -> sitk.Image:
    mask = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def read_label_table(path: Path) -> Dict[int, str]:
    """Read a label table (CSV with columns ``id`` and ``structure``) -> {id: structure}.

    A row with id 0 (background, as in many colour tables) is ignored.
    """
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            columns = reader.fieldnames or []
            missing = [column for column in ("id", "structure") if column not in columns]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}; found {columns}")
            table: Dict[int, str] = {}
            names = set()
            for line_number, row in enumerate(reader, start=2):
                text_id, name = (row["id"] or "").strip(), (row["structure"] or "").strip()
                try:
                    label_id = int(text_id)
                except ValueError:
                    message = f"{path}, line {line_number}: id {text_id!r} is not an integer"
                    raise DatasetError(message) from None
                if label_id == 0:
                    continue
                if label_id < 0 or not name:
                    message = f"{path}, line {line_number}: needs a positive id and a structure name"
                    raise DatasetError(message)
                if label_id in table:
                    raise DatasetError(f"{path}, line {line_number}: id {label_id} appears twice")
                if name in names:
                    raise DatasetError(f"{path}, line {line_number}: structure {name!r} appears twice")
                table[label_id] = name
                names.add(name)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a UTF-8 text table ({error})") from None
    return table


def _label_ids(label_map: sitk.Image, path: Path) -> np.ndarray:
    """Sorted nonzero ids occurring in ``label_map``; a non-integer map is an error."""
    array = sitk.GetArrayViewFromImage(label_map)
    if not np.issubdtype(array.dtype, np.integer) and not np.all(np.mod(array, 1) == 0):
        raise DatasetError(f"{path}: a label map must hold integer ids, found fractional values")
    ids = np.unique(array)
    if ids.size and ids[0] < 0:
        raise DatasetError(f"{path}: negative label id {ids[0]}")
    return ids[ids != 0].astype(np.int64)


@dataclass
class Case:
    """One CT scan and its labelled structures.

    ``mask_paths`` (TotalSegmentator and single-mask layouts) or ``label_map_path`` + ``label_ids``
    (label-map layout) say where each structure's voxels are.
    """

    name: str
    image_path: Path
    structure_names: List[str]
    layout: str = LAYOUT_UNLABELLED
    mask_paths: Dict[str, Path] = field(default_factory=dict)
    label_map_path: Optional[Path] = None
    label_ids: Dict[str, int] = field(default_factory=dict)
    _image: Optional[sitk.Image] = field(default=None, repr=False, compare=False)
    _label_array: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def load_image(self) -> sitk.Image:
        """The CT as read from disk (HU; LPS geometry as SimpleITK reads it). Cached."""
        if self._image is None:
            self._image = sitk.ReadImage(str(self.image_path))
            if self._image.GetDimension() != 3:
                dimension = self._image.GetDimension()
                raise DatasetError(f"{self.image_path}: expected a 3D image, got {dimension}D")
        return self._image

    def load_label_map(self) -> sitk.Image:
        """The label map of a label-map case (uint ids on the CT grid), or a map built from the masks
        (id = 1 + index in ``structure_names``; later structures win where masks overlap)."""
        image = self.load_image()
        if self.layout == LAYOUT_LABEL_MAP:
            label_map = sitk.GetImageFromArray(self._label_map_array())
        else:
            array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint16)
            for index, name in enumerate(self.structure_names, start=1):
                array[sitk.GetArrayFromImage(self.load_structure(name)) != 0] = index
            label_map = sitk.GetImageFromArray(array)
        label_map.CopyInformation(image)
        return label_map

    def structure_label_ids(self) -> Dict[str, int]:
        """{structure: id} of `load_label_map`."""
        if self.layout == LAYOUT_LABEL_MAP:
            return dict(self.label_ids)
        return {name: index for index, name in enumerate(self.structure_names, start=1)}

    def load_structure(self, name: str) -> sitk.Image:
        """The binary mask of ``name``: uint8 0/1 with exactly the CT's size, spacing, origin, direction."""
        if name not in self.structure_names:
            raise DatasetError(
                f"case {self.name!r} has no structure {name!r}; it has {len(self.structure_names)}: "
                + ", ".join(self.structure_names[:20])
                + (" ..." if len(self.structure_names) > 20 else "")
            )
        image = self.load_image()
        if self.layout == LAYOUT_LABEL_MAP:
            return _binary_on_grid(self._label_map_array() == self.label_ids[name], image)
        path = self.mask_paths[name]
        mask = sitk.ReadImage(str(path))
        check_same_geometry(mask, image, f"mask {path}")
        return _binary_on_grid(sitk.GetArrayViewFromImage(mask) != 0, image)

    def _label_map_array(self) -> np.ndarray:
        if self._label_array is None:
            assert self.label_map_path is not None
            label_map = sitk.ReadImage(str(self.label_map_path))
            check_same_geometry(label_map, self.load_image(), f"label map {self.label_map_path}")
            self._label_array = sitk.GetArrayFromImage(label_map)
        return self._label_array


def _masks_in(folder: Path, exclude: tuple) -> Dict[str, Path]:
    masks: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _strip_nifti_suffix(path.name)
        if stem is None or not path.is_file() or path.name in exclude:
            continue
        if stem in masks:
            both = f"{masks[stem].name}, {path.name}"
            raise DatasetError(f"{folder}: structure {stem!r} is stored twice ({both})")
        masks[stem] = path
    return masks


def load_case(folder) -> Case:
    """Read one case folder (see the module docstring for the layouts)."""
    folder = Path(folder)
    image_path = _find_image(folder)
    if image_path is None:
        raise DatasetError(f"{folder}: no CT found (expected one of {', '.join(IMAGE_NAMES)})")
    label_map_path = folder / LABEL_MAP_NAME
    table_path = folder / LABEL_TABLE_NAME
    segmentations = folder / SEGMENTATIONS_DIR
    if label_map_path.exists() and segmentations.is_dir():
        raise DatasetError(
            f"{folder}: holds both {LABEL_MAP_NAME} and {SEGMENTATIONS_DIR}/; keep one layout per case"
        )
    if label_map_path.exists():
        if not table_path.is_file():
            needed = f"{LABEL_TABLE_NAME} (columns id, structure)"
            raise DatasetError(f"{folder}: {LABEL_MAP_NAME} needs a label table {needed}")
        table = read_label_table(table_path)
        present = _label_ids(sitk.ReadImage(str(label_map_path)), label_map_path)
        unnamed = [int(i) for i in present if int(i) not in table]
        if unnamed:
            raise DatasetError(f"{label_map_path}: ids {unnamed} occur in the map but not in {table_path}")
        label_ids = {table[int(i)]: int(i) for i in present}
        return Case(
            name=folder.name,
            image_path=image_path,
            structure_names=sorted(label_ids),
            layout=LAYOUT_LABEL_MAP,
            label_map_path=label_map_path,
            label_ids=label_ids,
        )
    if segmentations.is_dir():
        masks = _masks_in(segmentations, exclude=())
        if not masks:
            raise DatasetError(f"{segmentations}: no <structure>.nii.gz masks inside")
        return Case(folder.name, image_path, sorted(masks), LAYOUT_TOTALSEGMENTATOR, mask_paths=masks)
    masks = _masks_in(folder, exclude=IMAGE_NAMES)
    layout = LAYOUT_MASKS if masks else LAYOUT_UNLABELLED
    return Case(folder.name, image_path, sorted(masks), layout, mask_paths=masks)


def _looks_like_case(folder: Path) -> bool:
    return any(
        _strip_nifti_suffix(path.name) is not None or path.name in (SEGMENTATIONS_DIR, LABEL_TABLE_NAME)
        for path in folder.iterdir()
    )


def find_cases(root) -> List[Case]:
    """All cases under ``root``: ``root`` itself when it holds a CT, else its sub-folders (sorted by name).

    Sub-folders without any image files (and hidden ones) are ignored; one that holds images or
    labels but no CT is an error, as is a root with no case at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    if _find_image(root) is not None:
        return [load_case(root)]
    cases = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        if _find_image(folder) is not None:
            cases.append(load_case(folder))
        elif _looks_like_case(folder):
            raise DatasetError(f"{folder}: holds images or labels but no CT (expected {IMAGE_NAMES[0]})")
    if not cases:
        raise DatasetError(f"{root}: no case folders found (a case holds {IMAGE_NAMES[0]} and its labels)")
    return cases
