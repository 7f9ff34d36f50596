"""The evaluation loop: every method over every case and structure, through the shared protocol."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from ..datasets import Case
from ..progress import ProgressBar
from .metrics import SURFACE_TOLERANCE_MM
from .protocol import (
    START_KINDS,
    ClickSegmenter,
    degraded_start,
    jittered_box,
    measure_structure,
    run_clicks,
    size_problem,
)
from .results import STATUS_DONE, STATUS_ERROR, STATUS_SKIPPED, ResultStore


@dataclass
class Method:
    """A named way to segment from clicks: ``make_segmenter(image)`` opens one for a scan."""

    name: str
    make_segmenter: Callable[[sitk.Image], ClickSegmenter]


def start_for(start: Optional[str], case: str, structure: str, reference: sitk.Image) -> Optional[sitk.Image]:
    """The mask a structure's clicks start from (see ``evaluate``), on the reference's grid."""
    if start is None:
        return None
    if start in START_KINDS:
        return degraded_start(reference, start)
    path = Path(start) / case / f"{structure}.nii.gz"
    if not path.is_file():
        raise ValueError(f"no start mask {path} (--start-from takes {', '.join(START_KINDS)} or a folder of "
                         "<case>/<structure>.nii.gz masks, such as another run's masks/<method>)")
    mask = sitk.ReadImage(str(path))
    if mask.GetSize() != reference.GetSize() or not np.allclose(mask.GetOrigin(), reference.GetOrigin(), atol=1e-3):
        raise ValueError(f"the start mask {path} is not on the scan's grid")
    return mask


def select_structures(cases: Sequence[Case], wanted: Optional[Sequence[str]]) -> Dict[str, List[str]]:
    """{case name: structures to evaluate}; ``wanted`` None means all. A wanted name found in no case
    is an error listing what there is."""
    if not wanted:
        return {case.name: list(case.structure_names) for case in cases}
    available = sorted({name for case in cases for name in case.structure_names})
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ValueError(
            f"structure(s) {unknown} are in none of the scans; available: {', '.join(available) or 'none'}"
        )
    return {case.name: [name for name in case.structure_names if name in set(wanted)] for case in cases}


def evaluate(
    cases: Sequence[Case],
    methods: Sequence[Method],
    store: ResultStore,
    clicks: int,
    max_patches: Optional[int],
    structures: Optional[Sequence[str]] = None,
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
    show_progress: bool = True,
    start: Optional[str] = None,
    box_jitter_mm: Optional[float] = None,
) -> Dict[str, int]:
    """Run the protocol for every method, case and selected structure that ``store`` does not hold yet.

    Structures outside the size range (`size_problem`, with ``max_patches`` the model's patch cap)
    are recorded as skipped for every method, so all methods cover the same structures. An error
    of one method on one structure is recorded and the run goes on. Returns counts by status, each
    of (method, structure) pairs ("already": pairs the store held before this run).

    ``start``: every method starts from a degraded reference (one of ``START_KINDS``) or from the masks
    in a folder (``<folder>/<case>/<structure>.nii.gz``, e.g. another run's ``masks/<method>``) and clicks
    to correct it. ``box_jitter_mm``: the first interaction is the reference's bounding box, each face
    moved by up to that many mm.
    """
    selection = select_structures(cases, structures)
    total = sum(len(names) for names in selection.values())
    counts = {STATUS_DONE: 0, STATUS_SKIPPED: 0, STATUS_ERROR: 0, "already": 0}
    bar = ProgressBar(total, "evaluate") if show_progress else None
    for case in cases:
        names = selection[case.name]
        pending = [n for n in names if not all(store.is_done((m.name, case.name, n)) for m in methods)]
        counts["already"] += sum(store.is_done((m.name, case.name, n)) for n in names for m in methods)
        if bar:
            bar.update(len(names) - len(pending), status=case.name)
        if not pending:
            continue
        image = case.load_image()
        segmenters: Dict[str, ClickSegmenter] = {}
        for name in pending:
            reference = case.load_structure(name)
            size = measure_structure(reference)
            problem = size_problem(size, max_patches)
            for method in methods:
                key = (method.name, case.name, name)
                if store.is_done(key):
                    continue
                if bar:
                    bar.update(0, status=f"{case.name}/{name} ({method.name})")
                if problem:
                    store.add(key, STATUS_SKIPPED, size, reason=problem)
                    counts[STATUS_SKIPPED] += 1
                    continue
                try:
                    if method.name not in segmenters:
                        segmenters[method.name] = method.make_segmenter(image)
                    segmenter = segmenters[method.name]
                    start_mask = start_for(start, case.name, name, reference)
                    box = None if box_jitter_mm is None else jittered_box(
                        reference, box_jitter_mm, zlib.crc32(f"{case.name}/{name}".encode()))
                    records = run_clicks(segmenter, reference, clicks, tolerance_mm, start_mask, box)
                except (ValueError, RuntimeError) as error:
                    store.add(key, STATUS_ERROR, size, reason=f"{type(error).__name__}: {error}")
                    counts[STATUS_ERROR] += 1
                    continue
                store.add(key, STATUS_DONE, size, records, mask=segmenter.mask)
                counts[STATUS_DONE] += 1
            if bar:
                bar.update(status=f"{case.name}/{name}")
        # A remote session holds memory on its server until it is closed (or expires).
        for segmenter in segmenters.values():
            if hasattr(segmenter, "close"):
                segmenter.close()
    if bar:
        bar.close()
    return counts
