"""Files the commands write: checked before any work starts, written whole or not at all, and given
the permissions any other program would give them (0666 less the umask, not a temporary file's 0600)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

ProgressCallback = Callable[[int, Optional[int]], None]
"""``progress(bytesDone, bytesTotal or None)``."""

CHUNK_BYTES = 1 << 20

def check_output_path(path: PathLike) -> None:
    """Refuse, before any work, an output that could not be written: a folder, or a place whose nearest
    existing folder is not writable (missing folders are made only when the file is written)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    ancestor = path.parent if str(path.parent) else Path(".")
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: no permission to write in {ancestor}")


def sha256_of(path: PathLike, progress: Optional[ProgressCallback] = None) -> str:
    """The hex SHA-256 of a file's content, reporting ``progress(bytesDone, bytesTotal)`` after each chunk."""
    total = os.path.getsize(path)
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def new_file_mode() -> int:
    """The mode a new file gets here: 0666 less the process's umask."""
    with contextlib.suppress(OSError):  # /proc is Linux's; elsewhere ask os.umask
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` (with its extension) to write into. When the block ends it gets
    the usual permissions and replaces ``path``; when the block raises, it is removed, and so is any
    folder made for it. Either way no half-written file is left under the user's name."""
    path = Path(path)
    made: List[Path] = []
    folder = path.parent if str(path.parent) else Path(".")
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for missing in reversed(made):
        missing.mkdir()
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".gz") else path.suffix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
