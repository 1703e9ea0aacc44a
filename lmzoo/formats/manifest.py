"""A directory's manifest: every file's size and SHA-256, so that a reader can tell a whole
checkpoint from one with a flipped bit, a cut-short file or a file missing.

    write_manifest(tmp)        # last, once every other file is written
    verify_manifest(path)      # LmzooError naming the first file that does not match
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import LmzooError

MANIFEST = "manifest.json"


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str) -> None:
    files = sorted(n for n in os.listdir(directory) if n != MANIFEST)
    entries = {n: {"bytes": os.path.getsize(os.path.join(directory, n)), "sha256": _digest(os.path.join(directory, n))}
               for n in files}
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"files": entries}, f, indent=1)


def verify_manifest(directory: str) -> None:
    """Check every file the manifest lists (and that nothing it lacks is there)."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["files"]
        listed = {str(n): (int(e["bytes"]), str(e["sha256"])) for n, e in entries.items()}
    except FileNotFoundError:
        raise LmzooError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LmzooError(f"{path}: not a valid manifest ({type(e).__name__})") from None
    unlisted = sorted(set(os.listdir(directory)) - {MANIFEST} - set(listed))
    if unlisted:
        raise LmzooError(f"{os.path.join(directory, unlisted[0])} is not in the manifest")
    for name, (size, sha) in sorted(listed.items()):
        file = os.path.join(directory, name)
        if os.sep in name or name in ("", ".", "..") or not os.path.isfile(file):
            raise LmzooError(f"{file}: listed in the manifest, but missing")
        if os.path.getsize(file) != size:
            raise LmzooError(f"{file}: {os.path.getsize(file)} bytes, the manifest says {size} (cut short?)")
        if _digest(file) != sha:
            raise LmzooError(f"{file}: its SHA-256 differs from the manifest's (the file is damaged)")
