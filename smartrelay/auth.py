"""
SMTP AUTH credentials: a file of salted scrypt hashes, never plain text.

The file has one user per line; blank lines and lines starting with C{#} are
ignored::

    # who may submit with SMTP AUTH
    app1:$scrypt$ln=14,r=8,p=1$<salt, base64>$<hash, base64>

The hash string is the one passlib writes for scrypt (standard base64 without
padding), so hashes made by either tool are interchangeable.  Operators create
and change entries with C{smartrelay passwd FILE USERNAME}.

Passwords given as C{str} are NFC-normalised and encoded as UTF-8; passwords
given as C{bytes} (as SMTP AUTH delivers them) are decoded as UTF-8 first where
possible so that both spellings of the same text verify alike.
"""

import base64
import binascii
import hashlib
import hmac
import os
import re
import unicodedata
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Union

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

#: scrypt cost used by L{hashPassword} unless told otherwise: N = 2 ** 14,
#: r = 8, p = 1 (16 MiB of memory, tens of milliseconds per check).
DEFAULT_LN = 14
DEFAULT_R = 8
DEFAULT_P = 1

SALT_BYTES = 16
DIGEST_BYTES = 32

#: The most memory (128 * r * N bytes) a hash may ask scrypt for.
MAX_SCRYPT_MEMORY = 1 << 30

_PREFIX = "$scrypt$"
_HASH_RE = re.compile(
    r"\$scrypt\$ln=(?P<ln>[0-9]{1,2}),r=(?P<r>[0-9]{1,4}),p=(?P<p>[0-9]{1,4})"
    r"\$(?P<salt>[A-Za-z0-9+/]+={0,2})\$(?P<digest>[A-Za-z0-9+/]+={0,2})"
)


class AuthFileError(ValueError):
    """
    A password file could not be read or has a bad line.

    C{str()} is one line: C{FILE:LINE: problem}, or C{FILE: problem} when the
    problem is not on one line (the file is missing, say).

    @ivar source: the file name.
    @ivar line: the 1-based line number, or L{None}.
    @ivar problem: what is wrong, without the location.
    """

    def __init__(self, source: str, line: Optional[int], problem: str) -> None:
        super().__init__(source, line, problem)
        self.source = source
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return _oneLine(f"{where}: {self.problem}")


def _oneLine(text: str) -> str:
    return " ".join(text.split())


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    text = text.rstrip("=")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _passwordBytes(password: Union[str, bytes]) -> bytes:
    if isinstance(password, bytes):
        try:
            password = password.decode("utf-8")
        except UnicodeDecodeError:
            return password
    return unicodedata.normalize("NFC", password).encode("utf-8")


def usernameProblem(username: str) -> Optional[str]:
    """
    Why C{username} cannot be used in a password file, or L{None} if it can.

    A user name is not empty, has no C{:}, no whitespace and no control
    characters, and does not start with C{#} (that would be a comment).
    """
    if not username:
        return "the user name is empty"
    if ":" in username:
        return f"the user name {username!r} contains ':'"
    for c in username:
        if c.isspace():
            return f"the user name {username!r} contains whitespace"
        if unicodedata.category(c).startswith("C"):
            return f"the user name {username!r} contains a control character"
    if username.startswith("#"):
        return f"the user name {username!r} starts with '#'"
    return None


