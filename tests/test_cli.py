"""
Tests for L{smartrelay.cli}.
"""

import io
import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from smartrelay.auth import PasswordFile, hashPassword, verifyPassword
from smartrelay.cli import Console, main


class TTY(io.StringIO):
    """
    A standard input that claims to be a terminal.
    """

    def isatty(self):
        return True


class FakeGetpass:
    """
    A C{getpass} that answers from a list and records its prompts.
    """

    def __init__(self, *answers):
        self.answers = list(answers)
        self.prompts = []

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.answers:
            raise EOFError()
        return self.answers.pop(0)


class PasswdTests(SynchronousTestCase):
    """
    Tests for C{smartrelay passwd}.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "users")

    def runCLI(self, *argv, stdin="secret\n", getpass=None):
        """
        Run the command line; return (status, stdout, stderr).
        """
        console = Console(
            stdin=stdin if not isinstance(stdin, str) else io.StringIO(stdin),
            stdout=io.StringIO(),
            stderr=io.StringIO(),
            getpass=getpass or FakeGetpass(),
        )
        status = main(list(argv), console)
        return status, console.stdout.getvalue(), console.stderr.getvalue()

    def read(self):
        """
        The password file's text.
        """
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def write(self, text):
        """
        Set the password file's text.
        """
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(text)

    def assertOneLineError(self, result, status, message):
        """
        C{result} failed with C{status} and exactly one stderr line C{message}.
        """
        self.assertEqual(result, (status, "", message + "\n"))

    def test_addCreatesFile(self):
        """
        A new file is created, mode 0600, with a hash of the password from stdin.
        """
        status, out, err = self.runCLI("passwd", self.path, "app", stdin="s3cret pass\n")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"added user 'app' in {self.path}\n")
        passwords = PasswordFile.load(self.path)
        self.assertEqual(list(passwords.hashes), ["app"])
        self.assertTrue(verifyPassword(passwords.get("app"), "s3cret pass"))
        self.assertNotIn("s3cret", self.read())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_stdinOneLine(self):
        """
        Only the first line of stdin is the password, without its line ending.
        """
        self.runCLI("passwd", self.path, "app", stdin="first\r\nsecond\n")
        hashed = PasswordFile.load(self.path).get("app")
        self.assertTrue(verifyPassword(hashed, "first"))

    def test_stdinNoNewline(self):
        """
        A password without a final newline is taken whole.
        """
        self.runCLI("passwd", self.path, "app", stdin=" spaced ")
        self.assertTrue(verifyPassword(PasswordFile.load(self.path).get("app"), " spaced "))

    def test_stdinEmpty(self):
        """
        No password on stdin is an error and writes nothing.
        """
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "app", stdin=""), 1,
            "smartrelay: error: no password on standard input",
        )
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "app", stdin="\n"), 1,
            "smartrelay: error: the password is empty",
        )
        self.assertFalse(os.path.exists(self.path))

    def test_addKeepsOthers(self):
        """
        Adding a user keeps every other line, comments included.
        """
        other = hashPassword("x", ln=1, r=1, p=1)
        self.write(f"# SMTP users\n\nother:{other}\n")
        self.assertEqual(self.runCLI("passwd", self.path, "app")[0], 0)
        lines = self.read().splitlines()
        self.assertEqual(lines[:3], ["# SMTP users", "", f"other:{other}"])
        self.assertTrue(lines[3].startswith("app:$scrypt$"))
        self.assertEqual(len(lines), 4)

    def test_update(self):
        """
        Updating a user replaces its hash in place and says so.
        """
        one, two = (hashPassword(p, ln=1, r=1, p=1) for p in "12")
        self.write(f"a:{one}\n# middle\nb:{two}\n")
        status, out, err = self.runCLI("passwd", self.path, "a", stdin="new\n")
        self.assertEqual((status, out, err), (0, f"updated user 'a' in {self.path}\n", ""))
        lines = self.read().splitlines()
        self.assertEqual(lines[1:], ["# middle", f"b:{two}"])
        self.assertTrue(verifyPassword(lines[0].split(":", 1)[1], "new"))

    def test_updateFixesOwnBadLine(self):
        """
        Setting a password replaces that user's broken (plain-text) line.
        """
        self.write("a:plaintext\n")
        self.assertEqual(self.runCLI("passwd", self.path, "a")[0], 0)
        self.assertTrue(verifyPassword(PasswordFile.load(self.path).get("a"), "secret"))

    def test_refuseOtherBadLine(self):
        """
        Another user's broken line stops the edit, naming the line; the file is unchanged.
        """
        self.write("# x\nb:plaintext\n")
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "a"), 1,
            f"smartrelay: error: {self.path}:2: user 'b': this looks like a plain-text "
            "password; store a hash made with 'smartrelay passwd' instead; fix that line first",
        )
        self.assertEqual(self.read(), "# x\nb:plaintext\n")

    def test_delete(self):
        """
        C{--delete} removes the user and keeps everything else, without asking for a password.
        """
        one, two = (hashPassword(p, ln=1, r=1, p=1) for p in "12")
        self.write(f"# c\na:{one}\nb:{two}\n")
        getpass = FakeGetpass()
        status, out, err = self.runCLI(
            "passwd", self.path, "a", "--delete", stdin=TTY(), getpass=getpass
        )
        self.assertEqual((status, out, err), (0, f"removed user 'a' in {self.path}\n", ""))
        self.assertEqual(self.read(), f"# c\nb:{two}\n")
        self.assertEqual(getpass.prompts, [])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_deleteUnknownUser(self):
        """
        Deleting a user who is not there is an error; the file is unchanged.
        """
        self.write("# c\n")
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "a", "--delete"), 1,
            f"smartrelay: error: {self.path}: no user 'a'",
        )
        self.assertEqual(self.read(), "# c\n")

    def test_deleteMissingFile(self):
        """
        Deleting from a file that does not exist is an error.
        """
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "a", "--delete"), 1,
            f"smartrelay: error: {self.path}: no such file",
        )

    def test_badUsername(self):
        """
        Empty names and names with C{:} or whitespace are usage errors (status 2).
        """
        for name, problem in [
            ("", "the user name is empty"),
            ("a:b", "the user name 'a:b' contains ':'"),
            ("a b", "the user name 'a b' contains whitespace"),
            ("a\tb", "the user name 'a\\tb' contains whitespace"),
        ]:
            self.assertOneLineError(
                self.runCLI("passwd", self.path, name), 2, f"smartrelay passwd: {problem}"
            )
        self.assertFalse(os.path.exists(self.path))

    def test_unreadableDirectory(self):
        """
        A directory given as the file is a runtime error (status 1).
        """
        self.assertOneLineError(
            self.runCLI("passwd", self.directory, "a"), 1,
            f"smartrelay: error: {self.directory}: cannot read: Is a directory",
        )

    def test_unreadableNotUTF8(self):
        """
        A file that is not UTF-8 is a runtime error naming the line.
        """
        with open(self.path, "wb") as f:
            f.write(b"# \xff\n")
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "a"), 1,
            f"smartrelay: error: {self.path}:1: not valid UTF-8",
        )

    def test_unreadablePath(self):
        """
        A path that cannot be read as a file (here a directory, which even
        root cannot read as one) is a runtime error.
        """
        os.makedirs(self.path)
        status, out, err = self.runCLI("passwd", self.path, "a")
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(err.startswith(f"smartrelay: error: {self.path}: cannot read: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_unwritableDirectory(self):
        """
        A file in a directory that does not exist is a runtime error.
        """
        path = os.path.join(self.directory, "missing", "users")
        status, out, err = self.runCLI("passwd", path, "a")
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(err.startswith(f"smartrelay: error: cannot write {path}: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_noTemporaryFilesLeft(self):
        """
        Only the password file is left in its directory.
        """
        self.runCLI("passwd", self.path, "a")
        self.runCLI("passwd", self.path, "b")
        self.assertEqual(os.listdir(self.directory), ["users"])

    def test_followsSymlink(self):
        """
        A symbolic link is followed: the file it points to is replaced.
        """
        link = os.path.join(self.directory, "link")
        os.symlink("users", link)
        self.write("# c\n")
        self.assertEqual(self.runCLI("passwd", link, "a")[0], 0)
        self.assertTrue(os.path.islink(link))
        self.assertIn("a:$scrypt$", self.read())

    def test_modeTightened(self):
        """
        An existing group- or world-readable file ends up mode 0600.
        """
        self.write("# c\n")
        os.chmod(self.path, 0o644)
        self.runCLI("passwd", self.path, "a")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_ttyAsksTwice(self):
        """
        On a terminal the password is asked twice without echo.
        """
        getpass = FakeGetpass("pw one", "pw one")
        status, _, err = self.runCLI("passwd", self.path, "app", stdin=TTY(), getpass=getpass)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(getpass.prompts, ["New password for app: ", "Retype the password: "])
        self.assertTrue(verifyPassword(PasswordFile.load(self.path).get("app"), "pw one"))

    def test_ttyMismatch(self):
        """
        Two different answers on a terminal are an error and write nothing.
        """
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "app", stdin=TTY(), getpass=FakeGetpass("a", "b")),
            1, "smartrelay: error: the passwords do not match",
        )
        self.assertFalse(os.path.exists(self.path))

    def test_ttyEOF(self):
        """
        End of input at the prompt is an error, not a traceback.
        """
        self.assertOneLineError(
            self.runCLI("passwd", self.path, "app", stdin=TTY(), getpass=FakeGetpass()),
            1, "smartrelay: error: no password given",
        )

    def test_interrupted(self):
        """
        Control-C at the prompt is one line and status 1.
        """

        def interrupt(prompt):
            raise KeyboardInterrupt()

        self.assertOneLineError(
            self.runCLI("passwd", self.path, "app", stdin=TTY(), getpass=interrupt),
            1, "smartrelay: interrupted",
        )


class UsageTests(SynchronousTestCase):
    """
    Tests for command-line usage errors.
    """

    def runCLI(self, *argv):
        """
        Run the command line; return (status, stdout, stderr).
        """
        console = Console(stdin=io.StringIO(""), stdout=io.StringIO(), stderr=io.StringIO())
        status = main(list(argv), console)
        return status, console.stdout.getvalue(), console.stderr.getvalue()

    def test_noCommand(self):
        """
        No sub-command is a one-line usage error, status 2.
        """
        status, out, err = self.runCLI()
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(
            err,
            "smartrelay: the following arguments are required: COMMAND "
            "(see smartrelay --help)\n",
        )

    def test_unknownCommand(self):
        """
        An unknown sub-command is a one-line usage error, status 2.
        """
        status, _, err = self.runCLI("frobnicate")
        self.assertEqual(status, 2)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("invalid choice: 'frobnicate'", err)

    def test_missingArguments(self):
        """
        Missing arguments to passwd are a one-line usage error, status 2.
        """
        status, _, err = self.runCLI("passwd", "users")
        self.assertEqual(
            (status, err),
            (2, "smartrelay passwd: the following arguments are required: USERNAME "
                "(see smartrelay passwd --help)\n"),
        )

    def test_unknownOption(self):
        """
        An unknown option is a one-line usage error, status 2.
        """
        status, _, err = self.runCLI("passwd", "users", "a", "--bogus")
        self.assertEqual(status, 2)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("unrecognized arguments: --bogus", err)

    def test_help(self):
        """
        C{--help} succeeds.
        """
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()) as out:
            status, _, err = self.runCLI("passwd", "--help")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("--delete", out.getvalue())


class DKIMKeygenTests(SynchronousTestCase):
    """
    Tests for C{smartrelay dkim-keygen}.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "k.pem")

    def runCLI(self, *argv):
        """
        Run the command line; return (status, stdout, stderr).
        """
        console = Console(stdin=io.StringIO(""), stdout=io.StringIO(), stderr=io.StringIO())
        status = main(list(argv), console)
        return status, console.stdout.getvalue(), console.stderr.getvalue()

    def txtValue(self, out):
        """
        The TXT value printed, its quoted strings joined, and the strings.
        """
        import re

        line = [l for l in out.splitlines() if l.startswith("  value: ")][0]
        strings = re.findall(r'"([^"]*)"', line)
        return "".join(strings), strings

    def test_rsa(self):
        """
        An RSA-2048 key is written mode 0600; the record name, the TXT value
        in quoted strings of at most 255 characters, and the configuration
        section are printed; the key signs messages that verify against
        that TXT value.
        """
        import dkim

        from smartrelay.engine.dkim import DKIMKey, DKIMSigner

        status, out, err = self.runCLI("dkim-keygen", "Example.COM", "s2024", "--output",
                                       self.path)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path, "rb") as f:
            pem = f.read()
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----"))
        self.assertIn("  name:  s2024._domainkey.example.com\n", out)
        txt, strings = self.txtValue(out)
        self.assertTrue(txt.startswith("v=DKIM1; k=rsa; p=MIIBIjAN"))
        self.assertEqual([len(s) for s in strings], [255, len(txt) - 255])
        self.assertIn(f"s2024._domainkey.example.com. IN TXT ( "
                      f'"{strings[0]}" "{strings[1]}" )\n', out)
        self.assertTrue(out.endswith(
            "[dkim:example.com]\nselector = s2024\n"
            f"key = {self.path}\nalgorithm = rsa-sha256\n"), out)
        self.assertTrue(out.startswith(
            f"wrote the rsa-sha256 private key to {self.path} (mode 0600)\n"))

        signer = DKIMSigner([DKIMKey("example.com", "s2024", "rsa-sha256", pem)])
        signed = signer.sign(b"From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n")
        dns = {b"s2024._domainkey.example.com.": txt.encode()}
        self.assertTrue(dkim.verify(signed, dnsfunc=lambda name, timeout=5: dns.get(name)))
        pk, bits, ktag, _ = dkim.evaluate_pk(b"x", txt.encode())
        self.assertEqual((bits, ktag), (2048, b"rsa"))

    def test_ed25519(self):
        """
        C{--algorithm ed25519-sha256} makes an Ed25519 key; its TXT value
        fits one string.
        """
        status, out, err = self.runCLI("dkim-keygen", "example.com", "e1", "--algorithm",
                                       "ed25519-sha256", "--output", self.path)
        self.assertEqual((status, err), (0, ""))
        txt, strings = self.txtValue(out)
        self.assertTrue(txt.startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual(len(strings), 1)
        self.assertIn("algorithm = ed25519-sha256\n", out)
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        with open(self.path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        self.assertIsInstance(key, ed25519.Ed25519PrivateKey)

    def test_bits(self):
        """
        C{--bits} sets the RSA size; out of 1024..4096 is a usage error.
        """
        status, out, _ = self.runCLI("dkim-keygen", "example.com", "s", "--bits", "1024",
                                     "--output", self.path)
        self.assertEqual(status, 0)
        txt, strings = self.txtValue(out)
        self.assertEqual(len(strings), 1)
        for bits in ["512", "8192"]:
            self.assertEqual(
                self.runCLI("dkim-keygen", "example.com", "t", "--bits", bits, "--output",
                            self.path + bits),
                (2, "", f"smartrelay dkim-keygen: --bits must be 1024 to 4096, not {bits}\n"))
            self.assertFalse(os.path.exists(self.path + bits))
        status, _, err = self.runCLI("dkim-keygen", "example.com", "t", "--bits", "many")
        self.assertEqual((status, err.count("\n")), (2, 1))
        self.assertIn("invalid int value: 'many'", err)

    def test_defaultOutput(self):
        """
        Without C{--output} the key goes to C{DOMAIN.SELECTOR.key} in the
        current directory.
        """
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)
        status, out, err = self.runCLI("dkim-keygen", "example.com.", "S1")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(os.listdir(self.directory), ["example.com.s1.key"])
        self.assertIn(f"key = {os.path.join(self.directory, 'example.com.s1.key')}\n", out)
        self.assertIn("  name:  s1._domainkey.example.com\n", out)

    def test_refusesOverwrite(self):
        """
        An existing file (or symbolic link) is never replaced: one-line
        error, status 1.
        """
        with open(self.path, "w") as f:
            f.write("old")
        self.assertEqual(
            self.runCLI("dkim-keygen", "example.com", "s1", "--output", self.path),
            (1, "", f"smartrelay: error: {self.path} already exists; not overwriting it\n"))
        with open(self.path) as f:
            self.assertEqual(f.read(), "old")
        link = os.path.join(self.directory, "link")
        os.symlink(os.path.join(self.directory, "missing"), link)
        self.assertEqual(
            self.runCLI("dkim-keygen", "example.com", "s1", "--output", link)[0], 1)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "missing")))

    def test_unwritable(self):
        """
        A directory that does not exist is a one-line runtime error.
        """
        path = os.path.join(self.directory, "missing", "k.pem")
        status, out, err = self.runCLI("dkim-keygen", "example.com", "s1", "--output", path)
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(err.startswith(f"smartrelay: error: cannot write {path}: "), err)
        self.assertEqual(err.count("\n"), 1)

    def test_badNames(self):
        """
        A domain or selector that is not DNS labels is a one-line usage
        error, status 2, and writes nothing.
        """
        for domain, selector, message in [
            ("ex ample.com", "s1", "invalid domain 'ex ample.com': expected DNS labels "
                                   "such as example.com"),
            ("", "s1", "invalid domain '': expected DNS labels such as example.com"),
            ("a-.example", "s1", "invalid domain 'a-.example': expected DNS labels "
                                 "such as example.com"),
            ("a..example", "s1", "invalid domain 'a..example': expected DNS labels "
                                 "such as example.com"),
            ("example.com", "s_1", "invalid selector 's_1': expected DNS labels such as s2024"),
            ("example.com", "s;1", "invalid selector 's;1': expected DNS labels such as s2024"),
            ("example.com", "s1.", "invalid selector 's1.': expected DNS labels such as s2024"),
            ("\u00e9.example", "s1", "invalid domain '\u00e9.example': expected DNS labels "
                                     "such as example.com"),
        ]:
            self.assertEqual(
                self.runCLI("dkim-keygen", domain, selector, "--output", self.path),
                (2, "", f"smartrelay dkim-keygen: {message}\n"))
        self.assertEqual(os.listdir(self.directory), [])

    def test_badAlgorithm(self):
        """
        An unknown algorithm is a one-line usage error.
        """
        status, out, err = self.runCLI("dkim-keygen", "example.com", "s1", "--algorithm",
                                       "rsa-sha1", "--output", self.path)
        self.assertEqual((status, out, err.count("\n")), (2, "", 1))
        self.assertIn("invalid choice: 'rsa-sha1'", err)
        self.assertFalse(os.path.exists(self.path))

    def test_missingSelector(self):
        """
        A missing SELECTOR is a one-line usage error.
        """
        self.assertEqual(
            self.runCLI("dkim-keygen", "example.com"),
            (2, "", "smartrelay dkim-keygen: the following arguments are required: SELECTOR "
                    "(see smartrelay dkim-keygen --help)\n"))

    def test_help(self):
        """
        C{--help} succeeds and names the options.
        """
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()) as out:
            status, _, err = self.runCLI("dkim-keygen", "--help")
        self.assertEqual((status, err), (0, ""))
        for option in ["--algorithm", "--bits", "--output"]:
            self.assertIn(option, out.getvalue())


