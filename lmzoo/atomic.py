"""Write a directory atomically: fill a temporary sibling, then rename it into place.

A crash mid-write leaves the previous directory untouched (plus, at worst, a stray
`.lmzoo-tmp-*` sibling), never a half-written checkpoint under the real name."""

from __future__ import annotations

import contextlib
import os
import shutil
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
    old = target + ".old-" + os.path.basename(new)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
