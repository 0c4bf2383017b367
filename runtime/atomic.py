"""Atomic file output: a reader never sees a half-written file, an interrupted run leaves none."""

import contextlib
import glob
import os
import tempfile
from pathlib import Path

from bdm.errors import BdmError

_SUFFIX = ".part"  # temporaries are `.<name>.<random>.part` beside their destination


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The temporary file lives in the destination folder so that os.replace never crosses a file system.
    On any exception (Ctrl-C included) the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BdmError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if path.is_dir():
        raise BdmError(f"cannot write {path}: it is a folder; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=folder)
    except OSError as e:
        raise BdmError(f"cannot write {path}: {e.strerror}; choose another output path") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_temporaries(path):
    """Remove the temporaries that a killed writer of `path` left (a process killed outright, as Ray kills
    actors, runs no cleanup); the caller makes sure no writer of `path` is still running."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
