"""The network weights: where they come from, where they are cached, and how they are checked.

Nothing here runs at import time. The download streams into a temporary file beside the target,
computes SHA-256 on the way, and renames atomically only when complete, so an interrupted or
cancelled download never leaves a file that looks like weights. The checksum is recorded beside the
file with the file's size and modification time; a load re-hashes the file (about 300 MB) only when
these changed, so each version of the file is verified once, on the worker thread, with progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import slicer

AUTHORS_WEIGHTS_URL = "https://modelscope.cn/models/xiuan123/CT-SAM3D/resolve/master/params.pth"
"""The authors' checkpoint on ModelScope (model xiuan123/CT-SAM3D, file params.pth)."""

WEIGHTS_FILE_NAME = "params.pth"
SETTINGS_GROUP = "CTSAM3D"
CHUNK_BYTES = 1 << 20

LICENCE_NOTE = (
    "The CT-SAM3D weights (params.pth) are published by the CT-SAM3D authors (Guo et al., "
    "alibaba-damo-academy/ct-sam3d) on ModelScope, model xiuan123/CT-SAM3D. They are not part of this "
    "extension and are not covered by its Apache-2.0 licence: they carry the authors' own terms, and the "
    "authors' code repository (Apache-2.0) states no separate licence for the weights. Check the model page "
    "before any use beyond research. Not a medical device; not for clinical diagnosis."
)


class DownloadCancelledError(Exception):
    """The user cancelled the download; nothing was left behind."""


class ChecksumMismatchError(Exception):
    """The weights file differs from the checksum recorded when it was obtained."""


ProgressCallback = Callable[[int, Optional[int]], None]
"""``progress(bytesDone, bytesTotal or None)``."""


class DownloadResult(NamedTuple):
    path: str
    sha256: str
    size: int


# ---------------------------------------------------------------- settings
def settingsValue(name: str, default: str = "") -> str:
    value = slicer.app.userSettings().value(f"{SETTINGS_GROUP}/{name}", default)
    return default if value is None else str(value)


def setSettingsValue(name: str, value: str) -> None:
    slicer.app.userSettings().setValue(f"{SETTINGS_GROUP}/{name}", value)


def defaultWeightsPath() -> str:
    """Cache location of the downloaded checkpoint, under Slicer's cache folder."""
    return str(Path(slicer.app.cachePath) / "CTSAM3D" / WEIGHTS_FILE_NAME)


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


def computeSha256(path: str, progress: Optional[ProgressCallback] = None, chunkBytes: int = CHUNK_BYTES) -> str:
    """SHA-256 of a file, reporting ``progress(bytesDone, bytesTotal)`` after every chunk."""
    total = os.path.getsize(path)
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunkBytes), b""):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


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


def recordChecksum(weightsPath: str, sha256: str, source: str) -> None:
    """Write the record beside the weights (atomically), for the file as it is now."""
    size, modified = _fileVersion(weightsPath)
    _writeRecord(weightsPath, {
        "file": Path(weightsPath).name,
        "sha256": sha256,
        "size": size,
        "mtime_ns": modified,
        "source": source,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def recordedChecksum(weightsPath: str) -> Optional[str]:
    record = _readRecord(weightsPath)
    return None if record is None else record["sha256"]


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
    actual = computeSha256(weightsPath, progress)
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
def download(
    url: str,
    destination: str,
    progress: Optional[ProgressCallback] = None,
    isCancelled: Optional[Callable[[], bool]] = None,
    expectedSha256: Optional[str] = None,
    timeoutSeconds: float = 60.0,
) -> DownloadResult:
    """Stream ``url`` (https, http or file) into ``destination``; returns its path, SHA-256 and size.

    ``progress(bytesDone, bytesTotal or None)`` is called after every chunk; ``isCancelled()`` is polled
    as often and aborts with DownloadCancelledError. Safe to run on a background thread (no Slicer calls).
    """
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeoutSeconds) as response, open(temporary, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                if isCancelled is not None and isCancelled():
                    raise DownloadCancelledError(f"download of {url} cancelled")
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and done != total:
            raise OSError(f"download of {url} stopped after {done} of {total} bytes")
        sha256 = digest.hexdigest()
        if expectedSha256 and sha256 != expectedSha256.lower():
            raise ChecksumMismatchError(f"{url} has SHA-256 {sha256}, expected {expectedSha256}")
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    recordChecksum(str(target), sha256, url)
    return DownloadResult(str(target), sha256, done)
