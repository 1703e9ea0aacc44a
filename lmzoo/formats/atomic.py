"""Write a directory atomically: fill a temporary sibling, then rename it into place.

A crash mid-write leaves the previous directory untouched (plus, at worst, a stray
`.lmzoo-tmp-*` sibling), never a half-written checkpoint under the real name. On Linux the new
directory takes the old one's place in one step, so a reader never finds the name missing."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike):
    """`with atomic_dir(path) as tmp:` write files into tmp; on success tmp becomes path."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lmzoo-tmp-", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):  # data on disk before the rename makes it visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: str, target: str) -> None:
    """Move `new` to `target`; an existing `target` is kept until the new one is in place."""
    if not os.path.exists(target):
        os.replace(new, target)
        return
    if _exchange(new, target):  # one step: `target` is never missing; `new` now holds the old one
        shutil.rmtree(new, ignore_errors=True)
        return
    # Two steps: a crash between them leaves the previous directory as target.old-*, which
    # restore_interrupted puts back.
    old = target + ".old-" + os.path.basename(new)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


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
