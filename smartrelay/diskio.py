"""
Small blocking file helpers shared by the spool, the event journal and the
queue-id state.  Every function here blocks: call them from a thread, never
from the reactor thread.
"""

import os


def writeAll(fd: int, blob: bytes) -> None:
    """
    Write all of C{blob} to C{fd} (os.write may write less than asked).
    """
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view) :]


def appendDurably(path: str, blob: bytes) -> None:
    """
    Append C{blob} to C{path} (created 0600 if missing) and fdatasync it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        writeAll(fd, blob)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def fsyncDirectory(path: str) -> None:
    """
    fsync a directory so that renames and new entries in it are durable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlinkQuietly(path: str) -> None:
    """
    Remove C{path}; a file that is already gone is fine.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
