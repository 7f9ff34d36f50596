"""The resumable result store of an evaluation run (one output folder).

- ``run.json``: the settings that change results, by group (the protocol's: clicks, tolerance, patch
  cap; each method's: weights, baseline parameters). A rerun into the same folder must use the same
  settings for the groups it shares with the folder, else it is refused (nothing gets mixed); a
  method run later into the folder adds its group.
- ``clicks.csv``: one row per click: method, case, structure, click, positive, the click's voxel
  (z, y, x) and LPS point, dice, surface_dice, hd95_mm, seconds.
- ``structures.csv``: one row per method, case and structure once it is finished: ``done``,
  ``skipped`` (with the reason: empty, too small, too large) or ``error`` (with the message; an
  error is retried by the next run), with the structure's size.

While a run uses the folder it holds a lock on ``.lock`` in it: a second run is refused.

Rows of a structure are appended (and flushed to disk) only when the structure is finished, the
click rows first; so a run killed at any point loses at most the structure it was working on,
and a rerun drops click rows that have no finished structure row and skips everything finished.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import SimpleITK as sitk  # noqa: N813 (the name every SimpleITK user knows)

from .protocol import ClickRecord, StructureSize

CLICK_COLUMNS = [
    "method",
    "case",
    "structure",
    "click",
    "positive",
    "index_z",
    "index_y",
    "index_x",
    "point_l",
    "point_p",
    "point_s",
    "dice",
    "surface_dice",
    "hd95_mm",
    "seconds",
]
STRUCTURE_COLUMNS = [
    "method",
    "case",
    "structure",
    "status",
    "reason",
    "voxels",
    "volume_mm3",
    "extent_x_mm",
    "extent_y_mm",
    "extent_z_mm",
    "patches",
    "clicks",
]
STATUS_DONE, STATUS_SKIPPED, STATUS_ERROR = "done", "skipped", "error"

Key = Tuple[str, str, str]


class ResultsError(ValueError):
    """An output folder that cannot be resumed with these settings."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so ``path`` is never half written."""
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def write_image_atomic(image: sitk.Image, path: Path) -> None:
    """``sitk.WriteImage`` through a temporary name with the same (format-selecting) suffix."""
    temporary = path.with_name("partial-" + path.name)
    sitk.WriteImage(image, str(temporary), useCompression=True)
    os.replace(temporary, path)


def _read_rows(path: Path) -> List[Dict[str, str]]:
    """Rows of a CSV written by this module; a last line cut short by a crash is dropped."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def csv_text(columns: List[str], rows: Iterable[Dict[str, object]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _lock_folder(folder: Path):
    """Hold an exclusive lock on ``folder/.lock`` while this store lives (released when the process
    ends, however it ends), so two runs never append to one folder. Where ``fcntl`` is missing
    (Windows) the folder is not locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    stream = open(folder / ".lock", "a")  # noqa: SIM115 (kept open: the lock lives as long as the store)
    try:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        stream.close()
        message = f"{folder} is in use by another evaluation run; wait for it or use another --output"
        raise ResultsError(message) from None
    return stream


def _key(row: Dict[str, str]) -> Key:
    return row["method"], row["case"], row["structure"]


