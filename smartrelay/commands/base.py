"""
What every C{smartrelay} sub-command shares: the exit-status exceptions,
the console, the argument parser that raises instead of exiting, and a few
helpers (atomic file replacement, DKIM name checks).

L{smartrelay.cli} and the modules of this package import from here; nothing
here imports a sub-command, so the imports run one way.
"""

import argparse
import getpass as _getpass
import os
import re
import sys
import tempfile
from typing import Callable, Optional, TextIO

import attrs

__all__ = [
    "PROG",
    "UsageError",
    "CommandError",
    "Console",
    "Parser",
    "writeFileAtomically",
    "dkimNameProblem",
]

PROG = "smartrelay"


class UsageError(Exception):
    """
    The command line is wrong (exit status 2).
    """


class CommandError(Exception):
    """
    The command could not do its work (exit status 1).
    """


@attrs.define
class Console:
    """
    The process's terminal, replaceable in tests.

    @ivar getpass: C{getpass(prompt) -> str}, reading without echo.
    """

    stdin: TextIO = attrs.field(factory=lambda: sys.stdin)
    stdout: TextIO = attrs.field(factory=lambda: sys.stdout)
    stderr: TextIO = attrs.field(factory=lambda: sys.stderr)
    getpass: Callable[[str], str] = _getpass.getpass


class Parser(argparse.ArgumentParser):
    """
    An argument parser that raises L{UsageError} instead of printing a usage
    block and exiting.
    """

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def writeFileAtomically(path: str, text: str, mode: int = 0o600) -> None:
    """
    Replace the file at C{path} with C{text} so that readers see the old or
    the new contents, never a mix: write a temporary file in the same
    directory, fsync it, rename it over C{path} and fsync the directory.

    The new file has permissions C{mode}; if C{path} existed, its owner and
    group are kept where the process may set them.  A symbolic link at
    C{path} is followed, so the file it points to is replaced.
    """
    path = os.path.realpath(path)
    directory, name = os.path.split(path)
    try:
        previous = os.stat(path)
    except FileNotFoundError:
        previous = None
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            os.fchmod(f.fileno(), mode)
            if previous is not None:
                try:
                    os.fchown(f.fileno(), previous.st_uid, previous.st_gid)
                except PermissionError:
                    pass
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


_DKIM_NAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def dkimNameProblem(name: str, what: str) -> Optional[str]:
    """
    Why C{name} cannot be a DKIM domain or selector (C{what}), or L{None}:
    it must be dot-separated DNS labels of letters, digits and inner hyphens.
    """
    if (not name or len(name) > 253 or not name.isascii()
            or not all(_DKIM_NAME_LABEL.fullmatch(label) for label in name.split("."))):
        return f"invalid {what} {name!r}: expected DNS labels such as " + (
            "example.com" if what == "domain" else "s2024")
    return None
