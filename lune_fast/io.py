"""Atomic file and folder writes: a crash or a full disk never leaves a half-written output behind."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_file(path: Path, overwrite: bool = True):
    """Yield a temporary path beside `path` for the caller to write; on success it is synced and renamed
    over `path` in one step. On failure it is removed and `path` is untouched."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename (the previous
    output is kept until then). On failure the temporary folder is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_output_dir(out: Path) -> None:
    """Finish what a killed atomic_output_dir(overwrite=True) left: the previous folder put back when the kill
    fell between its two renames, and stale temporary folders removed. Only for a caller that holds the
    folder's lock (lune_fast.state.locked): another writer's temporary folder would look stale too."""
    out = Path(out)
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not out.exists():
        kept = [p / out.name for p in olds if (p / out.name).is_dir()]
        if kept:
            os.replace(kept[-1], out)
    for p in olds + list(out.parent.glob(f".{out.name}.tmp-*")):
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if needed) inside the block: one holder at a time, across
    threads and processes; a killed holder releases it."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
