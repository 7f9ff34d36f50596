"""The authors' CT-SAM3D checkpoint from ModelScope: listed, chosen, streamed with resume, verified
against the checksum the host publishes, and renamed into place. Standard library only, so it runs in
3D Slicer's Python before torch is installed, and in plain Python.

ModelScope's own client (the ``modelscope`` package, ``hub/api.py`` and ``hub/file_download.py``) lists a
model's files with ``GET {endpoint}/api/v1/models/{owner}/{name}/repo/files?Revision=master&Recursive=true``
(JSON: ``Code`` 200, ``Success``, ``Data.Files[]`` with ``Path``, ``Name``, ``Type`` "blob" or "tree",
``Size``, ``Sha256``: the hex SHA-256 of the file's content) and downloads one with
``GET {endpoint}/api/v1/models/{owner}/{name}/repo?Revision=master&FilePath={path}`` (the path
percent-encoded whole, "/" included; modelscope 1804ac6, hub/api.py:1394 and hub/file_download.py:400).

- The checkpoint is the listing's ``.pth`` file; with several, the one named like the authors' (``params.pth``)
  and nearest the authors' size; the choice is reported.
- An interrupted transfer resumes where it stopped (HTTP Range), within a call (bounded retries with a
  growing pause) and across calls (the partial file ``<name>.<sha256[:12]>.part`` stays beside the target).
- The SHA-256 of the whole file must equal the listing's; otherwise the file is refused and the partial
  file deleted. Only a complete, verified file is renamed into place, with the usual permissions.
- If the listing fails (HTTP error, not JSON, no checkpoint in it), the known addresses of the file are
  tried; a file got that way has no checksum from the host, and the result says so. If they fail too,
  the error names the model page and how to use a file downloaded by hand.
- Proxies come from the environment (``https_proxy`` and the like), as urllib reads them. Every request
  has a timeout; a server that stalls counts as an interruption.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

from .files import CHUNK_BYTES, ProgressCallback, new_file_mode, sha256_of

MODEL_ID = "xiuan123/CT-SAM3D"
DEFAULT_ENDPOINT = "https://www.modelscope.cn"
MODEL_PAGE = f"{DEFAULT_ENDPOINT}/models/{MODEL_ID}"
REVISION = "master"
KNOWN_PATHS = ("params.pth", "ckpt_1000/params.pth")
"""Where the checkpoint may lie when the listing cannot say (the authors' notebook loads ckpt_1000/params.pth)."""
AUTHORS_SIZE = 296_400_000
"""About the size of the authors' checkpoint (74,023,156 float32 values and the pickle around them)."""
USER_AGENT = "ctsam3d-downloader (+https://github.com/SlicerCTSAM3D/SlicerCTSAM3D)"

class DownloadError(RuntimeError):
    """The weights could not be downloaded; the message says why and what to do."""


class ChecksumMismatchError(DownloadError):
    """The downloaded file's SHA-256 is not the one the host publishes; nothing was kept."""


class DownloadCancelledError(DownloadError):
    """The caller cancelled the download; nothing was kept."""


class RemoteFile(NamedTuple):
    path: str
    size: Optional[int]
    sha256: Optional[str]


class DownloadResult(NamedTuple):
    path: str
    sha256: str
    size: int
    source: str
    """The URL the file came from."""
    verified: bool
    """True when the SHA-256 equals the one the host's listing gives."""


def cache_folder() -> Path:
    """This user's CT-SAM3D folder for downloaded and derived files (shared by ``ctsam3d`` and the 3D Slicer
    module): the folder ``CTSAM3D_CACHE`` names, else ``ctsam3d`` in the platform's cache folder."""
    override = os.environ.get("CTSAM3D_CACHE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ctsam3d"


def default_weights_path() -> Path:
    """Where the weights are kept for this user: ``params.pth`` in ``cache_folder()``."""
    return cache_folder() / "params.pth"


def _api(endpoint: str, model_id: str) -> str:
    return f"{endpoint.rstrip('/')}/api/v1/models/{model_id}"


def listing_url(endpoint: str = DEFAULT_ENDPOINT, model_id: str = MODEL_ID) -> str:
    return f"{_api(endpoint, model_id)}/repo/files?Revision={REVISION}&Recursive=True"


def file_url(path: str, endpoint: str = DEFAULT_ENDPOINT, model_id: str = MODEL_ID) -> str:
    return f"{_api(endpoint, model_id)}/repo?Revision={REVISION}&FilePath={urllib.parse.quote(path, safe='')}"


def _open(url: str, timeout: float, offset: int = 0):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.build_opener().open(urllib.request.Request(url, headers=headers), timeout=timeout)


def list_files(endpoint: str = DEFAULT_ENDPOINT, model_id: str = MODEL_ID, timeout: float = 30.0) -> List[RemoteFile]:
    """The model's files as the host lists them; DownloadError saying what went wrong."""
    url = listing_url(endpoint, model_id)
    try:
        with _open(url, timeout) as response:
            content = json.loads(response.read().decode("utf-8"))
        if content.get("Code", 200) != 200 or content.get("Success") is False:
            raise ValueError(content.get("Message") or f"code {content.get('Code')}")
        files = content["Data"]["Files"]
        if not isinstance(files, list):
            raise ValueError("no file list")
        return [
            RemoteFile(str(entry["Path"]), int(entry["Size"]) if entry.get("Size") is not None else None,
                       str(entry["Sha256"]).lower() if entry.get("Sha256") else None)
            for entry in files
            if entry.get("Type", "blob") != "tree"
        ]
    except urllib.error.HTTPError as error:
        raise DownloadError(f"listing {url} failed: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"listing {url} failed: {getattr(error, 'reason', error)}") from error
    except (ValueError, KeyError, TypeError) as error:
        raise DownloadError(f"listing {url} failed: the answer is not ModelScope's file list ({error})") from error


def choose_checkpoint(files: List[RemoteFile]) -> Tuple[RemoteFile, str]:
    """The CT-SAM3D checkpoint among the listed files, and why it was chosen."""
    checkpoints = [item for item in files if item.path.lower().endswith(".pth")]
    if not checkpoints:
        raise DownloadError(f"the listing holds no .pth checkpoint ({len(files)} files)")
    if len(checkpoints) == 1:
        return checkpoints[0], f"the only checkpoint listed: {checkpoints[0].path}"

    def rank(item: RemoteFile):
        named = Path(item.path).name == "params.pth"
        return (not named, abs((item.size or 0) - AUTHORS_SIZE), item.path)

    chosen = min(checkpoints, key=rank)
    others = ", ".join(item.path for item in checkpoints if item is not chosen)
    return chosen, (f"{chosen.path}, named and sized like the authors' checkpoint, of {len(checkpoints)} "
                    f"checkpoints listed (also: {others})")


def _partial_path(destination: Path, sha256: Optional[str]) -> Path:
    tag = sha256[:12] if sha256 else "unverified"
    return destination.with_name(f"{destination.name}.{tag}.part")


def fetch(
    url: str,
    destination: Path,
    expected_sha256: Optional[str] = None,
    expected_size: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    is_cancelled: Optional[Callable[[], bool]] = None,
    timeout: float = 30.0,
    retries: int = 5,
) -> Tuple[str, int]:
    """Stream ``url`` into ``destination`` with resume and verification; returns (sha256, size).

    An interruption (a cut connection, a stall past ``timeout``) resumes from the bytes already written,
    up to ``retries`` times in a row without progress, pausing 1, 2, 4... seconds (at most 30).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(destination, expected_sha256)
    failures = 0
    while True:
        offset = partial.stat().st_size if partial.exists() else 0
        if expected_size is not None and offset > expected_size:
            partial.unlink()
            offset = 0
        try:
            if expected_size is not None and offset == expected_size:
                break
            received, total = _stream(url, partial, offset, expected_size, progress, is_cancelled, timeout)
            if received:
                failures = 0
            total_now = partial.stat().st_size
            if total is None or total_now >= total:
                break
            raise DownloadError(f"the server closed the connection after {total_now} of {total} bytes")
        except DownloadCancelledError:
            partial.unlink(missing_ok=True)
            raise
        except urllib.error.HTTPError as error:
            if error.code == 416 and offset:  # nothing left to send past what we hold: start over
                partial.unlink(missing_ok=True)
                continue
            if error.code < 500 and error.code != 429:
                raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
            failures += 1
            reason = f"HTTP {error.code}"
        except (DownloadError, http.client.HTTPException, OSError) as error:  # cut, stalled or refused
            failures += 1
            reason = str(getattr(error, "reason", error))
        if failures > retries:
            raise DownloadError(
                f"{url}: the download kept failing ({reason}); {partial.stat().st_size if partial.exists() else 0} "
                f"bytes are kept in {partial} and the next try resumes from there"
            )
        time.sleep(min(2.0 ** (failures - 1), 30.0))
    size = partial.stat().st_size
    sha256 = sha256_of(partial)
    if expected_sha256 and sha256 != expected_sha256.lower():
        partial.unlink()
        raise ChecksumMismatchError(
            f"{url}: the downloaded file has SHA-256 {sha256}, but the host publishes {expected_sha256}; it was "
            "deleted. Try again later; if this persists, download the file by hand from the model page"
        )
    os.chmod(partial, new_file_mode())
    os.replace(partial, destination)
    return sha256, size


def _stream(url, partial: Path, offset: int, expected_size, progress, is_cancelled, timeout):
    """Append what the server sends from ``offset`` to ``partial``; returns (bytes received, the file's
    whole size when known)."""
    received = 0
    with _open(url, timeout, offset) as response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the range: it sends the whole file again
        length = response.headers.get("Content-Length")
        total = expected_size if expected_size is not None else (offset + int(length) if length else None)
        with open(partial, "ab" if offset else "wb") as out:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                if is_cancelled is not None and is_cancelled():
                    raise DownloadCancelledError("the download was cancelled; nothing was kept")
                out.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(offset + received, total)
            out.flush()
            os.fsync(out.fileno())
    return received, total


def download_weights(
    destination: Optional[Path] = None,
    endpoint: str = DEFAULT_ENDPOINT,
    model_id: str = MODEL_ID,
    progress: Optional[ProgressCallback] = None,
    is_cancelled: Optional[Callable[[], bool]] = None,
    report: Callable[[str], None] = lambda message: None,
    timeout: float = 30.0,
    retries: int = 5,
) -> DownloadResult:
    """Download the authors' checkpoint into ``destination`` (default ``default_weights_path()``)."""
    destination = Path(destination) if destination is not None else default_weights_path()
    try:
        chosen, why = choose_checkpoint(list_files(endpoint, model_id, timeout))
    except DownloadError as listing_error:
        report(f"{listing_error}; trying the checkpoint's known addresses, without the host's checksum")
        return _download_known_paths(destination, endpoint, model_id, listing_error, progress, is_cancelled,
                                     report, timeout, retries)
    report(f"downloading {why} ({chosen.size or '?'} bytes, SHA-256 {chosen.sha256 or 'not published'})")
    url = file_url(chosen.path, endpoint, model_id)
    sha256, size = fetch(url, destination, chosen.sha256, chosen.size, progress, is_cancelled, timeout, retries)
    return DownloadResult(str(destination), sha256, size, url, verified=bool(chosen.sha256))


def _download_known_paths(destination, endpoint, model_id, listing_error, progress, is_cancelled, report, timeout,
                          retries) -> DownloadResult:
    failures = []
    for path in KNOWN_PATHS:
        url = file_url(path, endpoint, model_id)
        try:
            sha256, size = fetch(url, destination, None, None, progress, is_cancelled, timeout, retries)
        except DownloadCancelledError:
            raise
        except DownloadError as error:
            failures.append(str(error))
            continue
        report(f"downloaded {path} without a checksum from the host: its SHA-256 is {sha256}; compare it with "
               f"the model page {MODEL_PAGE}")
        return DownloadResult(str(destination), sha256, size, url, verified=False)
    raise DownloadError(
        f"the CT-SAM3D weights could not be downloaded ({listing_error}; {'; '.join(failures)}). Download "
        f"params.pth by hand from {MODEL_PAGE} and give its path: --weights in ctsam3d, 'Weights file' in the "
        "3D Slicer module"
    )
