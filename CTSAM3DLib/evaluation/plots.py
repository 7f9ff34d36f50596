"""PNG plots of an evaluation run (matplotlib, imported only here: ``pip install matplotlib``).

- ``dice_vs_clicks.png``: mean Dice after each click, one line per method, with the interquartile
  range shaded, over the structures every method finished.
- ``gallery.png``: for the best and the worst structures (by the first method's final Dice), one
  axial CT slice through the first click with the reference outline, each method's final mask and
  the clicks; shown in radiological convention (patient left on the right, anterior up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from ..datasets import Case
from .report import Curve, Key, comparable_structures
from .results import ResultStore

DISPLAY_WINDOW_HU = (-160.0, 240.0)
METHOD_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")


class PlotsUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise PlotsUnavailableError(
            "plots need matplotlib: pip install matplotlib (the tables and CSVs are written anyway)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice_vs_clicks(curves: Dict[Key, Curve], methods: Sequence[str], clicks: int, path: Path) -> Path:
    """Mean Dice against the number of clicks per method; returns ``path``."""
    plt = _pyplot()
    pairs = comparable_structures(curves, methods)
    if not pairs:
        raise ValueError("no structure was finished by every method: nothing to plot")
    figure, axes = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    numbers = np.arange(1, clicks + 1)
    for method, colour in zip(methods, METHOD_COLOURS):
        dice = np.array([curves[(method,) + p].dice for p in pairs])
        axes.plot(numbers, dice.mean(axis=0), marker="o", markersize=3, color=colour, label=method)
        low, high = np.percentile(dice, [25, 75], axis=0)
        axes.fill_between(numbers, low, high, color=colour, alpha=0.15, linewidth=0)
    axes.set_xlabel("clicks")
    axes.set_ylabel("Dice (mean; band: 25th-75th percentile)")
    axes.set_xticks(numbers)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.set_title(f"Dice against clicks ({len(pairs)} structures)", fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
    return path


def _save(figure, path: Path) -> None:
    temporary = path.with_name("partial-" + path.name)
    figure.savefig(temporary, format="png")
    temporary.replace(path)


def _radiological(slice_yx: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Flip an axial (y, x) slice so that patient left is on the right and anterior is up (LPS grid
    axes close to the world axes; an oblique scan is shown as stored)."""
    if direction[0, 0] < 0:
        slice_yx = slice_yx[:, ::-1]
    if direction[1, 1] < 0:
        slice_yx = slice_yx[::-1, :]
    return slice_yx


MASK_COLOUR = "#2f7bff"
"""The final mask's colour in the gallery (red is the negative clicks')."""


def crop_box(masks_yx: Sequence[np.ndarray], margin: int = 12) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) around everything in ``masks_yx`` plus ``margin`` pixels: one box for a
    row of panels, so every method's panel shows the same region at the same scale."""
    rows, cols = np.nonzero(np.logical_or.reduce(masks_yx))
    shape = masks_yx[0].shape
    return (max(rows.min() - margin, 0), min(rows.max() + margin + 1, shape[0]),
            max(cols.min() - margin, 0), min(cols.max() + margin + 1, shape[1]))


def _panel(axes, ct, reference, prediction, click_rows, spacing_xy, direction, title, box, show_clicks=True):
    shape = ct.shape
    from matplotlib.colors import ListedColormap

    top, bottom, left, right = box
    marks = np.zeros(shape, np.int8)
    for row in click_rows:
        marks[int(row["index_y"]), int(row["index_x"])] = 1 if row["positive"] == "1" else -1

    def view(a):
        return _radiological(a[top:bottom, left:right], direction)

    axes.imshow(
        view(ct),
        cmap="gray",
        vmin=DISPLAY_WINDOW_HU[0],
        vmax=DISPLAY_WINDOW_HU[1],
        aspect=spacing_xy[1] / spacing_xy[0],
        interpolation="nearest",
    )
    axes.imshow(
        np.ma.masked_where(~view(prediction), view(prediction)),
        cmap=ListedColormap([MASK_COLOUR]),
        alpha=0.45,
        aspect=spacing_xy[1] / spacing_xy[0],
        interpolation="nearest",
    )
    axes.contour(view(reference).astype(float), levels=[0.5], colors=["lime"], linewidths=0.8)
    if show_clicks:
        for value, colour, marker in ((1, "cyan", "+"), (-1, "red", "x")):
            ys, xs = np.nonzero(view(marks) == value)
            axes.scatter(xs, ys, c=colour, marker=marker, s=40, linewidths=1.5)
    axes.set_title(title, fontsize=7)
    axes.set_xticks([])
    axes.set_yticks([])


def plot_gallery(
    store: ResultStore,
    cases: Sequence[Case],
    curves: Dict[Key, Curve],
    methods: Sequence[str],
    path: Path,
    per_side: int = 3,
) -> Path:
    """Best and worst ``per_side`` structures: one row each, one panel per method; returns ``path``."""
    plt = _pyplot()
    pairs = comparable_structures(curves, methods)
    pairs = [p for p in pairs if all(store.mask_path((m,) + p).exists() for m in methods)]
    if not pairs:
        raise ValueError("no structure with saved masks for every method: nothing to show")
    ranked = sorted(pairs, key=lambda p: (curves[(methods[0],) + p].dice[-1], p))
    chosen: List[Tuple[str, Tuple[str, str]]] = [("best", p) for p in ranked[::-1][:per_side]]
    chosen += [("worst", p) for p in ranked[:per_side] if p not in [q for _, q in chosen]]
    cases_by_name = {case.name: case for case in cases}
    click_rows = store.click_rows()
    width = max(2.8 * len(methods), 4.2)
    figure, grid = plt.subplots(
        len(chosen), len(methods), figsize=(width, 2.8 * len(chosen)), dpi=100, squeeze=False
    )
    for row_axes, (rank, (case_name, structure)) in zip(grid, chosen):
        case = cases_by_name[case_name]
        image = case.load_image()
        reference = sitk.GetArrayFromImage(case.load_structure(structure)) != 0
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        ct = sitk.GetArrayViewFromImage(image)
        rows_by_method = {method: [] for method in methods}
        for row in click_rows:
            if (row["case"], row["structure"]) == (case_name, structure) and row["method"] in rows_by_method:
                rows_by_method[row["method"]].append(row)
        # The first click of the protocol is the structure's most interior voxel, the same for every method.
        z = int(rows_by_method[methods[0]][0]["index_z"])
        predictions = {
            method: sitk.GetArrayFromImage(sitk.ReadImage(str(store.mask_path((method, case_name, structure))))) != 0
            for method in methods
        }
        box = crop_box([reference[z]] + [prediction[z] for prediction in predictions.values()])
        for axes, method in zip(row_axes, methods):
            rows = rows_by_method[method]
            on_slice = [r for r in rows if int(r["index_z"]) == z]
            dice = curves[(method, case_name, structure)].dice[-1]
            title = f"{rank}: {case_name}/{structure}\n{method}, Dice {dice:.2f} after {len(rows)} clicks"
            _panel(
                axes, ct[z], reference[z], predictions[method][z], on_slice, image.GetSpacing()[:2], direction,
                title, box,
            )
    figure.suptitle(
        "green: reference outline, blue: final mask,\ncyan +: positive, red x: negative clicks on this slice",
        fontsize=7,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    _save(figure, path)
    plt.close(figure)
    return path
