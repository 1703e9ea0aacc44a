"""Write a directory atomically: fill a temporary sibling, then rename it into place.

A crash mid-write leaves the previous directory untouched (plus, at worst, a stray
`.lmzoo-tmp-<pid>-*` sibling, which the next write in that folder removes once its process is
gone), never a half-written checkpoint under the real name. On Linux the new directory takes
the old one's place in one step, so a reader never finds the name missing. A write that fails
(a full disk, say) removes its temporary directory and is one LmzooError naming the target."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile

from ..errors import LmzooError

_TMP = ".lmzoo-tmp-"

@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, keep_previous: str | None = None):
    """`with atomic_dir(path) as tmp:` write files into tmp; on success tmp becomes path. With
    keep_previous, the directory it replaces is kept under that name (one generation)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temporaries(parent)
        tmp = tempfile.mkdtemp(prefix=f"{_TMP}{os.getpid()}-", dir=parent)
    except OSError as e:
        raise LmzooError(f"{out_dir}: cannot write here: {e.strerror or e}") from None
    try:
        yield tmp
        for name in os.listdir(tmp):  # data on disk before the rename makes it visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        replace_dir(tmp, out_dir, keep_previous)
    except OSError as e:  # ENOSPC, EDQUOT, EIO...: the previous directory is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise LmzooError(f"{out_dir}: cannot write: {e.strerror or e}; the previous version, if any, "
                         "is unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """`with atomic_file(path) as tmp:` write the file tmp; on success it replaces path in one
    step (a reader sees the old file or the new one, never a part); on failure path is untouched."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temporaries(parent)
    except OSError as e:
        raise LmzooError(f"{path}: cannot write here: {e.strerror or e}") from None
    tmp = os.path.join(parent, f"{_TMP}{os.getpid()}-{os.path.basename(path)}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise LmzooError(f"{path}: cannot write: {e.strerror or e}; the previous file, if any, is unchanged") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def remove_stale_temporaries(parent: str) -> None:
    """Remove `.lmzoo-tmp-<pid>-*` files and directories whose process no longer runs (a killed run's)."""
    for path in glob.glob(os.path.join(glob.escape(parent), _TMP + "*-*")):
        pid = os.path.basename(path)[len(_TMP):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def replace_dir(new: str, target: str, keep_previous: str | None = None) -> None:
    """Move `new` to `target`; an existing `target` is kept until the new one is in place, and
    then under `keep_previous` if given (else removed)."""
    if not os.path.exists(target):
        os.replace(new, target)
        return
    if _exchange(new, target):  # one step: `target` is never missing; `new` now holds the old one
        _retire(new, keep_previous)
        return
    # Two steps: a crash between them leaves the previous directory as target.old-*, which
    # restore_interrupted puts back.
    old = target + ".old-" + os.path.basename(new)
    os.replace(target, old)
    os.replace(new, target)
    _retire(old, keep_previous)


def _retire(old: str, keep_previous: str | None) -> None:
    if keep_previous is None:
        shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(keep_previous, ignore_errors=True)  # a crash here loses only the older generation
    os.replace(old, keep_previous)


def restore_interrupted(target: str | os.PathLike) -> None:
    """Undo a replace_dir cut short between its two renames: bring the previous directory back."""
    target = os.path.abspath(os.fspath(target))
    if os.path.exists(target):
        return
    olds = sorted(glob.glob(glob.escape(target) + ".old-*"), key=os.path.getmtime)
    if olds:
        os.replace(olds[-1], target)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux's renameat2 with RENAME_EXCHANGE); False where the
    system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)
