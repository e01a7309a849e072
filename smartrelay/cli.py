"""
C{smartrelay}, the operator's command line.

Each sub-command is a function C{(options, console) -> int} registered in
L{_buildParser}; it raises L{CommandError} for a runtime problem (exit status
1) or L{UsageError} for a usage mistake (exit status 2).  L{main} turns both
into one line on standard error, never a traceback.

Sub-commands:
  - C{passwd FILE USERNAME [--delete]}: set or remove a user's SMTP AUTH
    password in a password file (see L{smartrelay.auth}).
"""

import argparse
import getpass as _getpass
import os
import sys
import tempfile
from typing import Callable, Optional, Sequence, TextIO

import attrs

from smartrelay.auth import (
    AuthFileError,
    PasswordFile,
    hashPassword,
    readPasswordText,
    setPasswordLine,
    usernameProblem,
)

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


class _Parser(argparse.ArgumentParser):
    """
    An argument parser that raises L{UsageError} instead of printing a usage
    block and exiting.
    """

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------
# passwd


def _readPassword(username: str, console: Console) -> str:
    """
    The new password: one line from standard input when it is not a
    terminal, else asked twice without echo.
    """
    stdin = console.stdin
    if stdin is None or not stdin.isatty():
        if stdin is None:
            raise CommandError("no password on standard input")
        line = stdin.readline()
        if not line:
            raise CommandError("no password on standard input")
        password = line.rstrip("\r\n")
    else:
        try:
            password = console.getpass(f"New password for {username}: ")
            again = console.getpass("Retype the password: ")
        except EOFError:
            raise CommandError("no password given") from None
        if password != again:
            raise CommandError("the passwords do not match")
    if not password:
        raise CommandError("the password is empty")
    return password


def _readExisting(path: str) -> Optional[str]:
    """
    The text of the password file at C{path}, or L{None} if there is none.
    """
    if not os.path.lexists(path):
        return None
    try:
        return readPasswordText(path)
    except AuthFileError as e:
        raise CommandError(str(e)) from None


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


def passwd(options: argparse.Namespace, console: Console) -> int:
    """
    C{smartrelay passwd FILE USERNAME [--delete]}.
    """
    path, username = options.file, options.username
    problem = usernameProblem(username)
    if problem is not None:
        raise UsageError(f"{PROG} passwd: {problem}")
    existing = _readExisting(path)

    if options.delete:
        if existing is None:
            raise CommandError(f"{path}: no such file")
        text, found = setPasswordLine(existing, username, None)
        if not found:
            raise CommandError(f"{path}: no user {username!r}")
        verb = "removed"
    else:
        password = _readPassword(username, console)
        text, found = setPasswordLine(existing or "", username, hashPassword(password))
        verb = "updated" if found else "added"

    # Refuse to write a file the relay could not load (another line is bad).
    try:
        PasswordFile.parse(text, path)
    except AuthFileError as e:
        raise CommandError(f"{e}; fix that line first") from None

    try:
        writeFileAtomically(path, text)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None
    console.stdout.write(f"{verb} user {username!r} in {path}\n")
    return 0


# ---------------------------------------------------------------------------
# The command line


def _buildParser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The smartrelay operator's console.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "passwd",
        help="set or remove a user's SMTP AUTH password",
        description=(
            "Set USERNAME's password in FILE (created if missing), or remove "
            "the user with --delete.  The password is read from standard "
            "input (one line) when it is not a terminal, else asked twice."
        ),
    )
    p.add_argument("file", metavar="FILE", help="the password file ([smtp] auth_file)")
    p.add_argument("username", metavar="USERNAME")
    p.add_argument("--delete", action="store_true", help="remove the user")
    p.set_defaults(run=passwd)
    return parser


def main(argv: Optional[Sequence[str]] = None, console: Optional[Console] = None) -> int:
    """
    Run the command line C{argv} (default: C{sys.argv[1:]}); return the exit
    status: 0 for success, 1 for a runtime error, 2 for a usage error.
    """
    if console is None:
        console = Console()
    parser = _buildParser()
    try:
        try:
            options = parser.parse_args(argv)
        except SystemExit as e:
            # --help and friends
            return e.code if isinstance(e.code, int) else 0
        return options.run(options, console)
    except UsageError as e:
        console.stderr.write(f"{e}\n")
        return 2
    except CommandError as e:
        console.stderr.write(f"{PROG}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        console.stderr.write(f"{PROG}: interrupted\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
