"""Durable writes shared by the journal, the latch and the nonce store: a whole buffer to a file
descriptor, and an fsync of a directory (so a new or renamed file's name survives a crash)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_all"]


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: Path) -> None:
    """fsync `directory` itself: the names created, renamed or removed in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
