"""Writing files atomically: a hidden temporary file beside the destination, renamed over it only when complete.

Temporary files are named ``.lora-resizer-<host>-<pid>-<random>.part``: short, so that any legal output name fits
beside them, and naming the process that writes them, so that a later run on the same machine recognises the
ones a killed run (SIGKILL, a power cut) left behind and removes them. No torch here: the CLI uses it before
torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_NAME = re.compile(r"\.lora-resizer-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.part")


def _host_tag() -> str:
    """8 hex digits naming this machine, so that a run removes only its own machine's stale files from a shared folder."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temporary_name() -> str:
    """``.lora-resizer-<host>-<pid>-<random>.part``: short (any legal output name fits beside it), hidden, and
    naming the process that writes it, so that a later run can tell a stale one (its process is gone)."""
    return f".lora-resizer-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.part"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files that runs on this machine left in ``folder`` when they were killed (SIGKILL, a
    power cut): those named by :func:`_temporary_name` whose process no longer exists. Returns what was removed."""
    removed = []
    for path in folder.glob(".lora-resizer-*.part"):
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match and match["host"] == _host_tag() and not _process_exists(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _reserve_temporary(destination: Path) -> Path:
    """A new, empty, hidden file beside ``destination`` (mode 0o666 less the umask, like any file the user writes),
    after removing stale ones (:func:`remove_stale_temporaries`)."""
    remove_stale_temporaries(destination.parent)
    temporary = destination.parent / _temporary_name()
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``destination`` on success and is removed on any failure."""
    temporary = _reserve_temporary(destination)
    try:
        yield temporary
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def same_file(path: Path, other: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (through a hard link) the same inode."""
    if path.resolve() == other.resolve():
        return True
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def write_json(destination: Path, payload: dict) -> None:
    """Write a JSON file atomically (sorted keys, indented)."""
    with atomic_path(destination) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
