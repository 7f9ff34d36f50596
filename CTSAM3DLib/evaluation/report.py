"""Tables of an evaluation run: per structure, per scan and on average, for every method.

Conventions:
- A structure's curve has one value per click 1..N; when the simulated user stopped early (the mask
  matched the reference) the last scores are carried forward.
- Averages use only structures that every method finished, so methods are compared on the same set.
- Dice and surface Dice are averaged (mean); HD95 is summarised by its median, as an empty mask
  gives an infinite HD95.
- Clicks to reach a Dice: the first click whose Dice is at least the threshold; a structure that
  never reaches it counts as N clicks (the usual NoC convention) and is counted as a failure.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .results import STATUS_ERROR, STATUS_SKIPPED, ResultStore, csv_text, write_text_atomic

DICE_THRESHOLDS = (0.80, 0.85, 0.90)
REPORT_CLICKS = (1, 3, 5, 10)

Key = Tuple[str, str, str]


@dataclass
class Curve:
    """One method on one structure: scores after clicks 1..N (carried forward after an early stop)."""

    method: str
    case: str
    structure: str
    dice: List[float]
    surface_dice: List[float]
    hd95_mm: List[float]
    seconds: List[float]
    """Wall time of each click actually placed."""

    def clicks_to_reach(self, threshold: float) -> Optional[int]:
        for number, value in enumerate(self.dice, start=1):
            if value >= threshold:
                return number
        return None


def build_curves(click_rows: Sequence[Dict[str, str]], clicks: int) -> Dict[Key, Curve]:
    """Curves from the rows of ``clicks.csv`` (only clicks 1..``clicks``)."""
    grouped: Dict[Key, List[Dict[str, str]]] = {}
    for row in click_rows:
        grouped.setdefault((row["method"], row["case"], row["structure"]), []).append(row)
    curves = {}
    for key, rows in grouped.items():
        rows = sorted((r for r in rows if int(r["click"]) <= clicks), key=lambda r: int(r["click"]))
        if not rows:
            continue
        padding = clicks - len(rows)

        def column(name, rows=rows, padding=padding):
            values = [float(r[name]) for r in rows]
            return values + [values[-1]] * padding

        curves[key] = Curve(
            *key,
            column("dice"),
            column("surface_dice"),
            column("hd95_mm"),
            [float(r["seconds"]) for r in rows],
        )
    return curves


def comparable_structures(curves: Dict[Key, Curve], methods: Sequence[str]) -> List[Tuple[str, str]]:
    """(case, structure) pairs that every method finished, sorted."""
    pairs = {(case, structure) for (_, case, structure) in curves}
    return sorted(p for p in pairs if all((m,) + p in curves for m in methods))


@dataclass
class Summary:
    """Scores of one method averaged over a set of structures."""

    structures: int
    dice: Dict[int, float]
    surface_dice: Dict[int, float]
    hd95_median_mm: Dict[int, float]
    clicks_to: Dict[float, float]
    """Mean clicks to reach each Dice threshold (failures counted as N)."""
    failures: Dict[float, int]
    seconds_per_click: float


def summarise(curves: Sequence[Curve], clicks: int) -> Summary:
    """Average ``curves`` (non-empty, same N)."""
    at = [k for k in REPORT_CLICKS if k <= clicks] + ([clicks] if clicks not in REPORT_CLICKS else [])
    reached = {t: [c.clicks_to_reach(t) for c in curves] for t in DICE_THRESHOLDS}
    all_seconds = [s for c in curves for s in c.seconds]
    return Summary(
        structures=len(curves),
        dice={k: float(np.mean([c.dice[k - 1] for c in curves])) for k in at},
        surface_dice={k: float(np.mean([c.surface_dice[k - 1] for c in curves])) for k in at},
        hd95_median_mm={k: float(np.median([c.hd95_mm[k - 1] for c in curves])) for k in at},
        clicks_to={
            t: float(np.mean([n if n is not None else clicks for n in v])) for t, v in reached.items()
        },
        failures={t: sum(n is None for n in v) for t, v in reached.items()},
        seconds_per_click=float(np.mean(all_seconds)) if all_seconds else math.nan,
    )


def _number(value: float, digits: int = 3) -> str:
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _summary_columns(clicks: int) -> List[str]:
    at = sorted(set([k for k in REPORT_CLICKS if k <= clicks] + [clicks]))
    return (
        [f"Dice@{k}" for k in at]
        + [f"NSD@{clicks}", f"HD95@{clicks} (median, mm)"]
        + [f"clicks to {t:.2f} (fails)" for t in DICE_THRESHOLDS]
        + ["s/click"]
    )


def _summary_cells(summary: Summary, clicks: int) -> List[str]:
    at = sorted(summary.dice)
    return (
        [_number(summary.dice[k]) for k in at]
        + [_number(summary.surface_dice[clicks]), _number(summary.hd95_median_mm[clicks], 1)]
        + [f"{summary.clicks_to[t]:.1f} ({summary.failures[t]})" for t in DICE_THRESHOLDS]
        + [_number(summary.seconds_per_click, 2)]
    )


def per_structure_rows(curves: Dict[Key, Curve], clicks: int) -> List[Dict[str, object]]:
    """One row per curve for ``summary.csv``."""
    at = sorted(set([k for k in REPORT_CLICKS if k <= clicks] + [clicks]))
    rows = []
    for (method, case, structure), curve in sorted(curves.items()):
        row: Dict[str, object] = {"method": method, "case": case, "structure": structure}
        for k in at:
            row[f"dice_at_{k}"] = f"{curve.dice[k - 1]:.4f}"
            row[f"surface_dice_at_{k}"] = f"{curve.surface_dice[k - 1]:.4f}"
            row[f"hd95_mm_at_{k}"] = f"{curve.hd95_mm[k - 1]:.2f}"
        for t in DICE_THRESHOLDS:
            reached = curve.clicks_to_reach(t)
            row[f"clicks_to_{t:.2f}"] = reached if reached is not None else ""
        row["seconds_per_click"] = f"{np.mean(curve.seconds):.3f}"
        rows.append(row)
    return rows


def render_report(store: ResultStore, methods: Sequence[str], clicks: int, title: str = "") -> str:
    """The Markdown report of everything ``store`` holds for ``methods``."""
    curves = {k: c for k, c in build_curves(store.click_rows(), clicks).items() if k[0] in methods}
    pairs = comparable_structures(curves, methods)
    out = io.StringIO()
    out.write(f"# {title or 'Evaluation'}\n\n")
    out.write(
        f"{len(pairs)} structures finished by every method ({', '.join(methods)}), {clicks} simulated clicks "
        "each. Dice and NSD (normalised surface Dice) are means, HD95 a median; 'clicks to' counts a "
        f"structure that never reaches the Dice as {clicks} clicks and lists those failures in brackets.\n\n"
    )
    if not pairs:
        out.write("No structure has been evaluated by every method yet.\n\n")
    else:
        header = ["method", "structures"] + _summary_columns(clicks)
        out.write("## Average over all structures\n\n")
        rows = []
        for method in methods:
            summary = summarise([curves[(method,) + p] for p in pairs], clicks)
            rows.append([method, str(summary.structures)] + _summary_cells(summary, clicks))
        out.write(_table(header, rows) + "\n")
        out.write("## Per scan\n\n")
        rows = []
        for case in sorted({case for case, _ in pairs}):
            case_pairs = [p for p in pairs if p[0] == case]
            for method in methods:
                summary = summarise([curves[(method,) + p] for p in case_pairs], clicks)
                rows.append([case, method, str(summary.structures)] + _summary_cells(summary, clicks))
        out.write(_table(["scan"] + header, rows) + "\n")
        out.write("## Per structure\n\n")
        at = sorted(set([k for k in REPORT_CLICKS if k <= clicks] + [clicks]))
        dice_label = "/".join(f"@{k}" for k in at)
        header = ["scan", "structure"] + [f"{m} Dice {dice_label}" for m in methods]
        header += [f"{m} clicks to 0.85" for m in methods]
        rows = []
        for case, structure in pairs:
            row = [case, structure]
            row += [
                " / ".join(f"{curves[(m, case, structure)].dice[k - 1]:.2f}" for k in at) for m in methods
            ]
            for m in methods:
                reached = curves[(m, case, structure)].clicks_to_reach(0.85)
                row.append(str(reached) if reached is not None else f">{clicks}")
            rows.append(row)
        out.write(_table(header, rows) + "\n")
    _write_left_out(out, store, methods)
    return out.getvalue()


def _write_left_out(out: io.StringIO, store: ResultStore, methods: Sequence[str]) -> None:
    left_out: Dict[Tuple[str, str], Tuple[str, str]] = {}
    for (method, case, structure), row in sorted(store.structure_rows.items()):
        if method in methods and row["status"] in (STATUS_SKIPPED, STATUS_ERROR):
            left_out.setdefault((case, structure), (row["status"], row["reason"]))
    if not left_out:
        return
    out.write("## Structures left out\n\n")
    rows = [[case, structure, status, reason] for (case, structure), (status, reason) in left_out.items()]
    out.write(_table(["scan", "structure", "status", "reason"], rows) + "\n")


def write_report(store: ResultStore, methods: Sequence[str], clicks: int, title: str = "") -> List[Path]:
    """Write ``report.md`` and ``summary.csv`` into the store's folder; returns their paths."""
    report_path = store.folder / "report.md"
    write_text_atomic(report_path, render_report(store, methods, clicks, title))
    rows = per_structure_rows(
        {k: c for k, c in build_curves(store.click_rows(), clicks).items() if k[0] in methods}, clicks
    )
    summary_path = store.folder / "summary.csv"
    columns = list(rows[0]) if rows else ["method", "case", "structure"]
    write_text_atomic(summary_path, csv_text(columns, rows, header=True))
    return [report_path, summary_path]
