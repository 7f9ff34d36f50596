"""The network weights: where they are kept, how they arrive, and how they are checked.

Nothing here runs at import time. The download is CTSAM3DLib.download's (the same as ``ctsam3d
download-weights``, into the same per-user folder): the authors' checkpoint is chosen from ModelScope's file
list, streamed with resume, verified against the SHA-256 the host publishes and renamed into place only
when complete. The checksum is recorded beside the file with the file's size and modification time, and
whether the host confirmed it; a load re-hashes the file (about 300 MB) only when these changed, so each
version of the file is verified once, on the worker thread, with progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import slicer

from CTSAM3DLib.download import DEFAULT_ENDPOINT, DownloadResult, default_weights_path, download_weights
from CTSAM3DLib.files import ProgressCallback, sha256_of

SETTINGS_GROUP = "CTSAM3D"

LICENCE_NOTE = (
    "The CT-SAM3D weights (params.pth) are published by the CT-SAM3D authors (Guo et al., "
    "alibaba-damo-academy/ct-sam3d) on ModelScope, model xiuan123/CT-SAM3D. They are not part of this "
    "extension and are not covered by its Apache-2.0 licence: they carry the authors' own terms, and the "
    "authors' code repository (Apache-2.0) states no separate licence for the weights. Check the model page "
    "before any use beyond research. Not a medical device; not for clinical diagnosis."
)


class ChecksumMismatchError(Exception):
    """The weights file differs from the checksum recorded when it was obtained."""


# ---------------------------------------------------------------- settings
def settingsValue(name: str, default: str = "") -> str:
    value = slicer.app.userSettings().value(f"{SETTINGS_GROUP}/{name}", default)
    return default if value is None else str(value)


def setSettingsValue(name: str, value: str) -> None:
    slicer.app.userSettings().setValue(f"{SETTINGS_GROUP}/{name}", value)


def defaultWeightsPath() -> str:
    """Where the downloaded checkpoint is kept: the user's cache folder that ``ctsam3d download-weights``
    uses too (CTSAM3DLib.download.default_weights_path), so both find one copy."""
    return str(default_weights_path())


def configuredWeightsPath() -> str:
    """The weights file chosen in the module panel, else the cached download, else ""."""
    chosen = settingsValue("WeightsPath")
    if chosen and Path(chosen).is_file():
        return chosen
    cached = defaultWeightsPath()
    return cached if Path(cached).is_file() else ""


# --------------------------------------------------------------- checksums
def checksumRecordPath(weightsPath: str) -> Path:
    return Path(str(weightsPath) + ".sha256.json")


def _fileVersion(path: str) -> Tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def _readRecord(weightsPath: str) -> Optional[Dict]:
    record = checksumRecordPath(weightsPath)
    return json.loads(record.read_text()) if record.is_file() else None


def _writeRecord(weightsPath: str, record: Dict) -> None:
    target = checksumRecordPath(weightsPath)
    temporary = target.with_name(target.name + ".part")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, target)


def recordChecksum(weightsPath: str, sha256: str, source: str, verifiedByHost: bool = False) -> None:
    """Write the record beside the weights (atomically), for the file as it is now."""
    size, modified = _fileVersion(weightsPath)
    _writeRecord(weightsPath, {
        "file": Path(weightsPath).name,
        "sha256": sha256,
        "size": size,
        "mtime_ns": modified,
        "source": source,
        "verified_by_host": bool(verifiedByHost),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def recordedChecksum(weightsPath: str) -> Optional[str]:
    record = _readRecord(weightsPath)
    return None if record is None else record["sha256"]


def checksumDescription(weightsPath: str) -> str:
    """The recorded SHA-256 and where it comes from, for the module panel."""
    record = _readRecord(weightsPath)
    if record is None:
        return "not recorded"
    if record.get("verified_by_host"):
        return f"{record['sha256']} (verified against ModelScope's checksum)"
    return f"{record['sha256']} (computed here; not confirmed by the host)"


_verifiedVersions: Dict[str, Tuple[int, int]] = {}
"""Files verified in this process, by real path: (size, mtime_ns) (used where the record is read-only)."""


def verifyRecordedChecksum(weightsPath: str, progress: Optional[ProgressCallback] = None) -> Optional[str]:
    """Compare the file with its recorded SHA-256, if one was recorded; returns the checksum.

    Hashes only a version of the file (size, modification time) not verified before; slow for the
    authors' 300 MB file, so call it off the main thread. Raises ChecksumMismatchError on a change.
    """
    if not Path(weightsPath).is_file():
        raise FileNotFoundError(f"CT-SAM3D weights not found: {weightsPath}")
    record = _readRecord(weightsPath)
    if record is None:
        return None
    version = _fileVersion(weightsPath)
    realPath = os.path.realpath(weightsPath)
    if (record.get("size"), record.get("mtime_ns")) == version or _verifiedVersions.get(realPath) == version:
        return record["sha256"]
    actual = sha256_of(weightsPath, progress)
    if actual != record["sha256"]:
        raise ChecksumMismatchError(
            f"{weightsPath} has SHA-256 {actual}, but {record['sha256']} was recorded when it was obtained; "
            "the file changed or is corrupt: download it again"
        )
    _verifiedVersions[realPath] = version
    # In a read-only folder the record stays as it was, and this process remembers the verified version.
    with contextlib.suppress(OSError):
        _writeRecord(weightsPath, {**record, "size": version[0], "mtime_ns": version[1]})
    return actual


# ---------------------------------------------------------------- download
def downloadAuthorsWeights(
    destination: str,
    progress: Optional[ProgressCallback] = None,
    isCancelled: Optional[Callable[[], bool]] = None,
    endpoint: str = DEFAULT_ENDPOINT,
    report: Callable[[str], None] = lambda message: None,
) -> DownloadResult:
    """Download and verify the authors' checkpoint into ``destination``, and record its checksum (whether
    the host confirmed it or not). No Slicer calls: safe on a worker thread."""
    result = download_weights(Path(destination), endpoint, progress=progress, is_cancelled=isCancelled, report=report)
    recordChecksum(result.path, result.sha256, result.source, result.verified)
    return result
