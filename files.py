"""Whole-file output and identity: atomic writes (a reader never sees a half-written file, an interrupted run leaves
none), an early check that an output path can be written, and the SHA-256 that exports and engines record."""

import contextlib
import glob
import hashlib
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


def check_output_path(path) -> Path:
    """Fail before any work when `path` cannot be written (the write itself is atomic anyway)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise BdmError(f"cannot write {path}: it is a folder; give a file name such as {path / 'model.onnx'}")
    if folder.exists() and not folder.is_dir():
        raise BdmError(f"cannot write {path}: {folder} is a file, not a folder; choose another output path")
    if not folder.is_dir():
        raise BdmError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BdmError(f"cannot write {path}: folder {folder} is not writable; choose another output path")
    return path


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
