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


class OutputError(OSError):
    """A finished output that could not be moved into place; the message says where it was kept."""


def folder_in_use(folder: Path) -> bool:
    """Whether `folder` is the current folder or holds it: renaming it away would pull the ground from under
    the shell that ran us (and `..` may be a mount point, which cannot be renamed at all)."""
    here, target = Path.cwd().resolve(), Path(folder).resolve()
    return target == here or target in here.parents


def _has_entries(folder: Path) -> bool:
    return any(not p.name.startswith(".lune-fast.") for p in folder.iterdir())


def check_output_dir(out: Path, overwrite: bool) -> None:
    """What atomic_output_dir refuses, for a caller to check before any work: a file in the way, an existing
    folder with something in it (without overwrite), and the current folder (or one holding it) unless it is
    empty — that one is filled in place and never replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file; the output is a folder")
    if folder_in_use(out):
        if overwrite:
            raise OutputExistsError(f"{out} is the folder you are in (or holds it): replacing it would pull it from "
                                    f"under you; write to a new folder")
        if _has_entries(out):
            raise OutputExistsError(f"{out} is the folder you are in (or holds it) and is not empty; write to a new "
                                    f"folder, or run from an empty one")
    elif out.exists() and not overwrite and _has_entries(out):
        raise OutputExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename (the previous
    output is kept until then). On failure the temporary folder is removed and `out` is untouched. An empty
    existing folder is written as if absent; the current folder (empty: check_output_dir) is filled in place,
    each entry renamed into it. If the finished output cannot be moved into place, it is kept where it was
    written and OutputError says where: a run never loses its result to the last rename."""
    out = Path(out)
    check_output_dir(out, overwrite)
    in_use = folder_in_use(out)
    if not in_use:
        out.parent.mkdir(parents=True, exist_ok=True)
    prefix = ".lune-fast.tmp-" if in_use else f".{out.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out if in_use else out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if in_use:
            for entry in tmp.iterdir():
                os.replace(entry, out / entry.name)
            tmp.rmdir()
        elif out.exists() and _has_entries(out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / out.name, out)  # the previous output back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # over an empty folder too
    except OSError as e:
        raise OutputError(f"the output is complete but could not be moved to {out} ({e.strerror or e}); it is "
                          f"kept in {tmp}") from e


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