class ClassifyTests(SynchronousTestCase):
    """
    Tests for C{smartrelay classify}.
    """

    BOUNCE = (
        b"From: MAILER-DAEMON@mx.example.net\r\n"
        b"To: bounce+abc@bounces.shop.example\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n"
        b"\r\n"
        b"--B\r\n"
        b"Content-Type: message/delivery-status\r\n"
        b"\r\n"
        b"Reporting-MTA: dns; mx.example.net\r\n"
        b"\r\n"
        b"Final-Recipient: rfc822; gone@example.net\r\n"
        b"Action: failed\r\n"
        b"Status: 5.1.1\r\n"
        b"Remote-MTA: dns; mx1.example.net\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
        b"\r\n"
        b"Final-Recipient: rfc822; later@example.org\r\n"
        b"Action: delayed\r\n"
        b"Status: 4.4.1\r\n"
        b"\r\n"
        b"--B\r\n"
        b"Content-Type: text/rfc822-headers\r\n"
        b"\r\n"
        b"X-SmartRelay-ID: 3A/7F-00042-0BADC0DE\r\n"
        b"--B--\r\n"
    )

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)

    def write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def runCLI(self, *argv, stdin=b""):
        """
        Run the command line with C{stdin} as standard input's bytes;
        return (status, the JSON lines printed, stderr).
        """
        console = Console(
            stdin=io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
        status = main(list(argv), console)
        lines = [json.loads(line) for line in console.stdout.getvalue().splitlines()]
        return status, lines, console.stderr.getvalue()

    def test_recordPerRecipient(self):
        """
        A DSN prints one object per recipient with every key of the design,
        the path as given.
        """
        path = self.write("dsn.eml", self.BOUNCE)
        status, lines, err = self.runCLI("classify", path)
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(
            lines[0],
            {
                "file": path,
                "type": "bounce",
                "recipient": "gone@example.net",
                "kind": "hard",
                "reason": "userunknown",
                "status": "5.1.1",
                "action": "failed",
                "diagnostic": "550 5.1.1 user unknown",
                "remote": "mx1.example.net",
                "queue_id": "3A/7F-00042-0BADC0DE",
                "feedback_type": None,
            },
        )
        self.assertEqual(
            (lines[1]["recipient"], lines[1]["action"], lines[1]["kind"]),
            ("later@example.org", "delayed", "soft"),
        )
        self.assertEqual(len(lines), 2)

    def test_standardInput(self):
        """
        C{-} reads the message from standard input.
        """
        status, lines, _ = self.runCLI("classify", "-", stdin=self.BOUNCE)
        self.assertEqual(status, 0)
        self.assertEqual([line["file"] for line in lines], ["-", "-"])

    def test_notAReport(self):
        """
        Plain mail, an empty file and binary junk print one object of type
        none with every other key null.
        """
        paths = [
            self.write("plain.eml", b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"),
            self.write("empty.eml", b""),
            self.write("junk.bin", bytes(range(256)) * 8),
        ]
        status, lines, err = self.runCLI("classify", *paths)
        self.assertEqual((status, err), (0, ""))
        for path, line in zip(paths, lines):
            self.assertEqual(line, dict.fromkeys(line, None) | {"file": path, "type": "none"})
        self.assertEqual(len(lines), 3)

    def test_unsubscribe(self):
        """
        Mail to an unsub+ address is of type unsubscribe.
        """
        path = self.write(
            "unsub.eml",
            b"From: Reader <reader@example.com>\r\nTo: unsub+AbC_12-x@bounces.shop.example\r\n"
            b"Subject: unsubscribe\r\n\r\n\r\n",
        )
        _, [line], _ = self.runCLI("classify", path)
        self.assertEqual((line["type"], line["recipient"]), ("unsubscribe", "reader@example.com"))

    def test_unreadable(self):
        """
        A missing file and a directory are one-line errors each and exit
        status 1; the readable files are still classified.
        """
        good = self.write("dsn.eml", self.BOUNCE)
        missing = os.path.join(self.directory, "missing.eml")
        status, lines, err = self.runCLI("classify", missing, self.directory, good)
        self.assertEqual(status, 1)
        self.assertEqual(
            err.splitlines(),
            [
                f"smartrelay: error: {missing}: no such file",
                f"smartrelay: error: {self.directory}: is a directory",
            ],
        )
        self.assertEqual([line["file"] for line in lines], [good, good])

    def test_mailbox(self):
        """
        A mailbox file (mbox) prints the records of each of its messages.
        """
        second = self.BOUNCE.replace(b"gone@example.net", b"other@example.com")
        path = self.write(
            "box.mbox",
            b"From MAILER-DAEMON Mon Dec  7 01:02:03 2026\r\n" + self.BOUNCE
            + b"\r\nFrom MAILER-DAEMON Mon Dec  7 01:02:04 2026\r\n" + second,
        )
        status, lines, _ = self.runCLI("classify", path)
        self.assertEqual(status, 0)
        self.assertEqual(
            [line["recipient"] for line in lines],
            ["gone@example.net", "later@example.org", "other@example.com", "later@example.org"],
        )

    def test_fileNameNotUTF8(self):
        """
        A file name that is not UTF-8 is printed with replacement
        characters, not a traceback.
        """
        name = os.fsdecode(b"bad-\xff.eml")
        path = self.write(name, self.BOUNCE)
        status, lines, err = self.runCLI("classify", path)
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(lines[0]["file"].endswith("bad-\ufffd.eml"))

    def test_noFiles(self):
        """
        C{classify} without a file is a usage error.
        """
        status, lines, err = self.runCLI("classify")
        self.assertEqual((status, lines), (2, []))
        self.assertIn("FILE", err)
