"""
Tests for L{smartrelay.auth}.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smartrelay.auth import (
    AuthFileError,
    HashedPasswordChecker,
    PasswordFile,
    ScryptHash,
    hashPassword,
    setPasswordLine,
    usernameProblem,
    verifyPassword,
)

# scrypt with N = 2: fast enough for many examples.
CHEAP = {"ln": 1, "r": 1, "p": 1}


def cheapHash(password):
    """
    A hash of C{password} that is quick to make and check.
    """
    return hashPassword(password, **CHEAP)


class HashTests(SynchronousTestCase):
    """
    Tests for L{hashPassword} and L{verifyPassword}.
    """

    @given(st.text(max_size=40))
    def test_roundTrip(self, password):
        """
        A hash verifies the password it was made from, as text or UTF-8 bytes.
        """
        hashed = cheapHash(password)
        self.assertTrue(verifyPassword(hashed, password))
        self.assertTrue(verifyPassword(hashed, password.encode("utf-8")))

    @given(st.text(max_size=20), st.text(max_size=20))
    def test_otherPassword(self, password, other):
        """
        A hash does not verify a different password.
        """
        if password == other:
            return
        self.assertFalse(verifyPassword(cheapHash(password), other))

    def test_format(self):
        """
        The hash string is C{$scrypt$ln=..,r=..,p=..$salt$hash} with a 16-byte salt.
        """
        hashed = hashPassword("pw", ln=4, r=2, p=1)
        self.assertRegex(hashed, r"^\$scrypt\$ln=4,r=2,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$")
        parsed = ScryptHash.parse(hashed)
        self.assertEqual((parsed.ln, parsed.r, parsed.p, len(parsed.salt), len(parsed.digest)),
                         (4, 2, 1, 16, 32))
        self.assertEqual(str(parsed), hashed)

    def test_defaultCost(self):
        """
        By default the cost is N = 2 ** 14, r = 8, p = 1.
        """
        self.assertTrue(hashPassword("pw").startswith("$scrypt$ln=14,r=8,p=1$"))

    def test_randomSalt(self):
        """
        Two hashes of one password differ (the salt is random).
        """
        self.assertNotEqual(cheapHash("pw"), cheapHash("pw"))

    def test_passlibCompatible(self):
        """
        A C{$scrypt$} hash made by passlib (its documentation's example) verifies.
        """
        passlib = (
            "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$"
            "nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E"
        )
        self.assertTrue(verifyPassword(passlib, "password"))
        self.assertFalse(verifyPassword(passlib, "Password"))

    def test_fixedSalt(self):
        """
        With a given salt the hash is deterministic and is plain scrypt.
        """
        import base64
        import hashlib

        hashed = hashPassword("pw", ln=4, r=2, p=1, salt=b"0123456789abcdef")
        expected = hashlib.scrypt(b"pw", salt=b"0123456789abcdef", n=16, r=2, p=1, dklen=32)
        self.assertEqual(
            hashed,
            "$scrypt$ln=4,r=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$"
            + base64.b64encode(expected).decode().rstrip("="),
        )

    def test_unicodeNormalised(self):
        """
        Composed and decomposed spellings of a password are the same password.
        """
        hashed = cheapHash("caf\u00e9")
        self.assertTrue(verifyPassword(hashed, "cafe\u0301"))
        self.assertTrue(verifyPassword(hashed, "cafe\u0301".encode("utf-8")))

    def test_nonUTF8Bytes(self):
        """
        Bytes that are not UTF-8 are hashed as they are.
        """
        hashed = cheapHash(b"\xff\xfe")
        self.assertTrue(verifyPassword(hashed, b"\xff\xfe"))
        self.assertFalse(verifyPassword(hashed, "\xff\xfe"))

    def test_malformedHash(self):
        """
        A malformed hash raises L{ValueError} without repeating the text.
        """
        for bad in [
            "hunter2",
            "$2b$12$abcdefghijklmnopqrstuv",
            "$scrypt$ln=14$x$y",
            "$scrypt$ln=0,r=8,p=1$c2FsdHNhbHQ$" + "A" * 43,
            "$scrypt$ln=14,r=0,p=1$c2FsdHNhbHQ$" + "A" * 43,
            "$scrypt$ln=30,r=8,p=1$c2FsdHNhbHQ$" + "A" * 43,
            "$scrypt$ln=14,r=8,p=1$c2Fs$" + "A" * 43,
            "$scrypt$ln=14,r=8,p=1$c2FsdHNhbHQ$QUFB",
            "$scrypt$ln=14,r=8,p=1$c2FsdHNhbHQ$A",
        ]:
            error = self.assertRaises(ValueError, verifyPassword, bad, "x")
            self.assertNotIn(bad, str(error))
            self.assertNotIn("\n", str(error))

    def test_messages(self):
        """
        Plain text, other schemes and broken scrypt strings each get their own reason.
        """
        self.assertEqual(
            str(self.assertRaises(ValueError, ScryptHash.parse, "hunter2")),
            "this looks like a plain-text password; store a hash made with "
            "'smartrelay passwd' instead",
        )
        self.assertEqual(
            str(self.assertRaises(ValueError, ScryptHash.parse, "$2b$12$abc")),
            "unsupported hash format '$2b$' (only $scrypt$ hashes are supported)",
        )
        self.assertEqual(
            str(self.assertRaises(ValueError, ScryptHash.parse, "$scrypt$x")),
            "malformed scrypt hash (expected $scrypt$ln=N,r=N,p=N$<salt base64>$<hash base64>)",
        )


class UsernameTests(SynchronousTestCase):
    """
    Tests for L{usernameProblem}.
    """

    def test_good(self):
        """
        Ordinary names, e-mail addresses and non-ASCII letters are fine.
        """
        for name in ["app1", "billing@example.com", "j\u00fcrgen", "a#b"]:
            self.assertIsNone(usernameProblem(name))

    def test_bad(self):
        """
        Empty names, C{:}, whitespace, control characters or a leading C{#} are refused.
        """
        for name in ["", "a:b", "a b", "a\tb", "a\x00b", "#a", "a\u2028b"]:
            self.assertIsNotNone(usernameProblem(name), name)


class PasswordFileTests(SynchronousTestCase):
    """
    Tests for L{PasswordFile}.
    """

    def test_parse(self):
        """
        Users are read; comments and blank lines are skipped.
        """
        one, two = cheapHash("1"), cheapHash("2")
        passwords = PasswordFile.parse(f"# users\n\napp1:{one}\n  app2:{two}  \r\n", "f")
        self.assertEqual(dict(passwords.hashes), {"app1": one, "app2": two})
        self.assertEqual(passwords.get("app1"), one)
        self.assertIsNone(passwords.get("app3"))
        self.assertEqual(passwords.source, "f")

    def test_equality(self):
        """
        Files with the same users and source are equal.
        """
        text = f"a:{cheapHash('1')}\n"
        self.assertEqual(PasswordFile.parse(text, "f"), PasswordFile.parse(text, "f"))
        self.assertNotEqual(PasswordFile.parse(text, "f"), PasswordFile.parse("", "f"))

    def test_readOnly(self):
        """
        The parsed hashes cannot be changed.
        """
        passwords = PasswordFile.parse(f"a:{cheapHash('1')}\n")
        with self.assertRaises(TypeError):
            passwords.hashes["b"] = "x"

    def assertFileError(self, text, expected):
        """
        Parsing C{text} as file C{users} fails with exactly C{expected}.
        """
        error = self.assertRaises(AuthFileError, PasswordFile.parse, text, "users")
        self.assertEqual(str(error), expected)
        self.assertIsInstance(error, ValueError)

    def test_plainText(self):
        """
        A plain-text password is refused with its line number and never echoed.
        """
        self.assertFileError(
            "# users\napp:hunter2\n",
            "users:2: user 'app': this looks like a plain-text password; "
            "store a hash made with 'smartrelay passwd' instead",
        )

    def test_unknownScheme(self):
        """
        Other hash schemes are refused with their line number.
        """
        self.assertFileError(
            "\n\napp:$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW\n",
            "users:3: user 'app': unsupported hash format '$2b$' "
            "(only $scrypt$ hashes are supported)",
        )

    def test_noColon(self):
        """
        A line without C{:} is refused with its line number.
        """
        self.assertFileError("just-a-name\n", "users:1: expected 'username:$scrypt$...'")

    def test_badUsername(self):
        """
        A bad user name is refused with its line number.
        """
        self.assertFileError(
            f"a b:{cheapHash('x')}\n", "users:1: the user name 'a b' contains whitespace"
        )
        self.assertFileError(f":{cheapHash('x')}\n", "users:1: the user name is empty")

    def test_duplicate(self):
        """
        A user listed twice is refused, naming both lines.
        """
        hashed = cheapHash("x")
        self.assertFileError(
            f"a:{hashed}\n# x\na:{hashed}\n", "users:3: duplicate user 'a' (first on line 1)"
        )

    def test_load(self):
        """
        L{PasswordFile.load} reads a file and names it as the source.
        """
        path = self.mktemp()
        hashed = cheapHash("x")
        with open(path, "w") as f:
            f.write(f"a:{hashed}\n")
        self.assertEqual(PasswordFile.load(path), PasswordFile({"a": hashed}, path))

    def test_loadMissing(self):
        """
        A missing file is one line naming it.
        """
        path = self.mktemp()
        error = self.assertRaises(AuthFileError, PasswordFile.load, path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")

    def test_loadNotUTF8(self):
        """
        A file that is not UTF-8 is one line naming it and the line.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# ok\n# \xff\n")
        error = self.assertRaises(AuthFileError, PasswordFile.load, path)
        self.assertEqual(str(error), f"{path}:2: not valid UTF-8")


class SetPasswordLineTests(SynchronousTestCase):
    """
    Tests for L{setPasswordLine}.
    """

    def test_add(self):
        """
        A new user is appended; everything else is kept.
        """
        self.assertEqual(
            setPasswordLine("# c\na:H1\n", "b", "H2"), ("# c\na:H1\nb:H2\n", False)
        )

    def test_addNoFinalNewline(self):
        """
        A file without a final newline gets one before the new line.
        """
        self.assertEqual(setPasswordLine("a:H1", "b", "H2"), ("a:H1\nb:H2\n", False))

    def test_addEmpty(self):
        """
        An empty text gets just the new line.
        """
        self.assertEqual(setPasswordLine("", "b", "H2"), ("b:H2\n", False))

    def test_replace(self):
        """
        An existing user keeps its place and gets the new hash.
        """
        self.assertEqual(
            setPasswordLine("a:H1\n# c\nb:H2\n", "a", "H3"), ("a:H3\n# c\nb:H2\n", True)
        )

    def test_delete(self):
        """
        Deleting removes the user's line only.
        """
        self.assertEqual(setPasswordLine("a:H1\n# a:x\nb:H2\n", "a", None), ("# a:x\nb:H2\n", True))

    def test_deleteMissing(self):
        """
        Deleting an absent user changes nothing and says so.
        """
        self.assertEqual(setPasswordLine("a:H1\n", "b", None), ("a:H1\n", False))


class RecordingRunner:
    """
    A C{runInThread} that counts calls and runs them at once.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        self.calls.append(f)
        return maybeDeferred(f, *args)


class HashedPasswordCheckerTests(SynchronousTestCase):
    """
    Tests for L{HashedPasswordChecker}.
    """

    def setUp(self):
        self.hashes = {"alice": cheapHash("wonderland"), "bob": cheapHash("builder")}
        self.runner = RecordingRunner()
        self.checker = HashedPasswordChecker(PasswordFile(self.hashes), self.runner)

    def login(self, username, password):
        """
        Ask the checker about C{username} and C{password}.
        """
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    def test_interface(self):
        """
        The checker provides L{ICredentialsChecker} for username/password credentials.
        """
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertEqual(self.checker.credentialInterfaces, (IUsernamePassword,))

    def test_success(self):
        """
        The right password gives the user name, as C{str}, for text or bytes.
        """
        self.assertEqual(self.successResultOf(self.login("alice", "wonderland")), "alice")
        self.assertEqual(self.successResultOf(self.login(b"bob", b"builder")), "bob")

    def test_wrongPassword(self):
        """
        A wrong password fails with L{UnauthorizedLogin}.
        """
        self.failureResultOf(self.login("alice", "builder"), UnauthorizedLogin)

    def test_unknownUser(self):
        """
        An unknown user fails with L{UnauthorizedLogin} after the same scrypt work.
        """
        self.failureResultOf(self.login("carol", "wonderland"), UnauthorizedLogin)
        self.assertEqual(len(self.runner.calls), 1)

    def test_unknownUserNotUTF8(self):
        """
        A user name that is not UTF-8 is an unknown user.
        """
        self.failureResultOf(self.login(b"\xff", "x"), UnauthorizedLogin)
        self.assertEqual(len(self.runner.calls), 1)

    def test_unknownUserEmptyFile(self):
        """
        With no users at all every login fails, still doing scrypt work.
        """
        checker = HashedPasswordChecker(PasswordFile({}), self.runner)
        self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"a", b"b")), UnauthorizedLogin
        )
        self.assertEqual(len(self.runner.calls), 1)

    def test_slowCheckInThread(self):
        """
        The scrypt check runs through C{runInThread}, not inline.
        """
        pending = []

        def runInThread(f, *args):
            d = Deferred()
            pending.append((d, f, args))
            return d

        checker = HashedPasswordChecker(PasswordFile(self.hashes), runInThread)
        result = checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
        self.assertNoResult(result)
        d, f, args = pending.pop()
        d.callback(f(*args))
        self.assertEqual(self.successResultOf(result), "alice")

    def test_cachedSuccess(self):
        """
        After one slow success the same password is checked without a thread call.
        """
        self.successResultOf(self.login("alice", "wonderland"))
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual(self.successResultOf(self.login(b"alice", b"wonderland")), "alice")
        self.assertEqual(len(self.runner.calls), 1)

    def test_failureNotCached(self):
        """
        A wrong password always takes the slow path and never turns into success.
        """
        self.successResultOf(self.login("alice", "wonderland"))
        for _ in range(2):
            self.failureResultOf(self.login("alice", "wrong"), UnauthorizedLogin)
        self.assertEqual(len(self.runner.calls), 3)

    def test_failuresDoNotPoisonCache(self):
        """
        Failed attempts before a success do not stop the right password working.
        """
        self.failureResultOf(self.login("alice", "wrong"), UnauthorizedLogin)
        self.assertEqual(self.successResultOf(self.login("alice", "wonderland")), "alice")

    def test_cachePerUser(self):
        """
        A password cached for one user does not log in another.
        """
        self.successResultOf(self.login("alice", "wonderland"))
        self.failureResultOf(self.login("bob", "wonderland"), UnauthorizedLogin)

    def test_newHashInvalidatesCache(self):
        """
        Replacing the file with a new hash for a user makes the old password fail.
        """
        self.successResultOf(self.login("alice", "wonderland"))
        self.checker.passwords = PasswordFile(
            {"alice": cheapHash("looking-glass"), "bob": self.hashes["bob"]}
        )
        self.failureResultOf(self.login("alice", "wonderland"), UnauthorizedLogin)
        self.assertEqual(self.successResultOf(self.login("alice", "looking-glass")), "alice")

    def test_removedUser(self):
        """
        A user removed from the file can no longer log in, cache or not.
        """
        self.successResultOf(self.login("alice", "wonderland"))
        self.checker.passwords = PasswordFile({"bob": self.hashes["bob"]})
        self.failureResultOf(self.login("alice", "wonderland"), UnauthorizedLogin)

    def test_threadFailurePropagates(self):
        """
        A failure in the thread call is passed on, never taken as success.
        """
        checker = HashedPasswordChecker(
            PasswordFile(self.hashes), lambda f, *a: fail(RuntimeError("pool gone"))
        )
        self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")), RuntimeError
        )

    def test_cacheKeyPerProcess(self):
        """
        Each checker has its own random cache key.
        """
        other = HashedPasswordChecker(PasswordFile(self.hashes), self.runner)
        self.assertNotEqual(self.checker._cacheKey, other._cacheKey)
        self.assertEqual(len(self.checker._cacheKey), 32)
        self.assertNotIn("wonderland", repr(self.checker))
