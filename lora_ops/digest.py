"""sha256 of whole files, optionally started ahead of time (no torch here).

The CLI starts hashing its input with :func:`hash_ahead` right after reading its arguments, on the second
core, while the main thread is still importing torch; :func:`file_sha256` then picks up that result for
as long as the file is unchanged (same path, size, inode and modification time).
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from pathlib import Path

CHUNK_BYTES = 8 * 1024**2  # large enough that the hashing thread rarely waits for the GIL between chunks

_ahead: dict[tuple, Future[str]] = {}


def _version(path: str | Path) -> tuple:
    """What identifies one version of a file: its real path, size, inode and modification time."""
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_size, stat.st_ino, stat.st_mtime_ns)


def _sha256(path: str | Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with Path(path).open("rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def hash_ahead(*paths: str | Path) -> None:
    """Start hashing the regular files among ``paths``, one after another, in one daemon thread (it never holds up
    the process's exit): one thread leaves the other core to the main thread, where one thread per file would take
    a share of it."""
    files = [path for path in paths if os.path.isfile(path)]
    futures: list[Future[str]] = [Future() for _ in files]
    for path, future in zip(files, futures):
        _ahead[_version(path)] = future

    def run() -> None:
        for path, future in zip(files, futures):
            try:
                future.set_result(_sha256(path))
            except BaseException as error:  # noqa: BLE001 - handed to whoever waits for the result
                future.set_exception(error)

    if files:
        threading.Thread(target=run, name="hash-ahead", daemon=True).start()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the whole file: the result of :func:`hash_ahead` for this version of it, or computed now."""
    future = _ahead.pop(_version(path), None)
    return future.result() if future is not None else _sha256(path)
