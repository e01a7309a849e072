"""
C{smartrelay}, the operator's command line.

Each sub-command is a function C{(options, console) -> int} registered in
L{_buildParser}; it raises L{CommandError} for a runtime problem (exit status
1) or L{UsageError} for a usage mistake (exit status 2).  L{main} turns both
into one line on standard error, never a traceback.

Sub-commands:
  - C{passwd FILE USERNAME [--delete]}: set or remove a user's SMTP AUTH
    password in a password file (see L{smartrelay.auth}).
  - C{dkim-keygen DOMAIN SELECTOR [--algorithm A] [--bits N] [--output PATH]}:
    make a DKIM private key file and print its DNS record and configuration
    (see L{smartrelay.engine.dkim}).
  - C{classify FILE...}: read returned messages offline and print one JSON
    line per recipient record (see L{smartrelay.feedback.report}).
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from smartrelay.auth import (
    AuthFileError,
    PasswordFile,
    hashPassword,
    readPasswordText,
    setPasswordLine,
    usernameProblem,
)
from smartrelay.commands.base import (
    PROG,
    CommandError,
    Console,
    Parser,
    UsageError,
    dkimNameProblem,
    writeFileAtomically,
)
from smartrelay.feedback.report import readReport, splitMailbox

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
# dkim-keygen

def _writeNewFile(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Create the file C{path} with C{data} and permissions C{mode}; never
    replace an existing file (or follow a symbolic link there).

    @raise FileExistsError: something is already at C{path}.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd != -1:
            os.close(fd)
        os.unlink(path)
        raise


def dkimKeygen(options: argparse.Namespace, console: Console) -> int:
    """
    C{smartrelay dkim-keygen DOMAIN SELECTOR [--algorithm A] [--bits N]
    [--output PATH]}: write a new private key (mode 0600, never over an
    existing file) and print the DNS TXT record to publish and the
    configuration section that uses the key.
    """
    from smartrelay.engine.dkim import generateKey, txtRecordStrings

    command = f"{PROG} dkim-keygen"
    domain, selector = options.domain.lower(), options.selector.lower()
    if domain.endswith(".") and len(domain) > 1:
        domain = domain[:-1]
    for name, what in [(domain, "domain"), (selector, "selector")]:
        problem = dkimNameProblem(name, what)
        if problem is not None:
            raise UsageError(f"{command}: {problem}")
    if options.algorithm == "rsa-sha256" and not 1024 <= options.bits <= 4096:
        raise UsageError(f"{command}: --bits must be 1024 to 4096, not {options.bits}")
    path = options.output or f"{domain}.{selector}.key"
    if os.path.lexists(path):
        raise CommandError(f"{path} already exists; not overwriting it")

    pem, txt = generateKey(options.algorithm, options.bits)
    try:
        _writeNewFile(path, pem)
    except FileExistsError:
        raise CommandError(f"{path} already exists; not overwriting it") from None
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None

    name = f"{selector}._domainkey.{domain}"
    strings = " ".join(f'"{part}"' for part in txtRecordStrings(txt))
    out = console.stdout
    out.write(f"wrote the {options.algorithm} private key to {path} (mode 0600)\n\n")
    out.write("Publish this DNS TXT record:\n")
    out.write(f"  name:  {name}\n")
    out.write(f"  value: {strings}\n\n")
    out.write("or, in a zone file:\n")
    out.write(f"{name}. IN TXT ( {strings} )\n\n")
    out.write("Then add this to the configuration:\n")
    out.write(f"[dkim:{domain}]\n")
    out.write(f"selector = {selector}\n")
    out.write(f"key = {os.path.abspath(path)}\n")
    out.write(f"algorithm = {options.algorithm}\n")
    return 0


# ---------------------------------------------------------------------------
# classify

#: The keys of each line C{classify} prints, in order (DESIGN 1.1).
CLASSIFY_KEYS = (
    "file",
    "type",
    "recipient",
    "kind",
    "reason",
    "status",
    "action",
    "diagnostic",
    "remote",
    "queue_id",
    "feedback_type",
)


#: A file given to C{classify} (a message or a mailbox) may be this large;
#: each message in it is read up to
#: L{smartrelay.feedback.report.MAX_REPORT} bytes.
MAX_CLASSIFY_FILE = 1024 * 1024 * 1024


def _readInput(path: str, console: Console) -> bytes:
    """
    The bytes of the message or mailbox at C{path} (C{-}: standard input).
    """
    if path == "-":
        stdin = console.stdin
        if stdin is None:
            raise CommandError("-: no standard input")
        source = getattr(stdin, "buffer", None)
        if source is not None:
            data = source.read(MAX_CLASSIFY_FILE + 1)
        else:
            text = stdin.read(MAX_CLASSIFY_FILE + 1)
            data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        if len(data) > MAX_CLASSIFY_FILE:
            raise CommandError(f"-: more than {MAX_CLASSIFY_FILE} bytes")
        return data
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a directory")
    try:
        if os.path.getsize(path) > MAX_CLASSIFY_FILE:
            raise CommandError(f"{path}: more than {MAX_CLASSIFY_FILE} bytes")
        with open(path, "rb") as f:
            return f.read(MAX_CLASSIFY_FILE + 1)
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except OSError as e:
        raise CommandError(f"{path}: cannot read: {e.strerror or e}") from None


def _classifyLines(path: str, data: bytes) -> list[dict]:
    """
    The C{classify} output objects for one file: a message, or a mailbox
    (mbox) of several.
    """
    # A file name that is not UTF-8 (surrogate escapes) cannot be printed
    # as it is.
    path = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    lines = []
    for message in splitMailbox(data):
        for record in readReport(message).records:
            line = {key: getattr(record, key, None) for key in CLASSIFY_KEYS}
            line["file"] = path
            line["type"] = record.type
            lines.append(line)
    if not lines:
        return [dict.fromkeys(CLASSIFY_KEYS, None) | {"file": path, "type": "none"}]
    return lines


def classify(options: argparse.Namespace, console: Console) -> int:
    """
    C{smartrelay classify FILE...}: read each message as a report and print
    one JSON object per recipient record; a message that is no report gets
    one object of type C{none}.  A file that cannot be read is a one-line
    error and makes the exit status 1; the other files are still read.
    """
    status = 0
    for path in options.files:
        try:
            data = _readInput(path, console)
        except CommandError as e:
            console.stderr.write(f"{PROG}: error: {e}\n")
            status = 1
            continue
        for line in _classifyLines(path, data):
            console.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return status


# ---------------------------------------------------------------------------
# The command line


def _buildParser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="The smartrelay operator's console.")
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

    p = commands.add_parser(
        "dkim-keygen",
        help="make a DKIM key and print its DNS record",
        description=(
            "Write a new DKIM private key for DOMAIN and SELECTOR to PATH "
            "(default DOMAIN.SELECTOR.key; an existing file is never "
            "replaced), then print the DNS TXT record to publish at "
            "SELECTOR._domainkey.DOMAIN and the configuration to add."
        ),
    )
    p.add_argument("domain", metavar="DOMAIN", help="the From: domain to sign for")
    p.add_argument("selector", metavar="SELECTOR", help="the key's selector, e.g. s2024")
    p.add_argument("--algorithm", choices=("rsa-sha256", "ed25519-sha256"),
                   default="rsa-sha256", help="the signing algorithm (default rsa-sha256)")
    p.add_argument("--bits", type=int, default=2048, metavar="N",
                   help="RSA key size, 1024 to 4096 (default 2048)")
    p.add_argument("--output", metavar="PATH",
                   help="where to write the private key (default DOMAIN.SELECTOR.key)")
    p.set_defaults(run=dkimKeygen)

    p = commands.add_parser(
        "classify",
        help="read bounces, complaints and auto-replies offline",
        description=(
            "Read each FILE (- for standard input) as a message that came "
            "back and print one JSON object per recipient record: file, "
            "type (bounce, complaint, unsubscribe, autoreply, none), "
            "recipient, kind, reason, status, action, diagnostic, remote, "
            "queue_id, feedback_type."
        ),
    )
    p.add_argument("files", metavar="FILE", nargs="+", help="a message file, or - for standard input")
    p.set_defaults(run=classify)

    # check-dns and the commands over the relay's API (smartrelay.commands).
    from smartrelay.commands import register

    register(commands)
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