@attrs.frozen
class ScryptHash:
    """
    One parsed C{$scrypt$ln=..,r=..,p=..$salt$digest} string.

    @ivar ln: log2 of scrypt's N.
    """

    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> "ScryptHash":
        """
        Parse a hash string; raise L{ValueError} with a one-line reason.

        The message never repeats C{text}: it might be a plain-text password.
        """
        match = _HASH_RE.fullmatch(text)
        if match is None:
            if text.startswith(_PREFIX):
                raise ValueError(
                    "malformed scrypt hash (expected "
                    "$scrypt$ln=N,r=N,p=N$<salt base64>$<hash base64>)"
                )
            if text.startswith("$"):
                scheme = text.split("$")[1][:20]
                raise ValueError(
                    f"unsupported hash format '${scheme}$' "
                    "(only $scrypt$ hashes are supported)"
                )
            raise ValueError(
                "this looks like a plain-text password; store a hash made "
                "with 'smartrelay passwd' instead"
            )
        ln, r, p = int(match["ln"]), int(match["r"]), int(match["p"])
        if not 1 <= ln <= 31 or r < 1 or p < 1:
            raise ValueError(
                f"bad scrypt parameters ln={ln},r={r},p={p} "
                "(need ln between 1 and 31 and positive r and p)"
            )
        if 128 * r * (1 << ln) > MAX_SCRYPT_MEMORY:
            raise ValueError(
                f"scrypt parameters ln={ln},r={r} need more than "
                f"{MAX_SCRYPT_MEMORY >> 20} MiB of memory"
            )
        try:
            salt = _b64decode(match["salt"])
            digest = _b64decode(match["digest"])
        except binascii.Error:
            raise ValueError("malformed base64 in scrypt hash") from None
        if len(salt) < 8:
            raise ValueError("the scrypt salt is shorter than 8 bytes")
        if len(digest) < 16:
            raise ValueError("the scrypt hash is shorter than 16 bytes")
        return cls(ln=ln, r=r, p=p, salt=salt, digest=digest)

    def __str__(self) -> str:
        return (
            f"{_PREFIX}ln={self.ln},r={self.r},p={self.p}"
            f"${_b64encode(self.salt)}${_b64encode(self.digest)}"
        )

    def compute(self, password: Union[str, bytes]) -> bytes:
        """
        scrypt of C{password} with this hash's salt and cost (slow on purpose).
        """
        return _scrypt(
            _passwordBytes(password), self.salt, self.ln, self.r, self.p,
            len(self.digest),
        )

    def verify(self, password: Union[str, bytes]) -> bool:
        """
        Whether C{password} matches, compared in constant time.
        """
        return hmac.compare_digest(self.compute(password), self.digest)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, dklen: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=dklen,
        maxmem=128 * r * n * 2 + (1 << 20),
    )


def hashPassword(
    password: Union[str, bytes],
    *,
    ln: int = DEFAULT_LN,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    salt: Optional[bytes] = None,
) -> str:
    """
    A new C{$scrypt$...} hash string for C{password}, with a random 16-byte
    salt unless C{salt} is given.
    """
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    digest = _scrypt(_passwordBytes(password), salt, ln, r, p, DIGEST_BYTES)
    return str(ScryptHash(ln=ln, r=r, p=p, salt=salt, digest=digest))


def verifyPassword(hash: str, password: Union[str, bytes]) -> bool:
    """
    Whether C{password} matches the hash string C{hash} (constant-time
    comparison).  A malformed C{hash} raises L{ValueError}.
    """
    return ScryptHash.parse(hash).verify(password)


def _splitLine(line: str) -> Optional[tuple[str, str]]:
    """
    The (user name, rest) of a password-file line, or L{None} for a blank
    line or a comment.  A line without C{:} gives (whole line, "").
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    username, colon, rest = stripped.partition(":")
    return username, rest.strip()


@attrs.frozen
class PasswordFile:
    """
    The parsed contents of a password file.

    @ivar hashes: user name to hash string, read-only.
    @ivar source: where it was read from (for messages).
    """

    hashes: Mapping[str, str] = attrs.field(
        converter=lambda m: MappingProxyType(dict(m)), eq=False
    )
    source: str = "<passwords>"

    # MappingProxyType does not compare by content; compare the dicts.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PasswordFile):
            return NotImplemented
        return dict(self.hashes) == dict(other.hashes) and self.source == other.source

    def __hash__(self) -> int:
        return hash((frozenset(self.hashes.items()), self.source))

    @classmethod
    def parse(cls, text: str, source: str = "<passwords>") -> "PasswordFile":
        """
        Parse the text of a password file; raise L{AuthFileError} for the
        first bad line.
        """
        hashes: dict[str, str] = {}
        firstLine: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            entry = _splitLine(line)
            if entry is None:
                continue
            username, hash = entry
            if ":" not in line:
                raise AuthFileError(
                    source, number, "expected 'username:$scrypt$...'"
                )
            problem = usernameProblem(username)
            if problem is not None:
                raise AuthFileError(source, number, problem)
            if username in hashes:
                raise AuthFileError(
                    source, number,
                    f"duplicate user {username!r} (first on line {firstLine[username]})",
                )
            try:
                ScryptHash.parse(hash)
            except ValueError as e:
                raise AuthFileError(source, number, f"user {username!r}: {e}") from None
            hashes[username] = hash
            firstLine[username] = number
        return cls(hashes=hashes, source=source)

    @classmethod
    def load(cls, path: str) -> "PasswordFile":
        """
        Read and parse the password file at C{path} (relative paths are
        relative to the current directory); raise L{AuthFileError}.
        """
        return cls.parse(readPasswordText(path), path)

    def get(self, username: str) -> Optional[str]:
        """
        The hash string stored for C{username}, or L{None}.
        """
        return self.hashes.get(username)


def readPasswordText(path: str) -> str:
    """
    The text of the file at C{path}; raise L{AuthFileError} if it cannot be
    read or is not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AuthFileError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise AuthFileError(path, line, "not valid UTF-8") from None


