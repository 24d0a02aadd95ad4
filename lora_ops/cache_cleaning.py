"""Cleaning what a web server's file cache leaves behind once its own cleaner has run.

Gradio's `delete_cache` deletes the files it handed out when they are old enough, and nothing else
(`gradio.route_utils.delete_files_created_by_app`): the per-file folders they sat in stay, empty, and so do the
0-byte temporary files its upload parser creates for every upload (`NamedTemporaryFile(delete=False)` in
`gradio.route_utils.GradioMultiPartParser`, whose bytes are then moved away). Both grow with every request.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def sweep(root: Path, max_age: float, now: float | None = None) -> int:
    """Remove, under ``root`` (never ``root`` itself), the empty folders and the empty files not modified for
    ``max_age`` seconds; return how many were removed.

    Folders are visited deepest first, so a tree of empty folders goes at once. Anything with bytes in it is left to
    the cache's own cleaner; anything younger than ``max_age`` may still be in use and is left. A path that vanishes
    or fills while being looked at is skipped.
    """
    cutoff = (time.time() if now is None else now) - max_age
    # Folder ages as they were before this sweep: removing a child touches its parent.
    folder_ages = {Path(folder): _mtime(Path(folder)) for folder, _, _ in os.walk(root)}
    removed = 0
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            removed += _remove_if(path, _mtime(path) < cutoff and _size(path) == 0, os.remove)
        if Path(folder) != root:
            removed += _remove_if(Path(folder), folder_ages.get(Path(folder), cutoff) < cutoff, os.rmdir)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return float("inf")


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return -1


def _remove_if(path: Path, stale: bool, remove) -> int:
    """1 when ``path`` is ``stale`` and could be removed now; 0 otherwise (``os.rmdir`` refuses a folder that is
    not empty, so one that filled meanwhile stays)."""
    if not stale:
        return 0
    try:
        remove(path)
    except OSError:  # gone, filled or in use meanwhile: the next sweep looks again
        return 0
    return 1