class ResultStore:
    """Reads what an output folder already holds and appends finished structures to it."""

    def __init__(self, folder, settings: Dict[str, object]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_folder(self.folder)
        self.clicks_path = self.folder / "clicks.csv"
        self.structures_path = self.folder / "structures.csv"
        self._check_settings(settings)
        self.structure_rows: Dict[Key, Dict[str, str]] = {}
        for row in _read_rows(self.structures_path):
            self.structure_rows[_key(row)] = row  # the last row of a key wins (an error, then done)
        self._drop_unfinished_clicks()

    def close(self) -> None:
        """Release the folder's lock and remove its file (the lock is also released when the process
        ends; the file is removed first, so no run can hold a lock on a file that is going away)."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                (self.folder / ".lock").unlink()
            self._lock.close()
            self._lock = None

    def _check_settings(self, settings: Dict[str, object]) -> None:
        """``settings``: {group: value}, e.g. the protocol's and each method's. A group that the
        folder already holds must be equal; new groups (a method added later) are merged in."""
        path = self.folder / "run.json"
        settings = json.loads(json.dumps(settings))  # as they will read back (tuples become lists)
        stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        changed = sorted(key for key in set(stored) & set(settings) if stored[key] != settings[key])
        if changed:
            details = "; ".join(f"{key}: {stored[key]!r} -> {settings[key]!r}" for key in changed)
            raise ResultsError(
                f"{self.folder} holds results of a run with other settings ({details}); "
                "use another --output folder to compare settings"
            )
        if set(settings) - set(stored):
            write_text_atomic(path, json.dumps({**stored, **settings}, indent=2, sort_keys=True) + "\n")

    def _drop_unfinished_clicks(self) -> None:
        rows = _read_rows(self.clicks_path)
        finished = [row for row in rows if self.is_done(_key(row))]
        if len(finished) != len(rows) or (self.clicks_path.exists() and not rows):
            write_text_atomic(self.clicks_path, csv_text(CLICK_COLUMNS, finished, header=True))

    def is_done(self, key: Key) -> bool:
        """Finished: evaluated or skipped (an error is not finished: the next run retries it)."""
        row = self.structure_rows.get(key)
        return row is not None and row["status"] in (STATUS_DONE, STATUS_SKIPPED)

    def mask_path(self, key: Key) -> Path:
        method, case, structure = key
        return self.folder / "masks" / method / case / f"{structure}.nii.gz"

    def add(
        self,
        key: Key,
        status: str,
        size: Optional[StructureSize],
        records: Optional[List[ClickRecord]] = None,
        reason: str = "",
        mask: Optional[sitk.Image] = None,
    ) -> None:
        """Record one finished structure: its final mask (if any), its clicks, then its status row."""
        records = records or []
        if mask is not None:
            path = self.mask_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_image_atomic(mask, path)
        method, case, structure = key
        click_rows = [
            {
                "method": method,
                "case": case,
                "structure": structure,
                "click": r.click,
                "positive": int(r.positive),
                "index_z": r.index_zyx[0],
                "index_y": r.index_zyx[1],
                "index_x": r.index_zyx[2],
                "point_l": f"{r.point_lps[0]:.3f}",
                "point_p": f"{r.point_lps[1]:.3f}",
                "point_s": f"{r.point_lps[2]:.3f}",
                "dice": f"{r.dice:.6f}",
                "surface_dice": f"{r.surface_dice:.6f}",
                "hd95_mm": f"{r.hd95_mm:.3f}",
                "seconds": f"{r.seconds:.4f}",
            }
            for r in records
        ]
        structure_row = {
            "method": method,
            "case": case,
            "structure": structure,
            "status": status,
            "reason": reason.replace("\n", " "),
            "clicks": len(records),
            "voxels": size.voxels if size else "",
            "volume_mm3": f"{size.volume_mm3:.1f}" if size else "",
            "extent_x_mm": f"{size.extent_mm[0]:.1f}" if size else "",
            "extent_y_mm": f"{size.extent_mm[1]:.1f}" if size else "",
            "extent_z_mm": f"{size.extent_mm[2]:.1f}" if size else "",
            "patches": size.patches if size else "",
        }
        self._append(self.clicks_path, CLICK_COLUMNS, click_rows)
        self._append(self.structures_path, STRUCTURE_COLUMNS, [structure_row])
        self.structure_rows[key] = {k: str(v) for k, v in structure_row.items()}

    @staticmethod
    def _append(path: Path, columns: List[str], rows: List[Dict[str, object]]) -> None:
        new_file = not path.exists() or path.stat().st_size == 0
        with open(path, "a", encoding="utf-8", newline="") as stream:
            stream.write(csv_text(columns, rows, header=new_file))
            stream.flush()
            os.fsync(stream.fileno())

    def click_rows(self) -> List[Dict[str, str]]:
        return _read_rows(self.clicks_path)