def setPasswordLine(text: str, username: str, hash: Optional[str]) -> tuple[str, bool]:
    """
    Edit the text of a password file: give C{username} the hash C{hash}, or
    remove the user when C{hash} is L{None}.

    Every other line, comments included, is kept as it is.  A user already
    present keeps its position; a new user is appended.  Returns the new
    text and whether C{username} was present before.
    """
    lines = text.splitlines(keepends=True)
    out = []
    found = False
    for line in lines:
        entry = _splitLine(line)
        if entry is not None and entry[0] == username:
            if not found and hash is not None:
                out.append(f"{username}:{hash}\n")
            found = True
        else:
            out.append(line)
    if not found and hash is not None:
        if out and not out[-1].endswith(("\n", "\r")):
            out[-1] += "\n"
        out.append(f"{username}:{hash}\n")
    return "".join(out), found


@implementer(ICredentialsChecker)
@attrs.define
class HashedPasswordChecker:
    """
    Check L{IUsernamePassword} credentials against a L{PasswordFile}.

    scrypt is slow on purpose, so every slow check runs through
    C{runInThread(f, *args) -> Deferred} (in production C{lambda f, *a:
    deferToThreadPool(reactor, pool, f, *a)}), never on the reactor thread.

    After a successful slow check the checker remembers an HMAC-SHA256 of the
    password under a random per-process key, for that user and that stored
    hash; the next login with the same password is then checked in
    microseconds.  Only successes are remembered, a wrong password always
    takes the slow path, and replacing C{passwords} with a file holding a new
    hash for the user makes the remembered value useless.

    An unknown user costs the same scrypt work as a known one and fails with
    L{UnauthorizedLogin}.  The avatar id is the user name, a C{str}.

    @ivar passwords: the current password file; may be replaced at run time.
    """

    credentialInterfaces = (IUsernamePassword,)

    passwords: PasswordFile
    runInThread: Callable[..., Deferred]
    _cacheKey: bytes = attrs.field(factory=lambda: os.urandom(32), init=False, repr=False)
    _cache: dict = attrs.field(factory=dict, init=False, repr=False)

    def _fast(self, username: str, stored: str, password: bytes) -> bytes:
        message = b"\0".join([username.encode("utf-8"), stored.encode("ascii"), password])
        return hmac.new(self._cacheKey, message, hashlib.sha256).digest()

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred:
        """
        Fire with the user name if the password matches, else fail with
        L{UnauthorizedLogin}.
        """
        rawUsername = credentials.username
        if isinstance(rawUsername, bytes):
            try:
                username = rawUsername.decode("utf-8")
            except UnicodeDecodeError:
                username = None
        else:
            username = rawUsername
        password = _passwordBytes(credentials.password)
        stored = self.passwords.get(username) if username is not None else None

        if stored is None:
            d = self.runInThread(self._burn, password)
            d.addCallback(self._unknownUser)
            return d

        fast = self._fast(username, stored, password)
        cached = self._cache.get(username)
        if cached is not None and hmac.compare_digest(cached, fast):
            return succeed(username)

        d = self.runInThread(verifyPassword, stored, password)

        def checked(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin("bad user name or password")
            self._cache[username] = fast
            return username

        d.addCallback(checked)
        return d

    def _burn(self, password: bytes) -> None:
        """
        Do the scrypt work of one check and throw the result away, so that an
        unknown user takes as long as a known one.
        """
        template: Optional[ScryptHash] = None
        for hash in self.passwords.hashes.values():
            template = ScryptHash.parse(hash)
            break
        if template is None:
            _scrypt(password, bytes(SALT_BYTES), DEFAULT_LN, DEFAULT_R, DEFAULT_P, DIGEST_BYTES)
        else:
            _scrypt(
                password, bytes(len(template.salt)), template.ln, template.r,
                template.p, len(template.digest),
            )

    @staticmethod
    def _unknownUser(ignored: object) -> None:
        raise UnauthorizedLogin("bad user name or password")
