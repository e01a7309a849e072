"""
Tests for L{smartrelay.config}.
"""

import ipaddress
import math
import operator
import os
import re

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.auth import hashPassword
from smartrelay.config import (
    DEFAULT_RETRY,
    DEFAULT_THROTTLE_PATTERNS,
    NAMED_SECTIONS,
    SECTIONS,
    TLS_POLICIES,
    DKIM_ALGORITHMS,
    Config,
    ConfigError,
    DKIMConfig,
    DomainConfig,
    FeedbackConfig,
    ProviderConfig,
    Rate,
    RetrySchedule,
    TrackingConfig,
    WebConfig,
    defaultConfig,
    formatDuration,
    formatSize,
    isHostname,
    loadConfig,
    parseBool,
    parseConfig,
    parseDuration,
    parseFraction,
    parseRate,
    parseSize,
    sectionKeys,
)

from tests.certs import selfSigned as _selfSigned

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "etc", "smartrelay.ini")


def _writeKey(test, key, encryption=None) -> str:
    """
    Write C{key} as a PKCS#8 PEM file under C{test.mktemp()}; return its path.
    """
    path = test.mktemp()
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                encryption or serialization.NoEncryption(),
            )
        )
    return path


class ConfigTestMixin:
    """
    Helpers for parsing one key.
    """

    def parseKey(self, section, key, value):
        """
        Parse a file setting one key; return the section object.
        """
        config = parseConfig(f"[{section}]\n{key} = {value}\n", "etc/x.ini")
        return getattr(config, SECTIONS[section][0])

    def assertKeyError(self, section, key, value, problem):
        """
        Setting C{key} to C{value} fails with exactly the one-line C{problem}.
        """
        error = self.assertRaises(
            ConfigError, parseConfig, f"[{section}]\n{key} = {value}\n", "etc/x.ini"
        )
        self.assertEqual(str(error), f"etc/x.ini: [{section}] {key}: {problem}")
        self.assertEqual((error.section, error.key), (section, key))
        self.assertNotIn("\n", str(error))
        return error

    def assertKeyErrorMatches(self, section, key, value, pattern):
        """
        Setting C{key} to C{value} fails with a one-line error matching the
        regular expression C{pattern} (after the location).
        """
        error = self.assertRaises(
            ConfigError, parseConfig, f"[{section}]\n{key} = {value}\n", "etc/x.ini"
        )
        prefix = f"etc/x.ini: [{section}] {key}: "
        text = str(error)
        self.assertTrue(text.startswith(prefix), text)
        self.assertRegex(text[len(prefix):], pattern)
        self.assertNotIn("\n", text)


class ConfigErrorTests(SynchronousTestCase):
    """
    Tests for L{ConfigError}.
    """

    def test_keyFormat(self):
        """
        With a section and a key the message is C{FILE: [SECTION] KEY: PROBLEM}.
        """
        self.assertEqual(
            str(ConfigError("bad", "a.ini", "smtp", "listen")),
            "a.ini: [smtp] listen: bad",
        )

    def test_sectionFormat(self):
        """
        With only a section the message is C{FILE: [SECTION]: PROBLEM}.
        """
        self.assertEqual(str(ConfigError("bad", "a.ini", "smtp")), "a.ini: [smtp]: bad")

    def test_fileFormat(self):
        """
        Without a section the message is C{FILE: PROBLEM}.
        """
        self.assertEqual(str(ConfigError("bad", "a.ini")), "a.ini: bad")

    def test_oneLine(self):
        """
        Line breaks in a problem never make the message longer than one line.
        """
        self.assertEqual(str(ConfigError("two\nlines", "a.ini")), "a.ini: two lines")


class DefaultsTests(SynchronousTestCase):
    """
    Tests for the defaults.
    """

    def test_emptyText(self):
        """
        Empty text gives every default of the contract.
        """
        config = defaultConfig()
        self.assertEqual(config.relay.data_dir, "var")
        self.assertEqual(config.relay.node_id, 0)
        self.assertTrue(isHostname(config.relay.hostname))
        self.assertEqual(config.relay.store, "sqlite")
        self.assertEqual(config.smtp.listen, "tcp:2525:interface=127.0.0.1")
        self.assertEqual(
            config.smtp.allowed_clients,
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )
        self.assertIsNone(config.smtp.auth_file)
        self.assertIsNone(config.smtp.tls_certificate)
        self.assertIsNone(config.smtp.tls_key)
        self.assertEqual(config.smtp.max_connections, 1000)
        self.assertEqual(config.smtp.max_connections_per_client, 100)
        self.assertEqual(config.smtp.max_message_size, 25 * 1024 * 1024)
        self.assertEqual(config.smtp.max_recipients, 1000)
        self.assertEqual(config.smtp.max_line_length, 998)
        self.assertEqual(config.smtp.command_timeout, 300)
        self.assertEqual(config.smtp.data_timeout, 600)
        self.assertIsNone(config.delivery.smarthost)
        self.assertEqual(config.delivery.nameservers, ())
        self.assertEqual(config.delivery.mx_port, 25)
        self.assertEqual(config.delivery.max_connections, 50)
        self.assertFalse(config.delivery.hold)
        self.assertEqual(
            config.delivery.retry, RetrySchedule.parse("5m, 10m, 20m, 40m, 1h*4, 2h*...")
        )
        self.assertEqual(config.delivery.max_age, 3 * 86400)
        self.assertIsNone(config.delivery.bind_address)
        self.assertEqual(config.delivery.connect_timeout, 30)
        self.assertEqual(config.delivery.timeout, 300)
        self.assertEqual(config.delivery.messages_per_connection, 100)
        self.assertEqual(config.delivery.max_connections_per_domain, 20)
        self.assertEqual(config.delivery.idle_timeout, 30)
        self.assertEqual(config.delivery.retry_jitter, 0.1)
        self.assertEqual(config.delivery.tls, "opportunistic")
        self.assertIsNone(config.delivery.tls_ca_certificates)
        self.assertEqual(
            [p.pattern for p in config.delivery.throttle_patterns],
            list(DEFAULT_THROTTLE_PATTERNS),
        )
        self.assertTrue(all(p.flags & re.IGNORECASE for p in config.delivery.throttle_patterns))
        self.assertEqual(config.delivery.throttle_cooldown, 300)
        self.assertEqual(config.delivery.shutdown_timeout, 30)
        self.assertEqual(
            config.delivery.rewrap_workers, min(4, max(1, (os.cpu_count() or 1) - 1))
        )
        self.assertEqual(dict(config.domains), {})
        self.assertEqual(dict(config.providers), {})
        self.assertEqual(config.relay.secret, ())
        self.assertEqual(config.feedback.listen, "tcp:2526:interface=127.0.0.1")
        self.assertIsNone(config.feedback.bounce_domain)
        self.assertEqual(config.feedback.verp_prefix, "bounce")
        self.assertEqual(config.tracking.base_url, "http://127.0.0.1:8080")
        self.assertFalse(config.tracking.opens)
        self.assertFalse(config.tracking.clicks)
        self.assertTrue(config.tracking.unsubscribe)
        self.assertEqual(config.web.listen, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(dict(config.dkim), {})

    def test_attrsDefaultsAgree(self):
        """
        Building the attrs classes directly gives the same defaults as parsing.
        """
        self.assertEqual(Config(), defaultConfig())

    def test_frozen(self):
        """
        Configuration objects cannot be changed after parsing.
        """
        config = defaultConfig()
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config.smtp, "listen", "x")

    def test_hashable(self):
        """
        A configuration, named sections included, can be hashed.
        """
        config = parseConfig(
            "[domain:example.com]\nrate = 1/s\n[provider:p]\nmx_suffixes = p.example\n"
        )
        self.assertIsInstance(hash(config), int)
        self.assertEqual(hash(defaultConfig()), hash(Config()))

    def test_emptySections(self):
        """
        Empty known sections leave every key at its default.
        """
        self.assertEqual(parseConfig("[smartrelay]\n[smtp]\n[delivery]\n"), defaultConfig())


class ExampleFileTests(SynchronousTestCase):
    """
    Tests for C{etc/smartrelay.ini}.
    """

    def test_loads(self):
        """
        The example file loads, and the values it sets are the defaults.
        """
        self.assertEqual(loadConfig(EXAMPLE), defaultConfig())

    def test_documentsEveryKey(self):
        """
        Every section and every key appears in the example, set or commented out.
        """
        with open(EXAMPLE, encoding="utf-8") as f:
            text = f.read()
        for section, (_, sectionClass) in SECTIONS.items():
            match = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
            self.assertIsNotNone(match, section)
            for key in sectionKeys(sectionClass):
                self.assertRegex(match.group(1), rf"(?m)^#?{key} =", f"[{section}] {key}")

    def test_documentsEveryNamedSection(self):
        """
        Every kind of named section appears in the example, with every key,
        commented out.
        """
        with open(EXAMPLE, encoding="utf-8") as f:
            text = f.read()
        for prefix, (_, sectionClass) in NAMED_SECTIONS.items():
            match = re.search(
                rf"^#\[{prefix}:[^\]\n]+\]\n(.*?)(?=^#?\[|^$|\Z)", text, re.M | re.S
            )
            self.assertIsNotNone(match, prefix)
            for key in sectionKeys(sectionClass):
                self.assertRegex(match.group(1), rf"(?m)^#{key} =", f"[{prefix}:...] {key}")

    def test_uncommented(self):
        """
        With its commented-out settings switched on (except the ones naming
        files, which do not exist), the example still parses, and has an
        example of each kind of named section.
        """
        with open(EXAMPLE, encoding="utf-8") as f:
            text = f.read()
        files = {"auth_file", "users_file", "tls_certificate", "tls_key", "tls_ca_certificates"}

        def uncomment(match):
            key = match.group(1).split("=")[0].strip()
            return match.group(0) if key in files else match.group(1)

        text = re.sub(r"(?m)^#(\[[^\]\n]+\]|[a-z0-9_]+ = .*)$", uncomment, text)
        # The DKIM key files are required, so they are made rather than
        # skipped.
        rsaKey = _writeKey(self, rsa.generate_private_key(65537, 1024))
        edKey = _writeKey(self, ed25519.Ed25519PrivateKey.generate())
        text = re.sub(r"(?m)^key = .*$", lambda m: f"key = {rsaKey}", text)
        text = re.sub(r"(?m)^ed25519_key = .*$", lambda m: f"ed25519_key = {edKey}", text)
        config = parseConfig(text, EXAMPLE)
        self.assertEqual(len(config.relay.secret), 1)
        self.assertEqual(config.feedback.bounce_domain, "bounces.example.com")
        self.assertEqual(
            config.dkim["example.com"],
            DKIMConfig(
                name="example.com", selector="s2024", key=rsaKey, algorithm="both",
                ed25519_selector="s2024e", ed25519_key=edKey,
            ),
        )
        self.assertEqual(config.relay.hostname, "mail.example.com")
        self.assertEqual(config.delivery.smarthost, "tcp:host=smtp.example.com:port=587")
        self.assertEqual(
            config.domains["example.com"],
            DomainConfig(
                name="example.com",
                max_connections=5,
                rate=Rate(100, 60),
                route="tcp:host=mx.internal.example:port=25",
                tls="required",
                messages_per_connection=50,
            ),
        )
        google = config.providers["google"]
        self.assertEqual(google.mx_suffixes, ("google.com", "googlemail.com"))
        self.assertEqual(google.rate, Rate(3000, 60))
        self.assertEqual(
            len(config.domains) + len(config.providers) + len(config.dkim),
            len(NAMED_SECTIONS),
        )


class SyntaxTests(SynchronousTestCase):
    """
    Tests for INI syntax problems, unknown names and files.
    """

    def assertProblem(self, text, expected):
        """
        Parsing C{text} fails with exactly the message C{expected}.
        """
        error = self.assertRaises(ConfigError, parseConfig, text, "etc/x.ini")
        self.assertEqual(str(error), expected)

    def test_unknownSection(self):
        """
        An unknown section is an error, with a suggestion for a near miss.
        """
        self.assertProblem(
            "[smpt]\n", "etc/x.ini: [smpt]: unknown section (did you mean 'smtp'?)"
        )
        self.assertProblem(
            "[SMTP]\n", "etc/x.ini: [SMTP]: unknown section (did you mean 'smtp'?)"
        )
        self.assertProblem("[zzzzzzz]\n", "etc/x.ini: [zzzzzzz]: unknown section")

    def test_defaultSectionIsUnknown(self):
        """
        C{[DEFAULT]} is not special: it is an unknown section.
        """
        self.assertProblem("[DEFAULT]\nlisten = x\n", "etc/x.ini: [DEFAULT]: unknown section")

    def test_unknownKey(self):
        """
        An unknown key is an error, with a suggestion for a near miss.
        """
        self.assertProblem(
            "[smtp]\nmax_conections = 5\n",
            "etc/x.ini: [smtp] max_conections: unknown key 'max_conections' "
            "(did you mean 'max_connections'?)",
        )
        self.assertProblem(
            "[delivery]\nfrobnicate = 5\n",
            "etc/x.ini: [delivery] frobnicate: unknown key 'frobnicate'",
        )

    def test_keyOfAnotherSection(self):
        """
        A key that belongs to another section is unknown where it is.
        """
        self.assertProblem(
            "[smartrelay]\nlisten = tcp:25\n",
            "etc/x.ini: [smartrelay] listen: unknown key 'listen'",
        )

    def test_keysIgnoreCase(self):
        """
        Keys are not case-sensitive.
        """
        self.assertEqual(parseConfig("[smtp]\nMax_Connections = 7\n").smtp.max_connections, 7)

    def test_duplicateKey(self):
        """
        A key set twice in a section is an error naming it and the line.
        """
        self.assertProblem(
            "[smtp]\nmax_connections = 1\nmax_connections = 2\n",
            "etc/x.ini: [smtp] max_connections: duplicate key (line 3)",
        )

    def test_duplicateSection(self):
        """
        A section given twice is an error naming it and the line.
        """
        self.assertProblem(
            "[smtp]\n\n[smtp]\n", "etc/x.ini: [smtp]: duplicate section (line 3)"
        )

    def test_keyBeforeSection(self):
        """
        A key before any section header is an error naming the line.
        """
        self.assertProblem(
            "listen = tcp:25\n",
            "etc/x.ini: line 1: 'listen = tcp:25' is outside any section "
            "(start the file with a [section] header)",
        )

    def test_lineWithoutValue(self):
        """
        A line that is not C{key = value} is an error naming the line.
        """
        self.assertProblem(
            "[smtp]\nlisten = tcp:25\nnonsense\n",
            "etc/x.ini: line 3: cannot parse 'nonsense'; expected 'key = value'",
        )
        self.assertProblem(
            "[smtp]\nnonsense\nmore nonsense\n",
            "etc/x.ini: line 2: cannot parse 'nonsense'; expected 'key = value' "
            "(and 1 more bad line)",
        )

    def test_noInterpolation(self):
        """
        C{%} in a value is taken literally.
        """
        config = parseConfig("[delivery]\nsmarthost = tcp:host=h%(x)s:port=25\n")
        self.assertEqual(config.delivery.smarthost, "tcp:host=h%(x)s:port=25")

    def test_missingFile(self):
        """
        A missing file is a one-line error naming it.
        """
        path = self.mktemp()
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")

    def test_directory(self):
        """
        A directory instead of a file is a one-line error naming it.
        """
        path = self.mktemp()
        os.mkdir(path)
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: cannot read: Is a directory")

    def test_notUTF8(self):
        """
        A file that is not UTF-8 is a one-line error naming the line.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"[smtp]\nlisten = \xff\n")
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(str(error), f"{path}: line 2: not valid UTF-8")

    def test_loadNamesFile(self):
        """
        Errors from L{loadConfig} name the file it read.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[smtp]\nmax_recipients = none\n")
        error = self.assertRaises(ConfigError, loadConfig, path)
        self.assertEqual(
            str(error), f"{path}: [smtp] max_recipients: expected a positive integer, got 'none'"
        )

    def test_loadGood(self):
        """
        L{loadConfig} returns what L{parseConfig} makes of the file's text.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[smartrelay]\nnode_id = 7F\n")
        self.assertEqual(loadConfig(path).relay.node_id, 0x7F)

    def test_comments(self):
        """
        Whole-line comments with C{#} or C{;} are ignored.
        """
        config = parseConfig("# a\n[smtp]\n; b\n#max_recipients = x\nmax_recipients = 3\n")
        self.assertEqual(config.smtp.max_recipients, 3)


class RelaySectionTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{[smartrelay]}.
    """

    def test_dataDir(self):
        """
        C{data_dir} is a path kept as written; empty is an error.
        """
        relay = self.parseKey("smartrelay", "data_dir", "/srv/relay")
        self.assertEqual(relay.data_dir, "/srv/relay")
        self.assertEqual(self.parseKey("smartrelay", "data_dir", "run/x").data_dir, "run/x")
        self.assertKeyError("smartrelay", "data_dir", "", "must not be empty")

    def test_nodeID(self):
        """
        C{node_id} is exactly two hex digits, either case.
        """
        self.assertEqual(self.parseKey("smartrelay", "node_id", "7F").node_id, 0x7F)
        self.assertEqual(self.parseKey("smartrelay", "node_id", "0a").node_id, 10)
        self.assertEqual(self.parseKey("smartrelay", "node_id", "00").node_id, 0)
        for bad in ["7", "100", "0x7F", "GG", "", "-1", "7F 7F"]:
            self.assertKeyError(
                "smartrelay", "node_id", bad,
                f"expected two hex digits such as 7F, got {bad!r}",
            )

    def test_hostname(self):
        """
        C{hostname} must be a valid DNS host name.
        """
        self.assertEqual(
            self.parseKey("smartrelay", "hostname", "mail.example.com").hostname,
            "mail.example.com",
        )
        self.assertEqual(self.parseKey("smartrelay", "hostname", "relay-1").hostname, "relay-1")
        for bad in ["", "mail_x.example.com", "-mail.example.com", "mail..example.com",
                    "a" * 64 + ".com", "mail.example.com.", "[127.0.0.1]", "m\u00e4il.de"]:
            self.assertKeyError(
                "smartrelay", "hostname", bad,
                f"expected a host name such as mail.example.com, got {bad!r}",
            )

    def test_store(self):
        """
        C{store} is C{sqlite} or a Redis URL; a bad URL is one line saying
        what is wrong with it.
        """
        self.assertEqual(self.parseKey("smartrelay", "store", "sqlite").store, "sqlite")
        for url in ["redis://localhost:6379/0", "rediss://:pw@h:6380/2", "unix:///run/redis.sock?db=1"]:
            self.assertEqual(self.parseKey("smartrelay", "store", url).store, url)
        self.assertKeyError(
            "smartrelay", "store", "redis://h:0/1",
            "Redis URL port must be 1 to 65535: 'redis://h:0/1'",
        )
        self.assertKeyError(
            "smartrelay", "store", "mysql", "expected 'sqlite' or a redis:// URL, got 'mysql'"
        )
        self.assertKeyError(
            "smartrelay", "store", "", "expected 'sqlite' or a redis:// URL, got ''"
        )

    def test_secret(self):
        """
        C{secret} is a comma-separated list of secrets of at least 16
        characters, in order; empty means none.  Errors do not show it.
        """
        self.assertEqual(self.parseKey("smartrelay", "secret", "").secret, ())
        self.assertEqual(
            self.parseKey("smartrelay", "secret", "0123456789abcdef").secret,
            ("0123456789abcdef",),
        )
        self.assertEqual(
            self.parseKey(
                "smartrelay", "secret", "new-secret-of-enough-length, old secret with spaces!"
            ).secret,
            ("new-secret-of-enough-length", "old secret with spaces!"),
        )
        self.assertKeyError(
            "smartrelay", "secret", "short",
            "the secret is too short: use at least 16 characters",
        )
        error = self.assertKeyError(
            "smartrelay", "secret", "0123456789abcdef, 0123456789abcde",
            "secret number 2 is too short: use at least 16 characters",
        )
        self.assertNotIn("0123456789abcde", str(error))

    def test_secretNotInRepr(self):
        """
        The secrets are left out of the section's C{repr}.
        """
        relay = self.parseKey("smartrelay", "secret", "very-secret-text-here")
        self.assertNotIn("very-secret", repr(relay))


class SMTPSectionTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{[smtp]}.
    """

    def test_listen(self):
        """
        C{listen} is a server endpoint string that Twisted can parse.
        """
        for good in ["tcp:25", "tcp:2525:interface=0.0.0.0", "unix:/tmp/smartrelay.sock"]:
            self.assertEqual(self.parseKey("smtp", "listen", good).listen, good)
        self.assertKeyError(
            "smtp", "listen", "bogus:25",
            "invalid server endpoint 'bogus:25': Unknown endpoint type: 'bogus'",
        )
        self.assertKeyError(
            "smtp", "listen", "tcp:abc",
            "invalid server endpoint 'tcp:abc': invalid literal for int() with base 10: 'abc'",
        )
        self.assertKeyErrorMatches(
            "smtp", "listen", "tcp:25:colour=red",
            r"^invalid server endpoint 'tcp:25:colour=red': .*colour",
        )
        self.assertKeyError(
            "smtp", "listen", "", "expected a server endpoint string such as tcp:2525"
        )

    def test_allowedClients(self):
        """
        C{allowed_clients} is a list of networks or addresses; empty is nobody.
        """
        smtp = self.parseKey("smtp", "allowed_clients", "10.0.0.0/8, 192.0.2.7,2001:db8::/32")
        self.assertEqual(
            smtp.allowed_clients,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.0.2.7/32"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
        )
        self.assertEqual(self.parseKey("smtp", "allowed_clients", "").allowed_clients, ())
        self.assertKeyError(
            "smtp", "allowed_clients", "10.0.0.1/8",
            "'10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)",
        )
        for bad in ["localhost", "10.0.0.0/33", "300.1.1.1"]:
            self.assertKeyError(
                "smtp", "allowed_clients", f"127.0.0.1, {bad}",
                f"expected an IP address or network such as 10.0.0.0/8, got {bad!r}",
            )

    def test_allowedClientsMultiline(self):
        """
        List items may also be separated by line breaks (continuation lines).
        """
        smtp = parseConfig("[smtp]\nallowed_clients =\n  10.0.0.0/8\n  ::1\n").smtp
        self.assertEqual(
            smtp.allowed_clients,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )

    def test_authFile(self):
        """
        C{auth_file} must name a valid password file.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"# users\napp:{hashPassword('pw', ln=1)}\n")
        self.assertEqual(self.parseKey("smtp", "auth_file", path).auth_file, path)
        self.assertIsNone(self.parseKey("smtp", "auth_file", "").auth_file)

    def test_authFileMissing(self):
        """
        A missing C{auth_file} is an error naming the key and the file.
        """
        path = self.mktemp()
        self.assertKeyError(
            "smtp", "auth_file", path, f"{path}: cannot read: No such file or directory"
        )

    def test_authFileBad(self):
        """
        A password file with a bad line is an error naming the key, file and line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# users\n\napp:hunter2\n")
        self.assertKeyError(
            "smtp", "auth_file", path,
            f"{path}:3: user 'app': this looks like a plain-text password; "
            "store a hash made with 'smartrelay passwd' instead",
        )

    def writeTLS(self, certificate, key):
        """
        Write PEM files; return their paths.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in zip(paths, [certificate, key]):
            with open(path, "wb") as f:
                f.write(data)
        return paths

    def parseTLS(self, certificate, key):
        """
        Parse a C{[smtp]} section with these two TLS keys.
        """
        return parseConfig(
            f"[smtp]\ntls_certificate = {certificate}\ntls_key = {key}\n", "etc/x.ini"
        ).smtp

    def assertTLSError(self, certificate, key, badKey, problem):
        """
        The TLS pair fails with C{problem} on C{badKey}.
        """
        error = self.assertRaises(ConfigError, self.parseTLS, certificate, key)
        self.assertEqual(str(error), f"etc/x.ini: [smtp] {badKey}: {problem}")

    def test_tlsGood(self):
        """
        A certificate and its own key are accepted, as paths.
        """
        certificatePath, keyPath = self.writeTLS(*_selfSigned())
        smtp = self.parseTLS(certificatePath, keyPath)
        self.assertEqual((smtp.tls_certificate, smtp.tls_key), (certificatePath, keyPath))

    def test_tlsOneFile(self):
        """
        Certificate and key may be the same PEM file.
        """
        certificate, key = _selfSigned()
        path, _ = self.writeTLS(certificate + key, b"")
        smtp = self.parseTLS(path, path)
        self.assertEqual((smtp.tls_certificate, smtp.tls_key), (path, path))

    def test_tlsBothOrNeither(self):
        """
        Setting only one of C{tls_certificate} and C{tls_key} is an error.
        """
        certificatePath, keyPath = self.writeTLS(*_selfSigned())
        error = self.assertRaises(
            ConfigError, parseConfig, f"[smtp]\ntls_certificate = {certificatePath}\n", "etc/x.ini"
        )
        self.assertEqual(
            str(error), "etc/x.ini: [smtp] tls_key: required when tls_certificate is set"
        )
        error = self.assertRaises(
            ConfigError, parseConfig, f"[smtp]\ntls_key = {keyPath}\n", "etc/x.ini"
        )
        self.assertEqual(
            str(error), "etc/x.ini: [smtp] tls_certificate: required when tls_key is set"
        )

    def test_tlsMissingFiles(self):
        """
        TLS files that do not exist are errors naming the key.
        """
        certificatePath, keyPath = self.writeTLS(*_selfSigned())
        missing = self.mktemp()
        self.assertTLSError(
            missing, keyPath, "tls_certificate",
            f"cannot read {missing!r}: No such file or directory",
        )
        self.assertTLSError(
            certificatePath, missing, "tls_key",
            f"cannot read {missing!r}: No such file or directory",
        )

    def test_tlsNotPEM(self):
        """
        Files that hold no PEM certificate or key are errors naming the key.
        """
        certificate, key = _selfSigned()
        certificatePath, keyPath = self.writeTLS(key, certificate)
        self.assertTLSError(
            certificatePath, keyPath, "tls_certificate",
            f"{certificatePath!r} holds no PEM certificate",
        )
        certificatePath, keyPath = self.writeTLS(certificate, certificate)
        self.assertTLSError(
            certificatePath, keyPath, "tls_key", f"{keyPath!r} holds no PEM private key"
        )

    def test_tlsCorrupt(self):
        """
        PEM blocks with bad contents are errors naming the key.
        """
        certificate, key = _selfSigned()
        badCertificate = certificate.replace(certificate[40:60], b"A" * 20)
        certificatePath, keyPath = self.writeTLS(badCertificate, key)
        error = self.assertRaises(ConfigError, self.parseTLS, certificatePath, keyPath)
        self.assertTrue(
            str(error).startswith(
                f"etc/x.ini: [smtp] tls_certificate: {certificatePath!r} "
                "holds a bad PEM certificate"
            ),
            str(error),
        )
        badKey = key.replace(key[40:60], b"A" * 20)
        certificatePath, keyPath = self.writeTLS(certificate, badKey)
        error = self.assertRaises(ConfigError, self.parseTLS, certificatePath, keyPath)
        self.assertTrue(
            str(error).startswith(
                f"etc/x.ini: [smtp] tls_key: {keyPath!r} holds a bad PEM private key"
            ),
            str(error),
        )
        self.assertNotIn("\n", str(error))

    def test_tlsEncryptedKey(self):
        """
        An encrypted private key is refused.
        """
        certificate, _ = _selfSigned()
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
        certificatePath, keyPath = self.writeTLS(certificate, key)
        self.assertTLSError(
            certificatePath, keyPath, "tls_key",
            f"{keyPath!r} holds an encrypted key; smartrelay needs it unencrypted",
        )

    def test_tlsMismatch(self):
        """
        A key that does not belong to the certificate is refused.
        """
        certificate, _ = _selfSigned()
        _, otherKey = _selfSigned()
        certificatePath, keyPath = self.writeTLS(certificate, otherKey)
        self.assertTLSError(
            certificatePath, keyPath, "tls_key",
            f"the key in {keyPath!r} does not match the certificate in {certificatePath!r}",
        )

    def test_positiveIntegers(self):
        """
        The counting keys take positive integers only.
        """
        for key in ["max_connections", "max_connections_per_client", "max_recipients"]:
            self.assertEqual(getattr(self.parseKey("smtp", key, "17"), key), 17)
            for bad in ["abc", "0", "-1", "1.5", "", "1e3", "10 x"]:
                self.assertKeyError(
                    "smtp", key, bad, f"expected a positive integer, got {bad!r}"
                )

    def test_maxMessageSize(self):
        """
        C{max_message_size} uses the size syntax.
        """
        smtp = self.parseKey("smtp", "max_message_size", "10M")
        self.assertEqual(smtp.max_message_size, 10 << 20)
        self.assertEqual(self.parseKey("smtp", "max_message_size", "1000").max_message_size, 1000)
        for bad in ["ten", "10X", "-1M", "0", "1.5M"]:
            self.assertKeyErrorMatches(
                "smtp", "max_message_size", bad, r"^expected a size such as 25M, 512K, 1G or 1000"
            )

    def test_maxLineLength(self):
        """
        C{max_line_length} is an integer of at least 998 (RFC 5321).
        """
        self.assertEqual(self.parseKey("smtp", "max_line_length", "2000").max_line_length, 2000)
        self.assertKeyError(
            "smtp", "max_line_length", "100",
            "must be at least 998 (RFC 5321 section 4.5.3.1.6), got 100",
        )
        self.assertKeyError(
            "smtp", "max_line_length", "long", "expected a positive integer, got 'long'"
        )

    def test_timeouts(self):
        """
        C{command_timeout} and C{data_timeout} use the duration syntax.
        """
        for key in ["command_timeout", "data_timeout"]:
            self.assertEqual(getattr(self.parseKey("smtp", key, "2m"), key), 120)
            self.assertEqual(getattr(self.parseKey("smtp", key, "45"), key), 45)
            for bad in ["soon", "-5m", "0", "5y", ""]:
                self.assertKeyErrorMatches(
                    "smtp", key, bad, r"^expected a duration such as 30s, 5m, 2h, 3d or 1w"
                )


class DeliverySectionTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{[delivery]}.
    """

    def test_smarthost(self):
        """
        C{smarthost} is a client endpoint string; empty means direct to MX.
        """
        for good in ["tcp:host=smtp.example.com:port=587", "tcp:127.0.0.1:25"]:
            self.assertEqual(self.parseKey("delivery", "smarthost", good).smarthost, good)
        self.assertIsNone(self.parseKey("delivery", "smarthost", "").smarthost)
        self.assertKeyError(
            "delivery", "smarthost", "smtp.example.com:587",
            "invalid client endpoint 'smtp.example.com:587': Unknown endpoint type: "
            "'smtp.example.com' (expected for example tcp:host=smtp.example.com:port=587)",
        )
        self.assertKeyErrorMatches(
            "delivery", "smarthost", "tcp:host=a:port=x",
            r"^invalid client endpoint 'tcp:host=a:port=x': ",
        )
        self.assertKeyErrorMatches(
            "delivery", "smarthost", "tcp:host=a", r"^invalid client endpoint 'tcp:host=a': "
        )

    def test_nameservers(self):
        """
        C{nameservers} is a list of IP addresses with optional ports.
        """
        delivery = self.parseKey(
            "delivery", "nameservers", "127.0.0.1:10053, 192.0.2.1, ::1, [2001:db8::1]:5353, [::2]"
        )
        self.assertEqual(
            delivery.nameservers,
            (("127.0.0.1", 10053), ("192.0.2.1", 53), ("::1", 53),
             ("2001:db8::1", 5353), ("::2", 53)),
        )
        for bad in ["ns.example.com", "ns.example.com:53", "[::1", "1.2.3.4:53:53"]:
            self.assertKeyError(
                "delivery", "nameservers", bad,
                "expected an IP address with an optional port such as "
                f"127.0.0.1:10053 or [::1]:53, got {bad!r}",
            )
        for bad in ["127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:dns", "[::1]:x", "1.2.3.4:"]:
            port = bad.rsplit(":", 1)[1]
            self.assertKeyError(
                "delivery", "nameservers", bad,
                f"expected a port number from 1 to 65535, got {port!r}",
            )

    def test_mxPort(self):
        """
        C{mx_port} is a port number.
        """
        self.assertEqual(self.parseKey("delivery", "mx_port", "2525").mx_port, 2525)
        for bad in ["0", "65536", "smtp", ""]:
            self.assertKeyError(
                "delivery", "mx_port", bad, f"expected a port number from 1 to 65535, got {bad!r}"
            )

    def test_hold(self):
        """
        [delivery] hold is a boolean; anything else is a one-line error.
        """
        self.assertTrue(self.parseKey("delivery", "hold", "on").hold)
        self.assertFalse(self.parseKey("delivery", "hold", "no").hold)
        error = self.assertRaises(ConfigError, parseConfig, "[delivery]\nhold = maybe\n", "etc/x.ini")
        self.assertTrue(str(error).startswith("etc/x.ini: [delivery] hold: "), str(error))
        self.assertNotIn("\n", str(error))

    def test_retention(self):
        """
        [store] retention is a duration, 30 days by default.
        """
        self.assertEqual(parseConfig("").store.retention, 30 * 86400)
        self.assertEqual(self.parseKey("store", "retention", "7d").retention, 7 * 86400)
        error = self.assertRaises(ConfigError, parseConfig, "[store]\nretention = soon\n", "etc/x.ini")
        self.assertTrue(str(error).startswith("etc/x.ini: [store] retention: "), str(error))

    def test_positiveIntegers(self):
        """
        The counting keys take positive integers only.
        """
        for key in ["max_connections"]:
            self.assertEqual(getattr(self.parseKey("delivery", key, "3"), key), 3)
            for bad in ["three", "0", "-3", ""]:
                self.assertKeyError(
                    "delivery", key, bad, f"expected a positive integer, got {bad!r}"
                )

    def test_retry(self):
        """
        C{retry} uses the retry schedule syntax.
        """
        self.assertEqual(
            self.parseKey("delivery", "retry", "1m, 1h*...").retry,
            RetrySchedule(((60, 1), (3600, None))),
        )
        self.assertKeyError(
            "delivery", "retry", "5m*..., 1h", "'5m*...' repeats forever, so nothing may follow it"
        )
        self.assertKeyError(
            "delivery", "retry", "5m, 1h*0",
            "expected a positive count or '...' after '*', got '1h*0'",
        )
        self.assertKeyError(
            "delivery", "retry", "",
            "expected a list of durations such as '5m, 10m, 1h*4, 2h*...', got ''",
        )
        self.assertKeyError(
            "delivery", "retry", "5m, soon",
            "expected a duration such as 30s, 5m, 2h, 3d or 1w, got 'soon'",
        )

    def test_durations(self):
        """
        C{max_age}, C{connect_timeout} and C{timeout} use the duration syntax.
        """
        for key in ["max_age", "connect_timeout", "timeout"]:
            self.assertEqual(getattr(self.parseKey("delivery", key, "1w"), key), 604800)
            for bad in ["never", "-1d", "0s", "1 day"]:
                self.assertKeyErrorMatches(
                    "delivery", key, bad, r"^expected a duration such as 30s, 5m, 2h, 3d or 1w"
                )

    def test_bindAddress(self):
        """
        C{bind_address} is an IP address; empty means not set.
        """
        delivery = self.parseKey("delivery", "bind_address", "192.0.2.10")
        self.assertEqual(delivery.bind_address, "192.0.2.10")
        delivery = self.parseKey("delivery", "bind_address", "2001:DB8::1")
        self.assertEqual(delivery.bind_address, "2001:db8::1")
        self.assertIsNone(self.parseKey("delivery", "bind_address", "").bind_address)
        for bad in ["eth0", "192.0.2.0/24", "192.0.2.10:25"]:
            self.assertKeyError(
                "delivery", "bind_address", bad, f"expected an IP address, got {bad!r}"
            )


class DeliveryEngineKeysTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for the C{[delivery]} keys of the outbound delivery engine.
    """

    def test_countingKeys(self):
        """
        C{messages_per_connection} and C{max_connections_per_domain} take
        positive integers only.
        """
        for key in ["messages_per_connection", "max_connections_per_domain"]:
            self.assertEqual(getattr(self.parseKey("delivery", key, "7"), key), 7)
            for bad in ["seven", "0", "-3", "", "1.5"]:
                self.assertKeyError(
                    "delivery", key, bad, f"expected a positive integer, got {bad!r}"
                )

    def test_rewrapWorkers(self):
        """
        C{rewrap_workers} is C{auto}, 0 (threads) or a number of processes
        up to 64.
        """
        auto = min(4, max(1, (os.cpu_count() or 1) - 1))
        for text, value in [("auto", auto), (" AUTO ", auto), ("0", 0), ("3", 3), ("64", 64)]:
            self.assertEqual(self.parseKey("delivery", "rewrap_workers", text).rewrap_workers, value)
        for bad in ["65", "-1", "two", "", "1.5"]:
            self.assertKeyError(
                "delivery", "rewrap_workers", bad,
                f"expected auto or a number of processes from 0 to 64, got {bad.strip().lower()!r}",
            )

    def test_durations(self):
        """
        C{idle_timeout}, C{throttle_cooldown} and C{shutdown_timeout} use the
        duration syntax and must be above zero.
        """
        for key in ["idle_timeout", "throttle_cooldown", "shutdown_timeout"]:
            self.assertEqual(getattr(self.parseKey("delivery", key, "90"), key), 90)
            self.assertEqual(getattr(self.parseKey("delivery", key, "2m"), key), 120)
            self.assertKeyError(
                "delivery", key, "soon",
                "expected a duration such as 30s, 5m, 2h, 3d or 1w, got 'soon'",
            )
            self.assertKeyError(
                "delivery", key, "0s",
                "expected a duration such as 30s, 5m, 2h, 3d or 1w (greater than zero), "
                "got '0s'",
            )

    def test_retryJitter(self):
        """
        C{retry_jitter} is a percentage or a fraction from 0 to 1.
        """
        for text, value in [("10%", 0.1), ("0.1", 0.1), ("0%", 0.0), ("0", 0.0),
                            ("100%", 1.0), ("1", 1.0), ("12.5 %", 0.125), (".25", 0.25)]:
            self.assertEqual(self.parseKey("delivery", "retry_jitter", text).retry_jitter, value)
        for bad in ["abc", "", "101%", "1.5", "-10%", "10%%", "%", "1e-3"]:
            self.assertKeyError(
                "delivery", "retry_jitter", bad,
                f"expected a percentage between 0% and 100% such as '10%', got {bad!r}",
            )

    def test_tls(self):
        """
        C{tls} is opportunistic, required or verify, in any case, kept in
        lower case.
        """
        self.assertEqual(TLS_POLICIES, ("opportunistic", "required", "verify"))
        for text in ["opportunistic", "required", "verify", "Verify", " REQUIRED "]:
            self.assertEqual(
                self.parseKey("delivery", "tls", text).tls, text.strip().lower()
            )
        for bad in ["none", "", "on", "verified"]:
            self.assertKeyError(
                "delivery", "tls", bad,
                f"expected opportunistic, required or verify, got {bad!r}",
            )

    def writeFile(self, data):
        """
        Write C{data} to a new file; return its path.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_tlsCACertificates(self):
        """
        C{tls_ca_certificates} names a PEM file with at least one
        certificate; empty means the system's trust store.
        """
        first, _ = _selfSigned("ca-one.example")
        second, _ = _selfSigned("ca-two.example")
        path = self.writeFile(first + second)
        self.assertEqual(
            self.parseKey("delivery", "tls_ca_certificates", path).tls_ca_certificates, path
        )
        self.assertIsNone(
            self.parseKey("delivery", "tls_ca_certificates", "").tls_ca_certificates
        )

    def test_tlsCACertificatesBad(self):
        """
        A missing file, a file without a PEM certificate and a corrupt
        certificate are one-line errors naming the key and the file.
        """
        missing = self.mktemp()
        self.assertKeyError(
            "delivery", "tls_ca_certificates", missing,
            f"cannot read {missing!r}: No such file or directory",
        )
        certificate, key = _selfSigned()
        path = self.writeFile(key)
        self.assertKeyError(
            "delivery", "tls_ca_certificates", path, f"{path!r} holds no PEM certificate"
        )
        path = self.writeFile(certificate.replace(certificate[40:60], b"A" * 20))
        self.assertKeyErrorMatches(
            "delivery", "tls_ca_certificates", path,
            rf"^{re.escape(repr(path))} holds a bad PEM certificate",
        )

    def test_throttlePatterns(self):
        """
        C{throttle_patterns} is one case-insensitive regular expression per
        line.
        """
        delivery = parseConfig(
            "[delivery]\nthrottle_patterns =\n    slow(ly)? down\n  [0-9]+ per hour\n"
        ).delivery
        self.assertEqual(
            delivery.throttle_patterns,
            (re.compile("slow(ly)? down", re.I), re.compile("[0-9]+ per hour", re.I)),
        )
        self.assertTrue(delivery.throttle_patterns[0].search("421 SLOWLY DOWN please"))
        one = self.parseKey("delivery", "throttle_patterns", "a, b").throttle_patterns
        self.assertEqual([p.pattern for p in one], ["a, b"])

    def test_throttlePatternsEmpty(self):
        """
        An empty C{throttle_patterns} means none.
        """
        self.assertEqual(
            self.parseKey("delivery", "throttle_patterns", "").throttle_patterns, ()
        )

    def test_throttlePatternsBad(self):
        """
        A bad regular expression is a one-line error quoting it.
        """
        error = self.assertRaises(
            ConfigError, parseConfig,
            "[delivery]\nthrottle_patterns =\n  ok\n  too (many\n", "etc/x.ini",
        )
        self.assertEqual(
            str(error),
            "etc/x.ini: [delivery] throttle_patterns: bad regular expression 'too (many': "
            "missing ), unterminated subpattern at position 4",
        )
        self.assertKeyError(
            "delivery", "throttle_patterns", "[TS01",
            "bad regular expression '[TS01': unterminated character set at position 0",
        )

    def test_defaultThrottlePatterns(self):
        """
        The default patterns recognise the big providers' "slow down"
        replies, and not ordinary temporary failures.
        """
        patterns = defaultConfig().delivery.throttle_patterns

        def throttles(text):
            return any(p.search(text) for p in patterns)

        for reply in [
            "4.7.28 [192.0.2.1] Our system has detected an unusual rate of "
            "unsolicited mail originating from your IP address.",
            "4.7.28 Gmail has detected this message exceeded its quota for sending "
            "messages with the same Message-ID",
            "4.2.1 The user you are trying to contact is receiving mail at a rate "
            "that prevents additional messages from being delivered. Please resend "
            "your message at a later time. Rate limited.",
            "4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)",
            "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited "
            "due to IP reputation.",
            "[TS01] Messages from 192.0.2.1 temporarily deferred due to unexpected "
            "volume or user complaints - 4.16.55.1",
            "[TS03] All messages from 192.0.2.1 will be permanently deferred",
            "TSS04 Messages from 192.0.2.1 temporarily deferred",
            "4.7.0 Too many connections from your host",
            "Too many concurrent SMTP connections; please try again later.",
            "4.7.1 Too many messages for this session",
            "Rate-limit exceeded",
            "4.3.2 Throttling in effect",
            "You have exceeded the allowed sending rate",
            "connection limit reached for 192.0.2.1",
        ]:
            self.assertTrue(throttles(reply), reply)
        for reply in ["4.2.2 Mailbox full", "4.4.1 Connection timed out",
                      "4.3.0 Temporary system problem", "4.2.0 Greylisted"]:
            self.assertFalse(throttles(reply), reply)

    def test_newKeysIndependent(self):
        """
        Setting one new key leaves the others at their defaults.
        """
        delivery = self.parseKey("delivery", "idle_timeout", "1m")
        self.assertEqual(
            attrs.evolve(delivery, idle_timeout=30.0), defaultConfig().delivery
        )


class FeedbackSectionTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{[feedback]}.
    """

    def test_listen(self):
        """
        C{listen} is a server endpoint string, checked like C{[smtp] listen}.
        """
        for good in ["tcp:2526", "tcp:25:interface=0.0.0.0", "unix:/tmp/feedback.sock"]:
            self.assertEqual(self.parseKey("feedback", "listen", good).listen, good)
        self.assertKeyError(
            "feedback", "listen", "bogus:25",
            "invalid server endpoint 'bogus:25': Unknown endpoint type: 'bogus'",
        )
        self.assertKeyError(
            "feedback", "listen", "", "expected a server endpoint string such as tcp:2525"
        )

    def test_bounceDomain(self):
        """
        C{bounce_domain} is a domain name, lower-cased, without a trailing
        dot; empty means not set.
        """
        self.assertEqual(
            self.parseKey("feedback", "bounce_domain", "Bounces.Example.COM.").bounce_domain,
            "bounces.example.com",
        )
        self.assertIsNone(self.parseKey("feedback", "bounce_domain", "").bounce_domain)
        for bad in ["bad_name", "a..b", "-x.example", "user@example.com"]:
            self.assertKeyError(
                "feedback", "bounce_domain", bad, f"{bad!r} is not a valid domain name"
            )

    def test_verpPrefix(self):
        """
        C{verp_prefix} is 1 to 20 letters, digits, C{.}, C{_} or C{-}, and
        never contains C{+}.
        """
        for good in ["bounce", "b", "Return.Path_2-x", "x" * 20]:
            self.assertEqual(self.parseKey("feedback", "verp_prefix", good).verp_prefix, good)
        self.assertKeyError(
            "feedback", "verp_prefix", "bounce+x",
            "must not contain '+' (it separates the token), got 'bounce+x'",
        )
        for bad in ["", "x" * 21, "a b", "bounce@", "bö"]:
            self.assertKeyError(
                "feedback", "verp_prefix", bad,
                f"expected 1 to 20 letters, digits, '.', '_' or '-', got {bad!r}",
            )

    def test_fblAddresses(self):
        """
        C{fbl_addresses} is a comma-separated list of addresses, kept
        lower-case; empty by default; a bad item is named.
        """
        self.assertEqual(defaultConfig().feedback.fbl_addresses, ())
        self.assertEqual(
            self.parseKey("feedback", "fbl_addresses", "FBL@Example.COM, arf@x.org").fbl_addresses,
            ("fbl@example.com", "arf@x.org"),
        )
        for bad in ["fbl", "@example.com", "fbl@", "fbl@bad_domain", "a b@example.com"]:
            self.assertKeyError(
                "feedback", "fbl_addresses", "ok@example.com, " + bad,
                f"expected an address such as fbl@example.com, got {bad!r}",
            )

    def test_feedbackLimits(self):
        """
        The feedback listener's size and connection limits and the soft
        bounce escalation have their defaults and refuse bad values.
        """
        feedback = defaultConfig().feedback
        self.assertEqual(
            (
                feedback.max_message_size, feedback.max_connections,
                feedback.max_connections_per_client, feedback.soft_bounce_limit,
                feedback.soft_bounce_window,
            ),
            (10 * 1024 * 1024, 200, 20, 5, 30 * 86400.0),
        )
        self.assertEqual(self.parseKey("feedback", "soft_bounce_window", "2h").soft_bounce_window, 7200.0)
        self.assertEqual(self.parseKey("feedback", "max_message_size", "1M").max_message_size, 1 << 20)
        for key in ("soft_bounce_limit", "max_connections", "max_connections_per_client"):
            self.assertRaises(ConfigError, self.parseKey, "feedback", key, "0")
        self.assertRaises(ConfigError, self.parseKey, "feedback", "soft_bounce_window", "soon")


class TrackingSectionTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{[tracking]}.
    """

    def test_baseURL(self):
        """
        C{base_url} is an absolute http(s) URL; a trailing slash is dropped.
        """
        for text, expected in [
            ("https://t.example.com", "https://t.example.com"),
            ("https://t.example.com/", "https://t.example.com"),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("https://example.com/mail/track/", "https://example.com/mail/track"),
            ("https://[2001:db8::1]:8443", "https://[2001:db8::1]:8443"),
        ]:
            self.assertEqual(self.parseKey("tracking", "base_url", text).base_url, expected)

    def test_baseURLBad(self):
        """
        Anything but an absolute http(s) URL without a query, fragment or
        user is refused, with one line saying why.
        """
        for bad in ["", "t.example.com", "ftp://t.example.com", "https://", "/t", "http://h:99999"]:
            self.assertKeyError(
                "tracking", "base_url", bad,
                "expected an absolute http or https URL such as https://t.example.com, "
                f"got {bad!r}",
            )
        for bad in ["https://t.example.com/?a=1", "https://t.example.com/#x", "https://h/?"]:
            self.assertKeyError(
                "tracking", "base_url", bad, f"must not have a query or fragment, got {bad!r}"
            )
        self.assertKeyError(
            "tracking", "base_url", "https://u:p@t.example.com",
            "must not hold a user name or password, got 'https://u:p@t.example.com'",
        )
        self.assertKeyError(
            "tracking", "base_url", "https://bad_host.example",
            "'bad_host.example' is not a valid host name in 'https://bad_host.example'",
        )
        self.assertKeyError(
            "tracking", "base_url", "https://t.example.com/a b",
            "must be printable ASCII without spaces or backslashes (percent-encode the "
            "rest), got 'https://t.example.com/a b'",
        )

    def test_switches(self):
        """
        C{opens}, C{clicks} and C{unsubscribe} are booleans.
        """
        for key in ("opens", "clicks", "unsubscribe"):
            self.assertTrue(getattr(self.parseKey("tracking", key, "on"), key))
            self.assertFalse(getattr(self.parseKey("tracking", key, "off"), key))
            self.assertKeyError("tracking", key, "maybe", "expected on or off, got 'maybe'")


class WebSectionTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{[web]}.
    """

    def test_listen(self):
        """
        C{listen} is a server endpoint string.
        """
        for good in ["tcp:80", "tcp:8080:interface=0.0.0.0", "unix:/tmp/web.sock"]:
            self.assertEqual(self.parseKey("web", "listen", good).listen, good)
        self.assertKeyError(
            "web", "listen", "tcp:abc",
            "invalid server endpoint 'tcp:abc': invalid literal for int() with base 10: 'abc'",
        )
        self.assertKeyError(
            "web", "listen", "", "expected a server endpoint string such as tcp:2525"
        )

    def test_sections(self):
        """
        The new sections are registered with their Config fields.
        """
        self.assertEqual(SECTIONS["feedback"], ("feedback", FeedbackConfig))
        self.assertEqual(SECTIONS["tracking"], ("tracking", TrackingConfig))
        self.assertEqual(SECTIONS["web"], ("web", WebConfig))
        self.assertEqual(
            sectionKeys(FeedbackConfig),
            [
                "listen", "bounce_domain", "verp_prefix", "fbl_addresses",
                "max_message_size", "max_connections", "max_connections_per_client",
                "soft_bounce_limit", "soft_bounce_window",
            ],
        )
        self.assertEqual(
            sectionKeys(TrackingConfig), ["base_url", "opens", "clicks", "unsubscribe"]
        )
        self.assertEqual(
            sectionKeys(WebConfig)[:3], ["listen", "api_tokens", "trusted_proxies"]
        )

    def test_apiTokens(self):
        """
        C{api_tokens} is a comma-separated list of bearer tokens of at least
        24 characters without spaces; a shorter one is one line naming it,
        and the tokens are left out of the repr.
        """
        good = "a" * 24 + ", " + "0123456789abcdef" * 3
        web = self.parseKey("web", "api_tokens", good)
        self.assertEqual(web.api_tokens, ("a" * 24, "0123456789abcdef" * 3))
        self.assertNotIn("aaaaaaaa", repr(web))
        self.assertEqual(self.parseKey("web", "listen", "tcp:80").api_tokens, ())
        self.assertKeyError(
            "web", "api_tokens", "a" * 23,
            "the token is too short: use at least 24 characters"
            " (e.g. from: openssl rand -hex 24)",
        )
        self.assertKeyError(
            "web", "api_tokens", "a" * 24 + ",short",
            "token number 2 is too short: use at least 24 characters"
            " (e.g. from: openssl rand -hex 24)",
        )

    def test_trustedProxies(self):
        """
        C{trusted_proxies} is a list of networks; empty by default.
        """
        web = self.parseKey("web", "trusted_proxies", "10.0.0.0/8, ::1")
        self.assertEqual(
            [str(n) for n in web.trusted_proxies], ["10.0.0.0/8", "::1/128"]
        )
        self.assertEqual(self.parseKey("web", "listen", "tcp:80").trusted_proxies, ())
        self.assertKeyError(
            "web", "trusted_proxies", "10.0.0.1/8",
            "'10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)",
        )


#: A throw-away 512-bit RSA key (too small for DKIM; cryptography will not
#: make one).
RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEApOndGRrLNMDX65Qs
GLLSgIioXAZ++uA2bZvgvIGuW43MgadKWojTbCpDVof/RgkeeeuJlGkEYuH3HMRO
ccXWdQIDAQABAkAkTkgaqsdpybq/ZlN+7H9jRLKr79IssQfKgbKsTXBxPx/cDhqt
5fNsaTXWh8Gm9I/iYlgCCK8dHd/1lCXJeYABAiEA2EPnjrrL/GyUFP0/YFUURx3w
w1uFEN8kAft698GJeAECIQDDNp3mtGEwqp7e7zi4OwNXISygPrKs73YvREY6IOH+
dQIhAKJ8ooYCozDNA5WhkPR39/xW6oZdROUgQpWatRFhQEABAiEAvJFjkdkoEOSf
tmWKepu2rFGFU/18hwSBO0NOOxRMeYkCIQCFhkbkxZexfU9cvmURz44zQBrhVLT5
bRSJcZTwKT5XXw==
-----END PRIVATE KEY-----
"""


class DKIMSectionTests(SynchronousTestCase):
    """
    Tests for C{[dkim:DOMAIN]}.
    """

    def setUp(self):
        self.rsaKey = _writeKey(self, rsa.generate_private_key(65537, 1024))
        self.edKey = _writeKey(self, ed25519.Ed25519PrivateKey.generate())

    def parse(self, body, name="example.com"):
        """
        Parse a C{[dkim:NAME]} section with C{body}; return it.
        """
        return parseConfig(f"[dkim:{name}]\n{body}", "etc/x.ini").dkim[name.lower().rstrip(".")]

    def assertProblem(self, body, key, problem, name="example.com"):
        """
        Parsing a section with C{body} fails with exactly C{problem} about
        C{key}.
        """
        error = self.assertRaises(
            ConfigError, parseConfig, f"[dkim:{name}]\n{body}", "etc/x.ini"
        )
        self.assertEqual(str(error), f"etc/x.ini: [dkim:{name}] {key}: {problem}")
        self.assertEqual(error.key, key)
        return error

    def test_keys(self):
        """
        The section's keys, in order.
        """
        self.assertEqual(
            sectionKeys(DKIMConfig),
            ["selector", "key", "algorithm", "ed25519_selector", "ed25519_key"],
        )
        self.assertEqual(DKIM_ALGORITHMS, ("rsa-sha256", "ed25519-sha256", "both"))

    def test_rsa(self):
        """
        The default algorithm is C{rsa-sha256} with an RSA key.
        """
        dkim = self.parse(f"selector = s1\nkey = {self.rsaKey}\n")
        self.assertEqual(
            dkim,
            DKIMConfig(name="example.com", selector="s1", key=self.rsaKey,
                       algorithm="rsa-sha256"),
        )
        self.assertEqual(dkim.signingKeys(), [("rsa-sha256", "s1", self.rsaKey)])

    def test_ed25519(self):
        """
        C{ed25519-sha256} takes an Ed25519 key.
        """
        dkim = self.parse(
            f"selector = e.2024\nkey = {self.edKey}\nalgorithm = Ed25519-SHA256\n"
        )
        self.assertEqual(dkim.algorithm, "ed25519-sha256")
        self.assertEqual(dkim.signingKeys(), [("ed25519-sha256", "e.2024", self.edKey)])

    def test_both(self):
        """
        C{both} signs with the RSA key and the Ed25519 key, each with its
        selector.
        """
        dkim = self.parse(
            f"selector = r\nkey = {self.rsaKey}\nalgorithm = both\n"
            f"ed25519_selector = e\ned25519_key = {self.edKey}\n"
        )
        self.assertEqual(
            dkim.signingKeys(),
            [("rsa-sha256", "r", self.rsaKey), ("ed25519-sha256", "e", self.edKey)],
        )

    def test_bothNeedsEd25519(self):
        """
        C{both} needs C{ed25519_selector} and C{ed25519_key}.
        """
        base = f"selector = r\nkey = {self.rsaKey}\nalgorithm = both\n"
        self.assertProblem(
            base + f"ed25519_key = {self.edKey}\n", "ed25519_selector",
            "required when algorithm = both",
        )
        self.assertProblem(
            base + "ed25519_selector = e\n", "ed25519_key", "required when algorithm = both"
        )
        self.assertProblem(
            base + "ed25519_selector = e\ned25519_key = \n", "ed25519_key",
            "required when algorithm = both",
        )

    def test_ed25519KeysOnlyWithBoth(self):
        """
        C{ed25519_selector} and C{ed25519_key} are refused without C{both}.
        """
        self.assertProblem(
            f"selector = r\nkey = {self.rsaKey}\ned25519_selector = e\n",
            "ed25519_selector", "only used with algorithm = both, not rsa-sha256",
        )
        self.assertProblem(
            f"selector = r\nkey = {self.edKey}\nalgorithm = ed25519-sha256\n"
            f"ed25519_key = {self.edKey}\n",
            "ed25519_key", "only used with algorithm = both, not ed25519-sha256",
        )

    def test_required(self):
        """
        C{selector} and C{key} are required.
        """
        self.assertProblem(f"key = {self.rsaKey}\n", "selector", "required key missing")
        self.assertProblem("selector = s\n", "key", "required key missing")
        self.assertProblem("selector = s\nkey =\n", "key", "must not be empty")

    def test_badValues(self):
        """
        Bad selectors and algorithms are refused with one line.
        """
        for bad in ["", "s_1", "-s", "a..b"]:
            self.assertProblem(
                f"selector = {bad}\nkey = {self.rsaKey}\n", "selector",
                f"expected a DKIM selector (DNS labels such as mail or s2024.eu), got {bad!r}",
            )
        self.assertProblem(
            f"selector = s\nkey = {self.rsaKey}\nalgorithm = rsa-sha1\n", "algorithm",
            "expected rsa-sha256, ed25519-sha256 or both, got 'rsa-sha1'",
        )
        self.assertProblem(
            f"selector = s\nkey = {self.rsaKey}\nalgorithm = both\n"
            f"ed25519_selector = e_1\ned25519_key = {self.edKey}\n",
            "ed25519_selector",
            "expected a DKIM selector (DNS labels such as mail or s2024.eu), got 'e_1'",
        )

    def test_keyMismatch(self):
        """
        The key's type must fit the algorithm.
        """
        self.assertProblem(
            f"selector = s\nkey = {self.edKey}\n", "key",
            f"{self.edKey!r} holds an Ed25519 key, but rsa-sha256 needs an RSA key",
        )
        self.assertProblem(
            f"selector = s\nkey = {self.rsaKey}\nalgorithm = ed25519-sha256\n", "key",
            f"{self.rsaKey!r} holds an RSA key, but ed25519-sha256 needs an Ed25519 key",
        )
        self.assertProblem(
            f"selector = s\nkey = {self.edKey}\nalgorithm = both\n"
            f"ed25519_selector = e\ned25519_key = {self.edKey}\n", "key",
            f"{self.edKey!r} holds an Ed25519 key, but rsa-sha256 needs an RSA key",
        )
        self.assertProblem(
            f"selector = s\nkey = {self.rsaKey}\nalgorithm = both\n"
            f"ed25519_selector = e\ned25519_key = {self.rsaKey}\n", "ed25519_key",
            f"{self.rsaKey!r} holds an RSA key, but ed25519-sha256 needs an Ed25519 key",
        )
        ecKey = _writeKey(self, ec.generate_private_key(ec.SECP256R1()))
        self.assertProblem(
            f"selector = s\nkey = {ecKey}\n", "key",
            f"{ecKey!r} holds neither an RSA nor an Ed25519 key",
        )

    def test_smallRSA(self):
        """
        RSA keys under 1024 bits are refused.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(RSA_512)
        self.assertProblem(
            f"selector = s\nkey = {path}\n", "key",
            f"{path!r} holds a 512-bit RSA key; use at least 1024 bits (2048 recommended)",
        )

    def test_badFiles(self):
        """
        Missing, non-PEM and encrypted key files are refused with one line.
        """
        missing = self.mktemp()
        self.assertProblem(
            f"selector = s\nkey = {missing}\n", "key",
            f"cannot read {missing!r}: No such file or directory",
        )
        notPEM = self.mktemp()
        with open(notPEM, "w") as f:
            f.write("hello\n")
        self.assertProblem(
            f"selector = s\nkey = {notPEM}\n", "key", f"{notPEM!r} holds no PEM private key"
        )
        encrypted = _writeKey(
            self, ed25519.Ed25519PrivateKey.generate(),
            serialization.BestAvailableEncryption(b"password"),
        )
        self.assertProblem(
            f"selector = s\nkey = {encrypted}\nalgorithm = ed25519-sha256\n", "key",
            f"{encrypted!r} holds an encrypted key; smartrelay needs it unencrypted",
        )

    def test_domainNames(self):
        """
        Domains are validated and normalised like C{[domain:NAME]}; each
        may appear once.
        """
        config = parseConfig(
            f"[dkim:Example.COM.]\nselector = s\nkey = {self.rsaKey}\n"
            f"[dkim:other.example]\nselector = s\nkey = {self.edKey}\n"
            "algorithm = ed25519-sha256\n"
        )
        self.assertEqual(list(config.dkim), ["example.com", "other.example"])
        self.assertEqual(config.dkim["example.com"].name, "example.com")
        error = self.assertRaises(ConfigError, parseConfig, "[dkim:bad_name]\n", "etc/x.ini")
        self.assertEqual(
            str(error), "etc/x.ini: [dkim:bad_name]: 'bad_name' is not a valid domain name"
        )
        error = self.assertRaises(
            ConfigError, parseConfig,
            f"[dkim:a.example]\nselector = s\nkey = {self.rsaKey}\n[dkim:A.example]\n",
            "etc/x.ini",
        )
        self.assertEqual(
            str(error),
            "etc/x.ini: [dkim:A.example]: duplicate section (the same as [dkim:a.example])",
        )
        error = self.assertRaises(ConfigError, parseConfig, "[dkim]\n", "etc/x.ini")
        self.assertEqual(str(error), "etc/x.ini: [dkim]: a name is needed, as in [dkim:NAME]")

    def test_readOnlyAndHashable(self):
        """
        C{Config.dkim} is read-only, and the configuration still hashes.
        """
        config = parseConfig(f"[dkim:example.com]\nselector = s\nkey = {self.rsaKey}\n")
        self.assertRaises(TypeError, operator.setitem, config.dkim, "x", None)
        self.assertIsInstance(hash(config), int)


class RateTests(SynchronousTestCase):
    """
    Tests for L{Rate} and L{parseRate}.
    """

    def test_examples(self):
        """
        A count per unit, or per N units, in several spellings.
        """
        for text, count, period in [
            ("100/m", 100, 60), ("10/s", 10, 1), ("1000/h", 1000, 3600),
            ("5000/d", 5000, 86400), ("100/5m", 100, 300), ("100 / min", 100, 60),
            ("100/minute", 100, 60), ("3/sec", 3, 1), ("3/second", 3, 1),
            ("7/hour", 7, 3600), ("9/day", 9, 86400), ("9/2 days", 9, 172800),
            ("1/30s", 1, 30), ("100/M", 100, 60), (" 4/1.5h ", 4, 5400),
        ]:
            self.assertEqual(parseRate(text), Rate(count, period), text)

    def test_bad(self):
        """
        Anything else is a one-line L{ValueError} giving an example.
        """
        for bad in ["x", "", "100", "100/", "/m", "100/y", "-1/m", "1.5/m", "100/m/s",
                    "100 per minute", "100/-5m"]:
            error = self.assertRaises(ValueError, parseRate, bad)
            self.assertEqual(
                str(error),
                f"expected a rate such as '100/m' (count per s, m, h or d), got {bad.strip()!r}",
            )
        for bad in ["0/m", "5/0m"]:
            error = self.assertRaises(ValueError, parseRate, bad)
            self.assertEqual(
                str(error),
                "expected a rate such as '100/m' (count per s, m, h or d) "
                f"with a count and period above zero, got {bad!r}",
            )

    def test_badDirectly(self):
        """
        Building a rate directly checks the count and the period.
        """
        for count, period in [(0, 60), (-1, 60), (1.5, 60), (True, 60), (1, 0),
                              (1, -1), (1, math.inf), (1, math.nan)]:
            self.assertRaises(ValueError, Rate, count, period)

    def test_perSecond(self):
        """
        C{perSecond} is the count over the period.
        """
        self.assertEqual(parseRate("120/m").perSecond, 2)
        self.assertEqual(parseRate("1/h").perSecond, 1 / 3600)

    def test_burst(self):
        """
        C{burst} is one second's worth, at least one and at most the count.
        """
        self.assertEqual(parseRate("100/s").burst, 100)
        self.assertEqual(parseRate("3000/m").burst, 50)
        self.assertEqual(parseRate("100/m").burst, 2)
        self.assertEqual(parseRate("1/h").burst, 1)
        self.assertEqual(parseRate("5/0.5s").burst, 5)

    def test_str(self):
        """
        C{str()} uses the largest unit that divides the period.
        """
        self.assertEqual(
            [str(parseRate(t)) for t in ["100/60s", "10/s", "1000/3600s", "5/1d",
                                         "100/5min", "9/2 days", "1/90s", "1/1.5s"]],
            ["100/m", "10/s", "1000/h", "5/d", "100/5m", "9/2d", "1/90s", "1/1.5s"],
        )

    @given(
        st.integers(min_value=1, max_value=10**9),
        st.one_of(
            st.integers(min_value=1, max_value=10**8),
            st.floats(min_value=1e-3, max_value=1e8, allow_nan=False, allow_infinity=False),
        ),
    )
    def test_roundTrip(self, count, period):
        """
        C{str()} of a rate parses back to an equal rate.
        """
        rate = Rate(count, period)
        self.assertEqual(parseRate(str(rate)), rate)
        self.assertEqual(rate.burst, max(1, min(count, math.ceil(count / period))))


class FractionTests(SynchronousTestCase):
    """
    Tests for L{parseFraction}.
    """

    @given(st.integers(min_value=0, max_value=100))
    def test_percentages(self, percent):
        """
        C{N%} is N hundredths, the same as the fraction.
        """
        self.assertEqual(parseFraction(f"{percent}%"), percent / 100)
        self.assertEqual(parseFraction(f"{percent / 100}"), percent / 100)


class NamedSectionTests(SynchronousTestCase):
    """
    Tests for C{[domain:NAME]} and C{[provider:NAME]}.
    """

    def assertProblem(self, text, expected):
        """
        Parsing C{text} fails with exactly the one-line message C{expected}.
        """
        error = self.assertRaises(ConfigError, parseConfig, text, "etc/x.ini")
        self.assertEqual(str(error), expected)
        self.assertNotIn("\n", str(error))
        return error

    def domain(self, key, value, name="example.com"):
        """
        Parse a C{[domain:NAME]} section setting one key; return it.
        """
        return parseConfig(f"[domain:{name}]\n{key} = {value}\n").domains[name]

    def test_registry(self):
        """
        The named sections are listed with their Config fields.
        """
        self.assertEqual(
            NAMED_SECTIONS,
            {
                "domain": ("domains", DomainConfig),
                "provider": ("providers", ProviderConfig),
                "dkim": ("dkim", DKIMConfig),
            },
        )
        self.assertEqual(
            sectionKeys(DomainConfig),
            ["max_connections", "rate", "route", "tls", "messages_per_connection"],
        )
        self.assertEqual(
            sectionKeys(ProviderConfig),
            ["mx_suffixes", "max_connections", "rate", "tls", "messages_per_connection"],
        )

    def test_domainDefaults(self):
        """
        A domain section with no keys inherits everything.
        """
        config = parseConfig("[domain:example.com]\n")
        self.assertEqual(dict(config.domains), {"example.com": DomainConfig(name="example.com")})
        domain = config.domains["example.com"]
        for key in sectionKeys(DomainConfig):
            self.assertIsNone(getattr(domain, key), key)

    def test_domainKeys(self):
        """
        Every domain key parses like its C{[delivery]} counterpart.
        """
        text = (
            "[domain:example.com]\nmax_connections = 5\nrate = 100/m\n"
            "route = tcp:host=mx.internal.example:port=25\ntls = Required\n"
            "messages_per_connection = 50\n"
        )
        self.assertEqual(
            parseConfig(text).domains["example.com"],
            DomainConfig(
                name="example.com", max_connections=5, rate=Rate(100, 60),
                route="tcp:host=mx.internal.example:port=25", tls="required",
                messages_per_connection=50,
            ),
        )

    def test_domainEmptyValues(self):
        """
        An empty value for a domain key means not set.
        """
        for key in sectionKeys(DomainConfig):
            self.assertIsNone(getattr(self.domain(key, ""), key), key)

    def test_domainBadValues(self):
        """
        Bad domain values are one-line errors naming the section and key.
        """
        for key, value, problem in [
            ("max_connections", "0", "expected a positive integer, got '0'"),
            ("messages_per_connection", "many", "expected a positive integer, got 'many'"),
            ("rate", "fast",
             "expected a rate such as '100/m' (count per s, m, h or d), got 'fast'"),
            ("tls", "none", "expected opportunistic, required or verify, got 'none'"),
            ("route", "mx.example:25",
             "invalid client endpoint 'mx.example:25': Unknown endpoint type: "
             "'mx.example' (expected for example tcp:host=smtp.example.com:port=587)"),
        ]:
            error = self.assertProblem(
                f"[domain:example.com]\n{key} = {value}\n",
                f"etc/x.ini: [domain:example.com] {key}: {problem}",
            )
            self.assertEqual((error.section, error.key), ("domain:example.com", key))

    def test_domainName(self):
        """
        Domain names are lower-cased, lose a trailing dot and must be valid.
        """
        config = parseConfig("[domain:Mail.Example.COM.]\n[domain: other.example ]\n")
        self.assertEqual(list(config.domains), ["mail.example.com", "other.example"])
        self.assertEqual(config.domains["mail.example.com"].name, "mail.example.com")
        for bad in ["bad_name", "-x.example", "a..b", "example.com..", "*.example.com"]:
            self.assertProblem(
                f"[domain:{bad}]\n",
                f"etc/x.ini: [domain:{bad}]: {bad!r} is not a valid domain name",
            )

    def test_order(self):
        """
        Domains keep the order of the file.
        """
        names = ["b.example", "a.example", "c.example"]
        text = "".join(f"[domain:{name}]\n" for name in names)
        self.assertEqual(list(parseConfig(text).domains), names)

    def test_emptyName(self):
        """
        A prefix with nothing after the colon, or without a colon, is an error.
        """
        self.assertProblem(
            "[domain:]\n",
            "etc/x.ini: [domain:]: a name is needed after 'domain:', as in [domain:NAME]",
        )
        self.assertProblem(
            "[provider: ]\n",
            "etc/x.ini: [provider: ]: a name is needed after 'provider:', as in [provider:NAME]",
        )
        self.assertProblem(
            "[domain]\n", "etc/x.ini: [domain]: a name is needed, as in [domain:NAME]"
        )

    def test_unknownPrefix(self):
        """
        An unknown prefix is an unknown section, with a suggestion for a near miss.
        """
        self.assertProblem(
            "[domian:example.com]\n",
            "etc/x.ini: [domian:example.com]: unknown section "
            "(did you mean 'domain:example.com'?)",
        )
        self.assertProblem(
            "[Domain:example.com]\n",
            "etc/x.ini: [Domain:example.com]: unknown section "
            "(did you mean 'domain:example.com'?)",
        )
        self.assertProblem("[zzzzzz:q]\n", "etc/x.ini: [zzzzzz:q]: unknown section")
        self.assertProblem(
            "[smtp:x]\n", "etc/x.ini: [smtp:x]: unknown section (did you mean 'smtp'?)"
        )

    def test_unknownKey(self):
        """
        An unknown key in a named section is an error with a suggestion.
        """
        self.assertProblem(
            "[domain:example.com]\nmax_conections = 5\n",
            "etc/x.ini: [domain:example.com] max_conections: unknown key "
            "'max_conections' (did you mean 'max_connections'?)",
        )
        self.assertProblem(
            "[domain:example.com]\nmx_suffixes = x.example\n",
            "etc/x.ini: [domain:example.com] mx_suffixes: unknown key 'mx_suffixes'",
        )
        self.assertProblem(
            "[provider:p]\nmx_suffixes = p.example\nhold = on\n",
            "etc/x.ini: [provider:p] hold: unknown key 'hold'",
        )
        self.assertProblem(
            "[domain:example.com]\nname = other.example\n",
            "etc/x.ini: [domain:example.com] name: unknown key 'name'",
        )

    def test_duplicate(self):
        """
        Two sections for the same name, however written, are an error.
        """
        self.assertProblem(
            "[domain:example.com]\n[domain:Example.COM]\n",
            "etc/x.ini: [domain:Example.COM]: duplicate section (the same as [domain:example.com])",
        )
        self.assertProblem(
            "[domain:example.com]\n[domain:example.com.]\n",
            "etc/x.ini: [domain:example.com.]: duplicate section (the same as [domain:example.com])",
        )
        self.assertProblem(
            "[provider:G]\nmx_suffixes = g.example\n[provider:g]\nmx_suffixes = g.example\n",
            "etc/x.ini: [provider:g]: duplicate section (the same as [provider:G])",
        )
        self.assertProblem(
            "[domain:example.com]\n[domain:example.com]\n",
            "etc/x.ini: [domain:example.com]: duplicate section (line 2)",
        )

    def test_sameNameDifferentPrefix(self):
        """
        A domain and a provider may share a name.
        """
        config = parseConfig("[domain:x]\n[provider:x]\nmx_suffixes = x\n")
        self.assertEqual((list(config.domains), list(config.providers)), (["x"], ["x"]))

    def test_provider(self):
        """
        A provider section: its name, its normalised suffixes and its limits.
        """
        config = parseConfig(
            "[provider:Google_Mail-1]\nmx_suffixes = .Google.COM,googlemail.com.,\n"
            "  google.com\nmax_connections = 20\nrate = 3000/m\ntls = verify\n"
            "messages_per_connection = 10\n"
        )
        self.assertEqual(
            dict(config.providers),
            {
                "google_mail-1": ProviderConfig(
                    name="google_mail-1", mx_suffixes=("google.com", "googlemail.com"),
                    max_connections=20, rate=Rate(3000, 60), tls="verify",
                    messages_per_connection=10,
                ),
            },
        )

    def test_providerDefaults(self):
        """
        Only C{mx_suffixes} is needed; the rest inherit.
        """
        provider = parseConfig("[provider:p]\nmx_suffixes = p.example\n").providers["p"]
        self.assertEqual(provider, ProviderConfig(name="p", mx_suffixes=("p.example",)))
        for key in sectionKeys(ProviderConfig)[1:]:
            self.assertIsNone(getattr(provider, key), key)

    def test_providerName(self):
        """
        Provider names are letters, digits, C{-} and C{_}.
        """
        for bad in ["a.b", "a b", "g\u00f6"]:
            self.assertProblem(
                f"[provider:{bad}]\nmx_suffixes = x\n",
                f"etc/x.ini: [provider:{bad}]: {bad!r} is not a valid provider name "
                "(use letters, digits, '-' and '_')",
            )

    def test_providerSuffixesRequired(self):
        """
        A provider without C{mx_suffixes}, or with none in it, is an error.
        """
        self.assertProblem(
            "[provider:p]\nrate = 1/s\n",
            "etc/x.ini: [provider:p] mx_suffixes: required key missing",
        )
        for empty in ["", " , "]:
            self.assertProblem(
                f"[provider:p]\nmx_suffixes = {empty}\n",
                "etc/x.ini: [provider:p] mx_suffixes: at least one suffix is needed, "
                "such as google.com",
            )
        self.assertProblem(
            "[provider:p]\nmx_suffixes = google.com, bad_suffix\n",
            "etc/x.ini: [provider:p] mx_suffixes: expected a DNS suffix such as "
            "google.com, got 'bad_suffix'",
        )

    def test_providerBadValues(self):
        """
        Bad provider limits are one-line errors naming the section and key.
        """
        self.assertProblem(
            "[provider:p]\nmx_suffixes = x\nrate = 5\n",
            "etc/x.ini: [provider:p] rate: expected a rate such as '100/m' "
            "(count per s, m, h or d), got '5'",
        )
        self.assertProblem(
            "[provider:p]\nmx_suffixes = x\nmax_connections = -1\n",
            "etc/x.ini: [provider:p] max_connections: expected a positive integer, got '-1'",
        )

    def test_matches(self):
        """
        A host matches a suffix it equals or ends with after a dot, ignoring
        case and a trailing dot.
        """
        provider = ProviderConfig(name="g", mx_suffixes=("google.com", "googlemail.com"))
        for host in ["google.com", "aspmx.l.google.com", "ALT1.ASPMX.L.Google.Com.",
                     "gmail-smtp-in.l.googlemail.com"]:
            self.assertTrue(provider.matches(host), host)
        for host in ["notgoogle.com", "google.com.evil.example", "com", "", "oogle.com"]:
            self.assertFalse(provider.matches(host), host)

    def test_providerFor(self):
        """
        L{Config.providerFor} finds the provider of an MX host; the longest
        matching suffix wins, then the first section.
        """
        config = parseConfig(
            "[provider:outlook]\nmx_suffixes = outlook.com\n"
            "[provider:eop]\nmx_suffixes = protection.outlook.com\n"
            "[provider:other]\nmx_suffixes = outlook.com\n"
        )
        self.assertEqual(config.providerFor("x.mail.protection.outlook.com").name, "eop")
        self.assertEqual(config.providerFor("mx1.hotmail.outlook.com.").name, "outlook")
        self.assertIsNone(config.providerFor("mx.example.com"))
        self.assertIsNone(defaultConfig().providerFor("mx.example.com"))

    def test_readOnly(self):
        """
        The section mappings cannot be changed.
        """
        config = parseConfig("[domain:example.com]\n")
        self.assertRaises(TypeError, operator.setitem, config.domains, "x", None)
        self.assertEqual(config, parseConfig("[domain:EXAMPLE.com]\n"))
        self.assertNotEqual(config, defaultConfig())
        self.assertEqual(Config(domains={"example.com": DomainConfig(name="example.com")}), config)


class DurationTests(SynchronousTestCase):
    """
    Tests for L{parseDuration} and L{formatDuration}.
    """

    def test_examples(self):
        """
        Each unit multiplies as documented; a bare number is seconds.
        """
        self.assertEqual(
            [parseDuration(t) for t in ["30s", "5m", "2h", "3d", "1w", "90", "1.5h", " 5 m "]],
            [30, 300, 7200, 259200, 604800, 90, 5400, 300],
        )

    def test_bad(self):
        """
        Garbage, negative, zero and infinite durations raise L{ValueError}.
        """
        for bad in ["", "m", "5x", "-5m", "5mm", "inf", "nan", "5M", "1e999", "0", "0s", "5m3s"]:
            self.assertRaises(ValueError, parseDuration, bad)

    def test_allowZero(self):
        """
        Zero is accepted when asked for.
        """
        self.assertEqual(parseDuration("0s", allowZero=True), 0)

    @given(st.integers(min_value=1, max_value=10**12), st.sampled_from("smhdw"))
    def test_units(self, number, unit):
        """
        C{N<unit>} is N times the unit's seconds.
        """
        factor = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
        self.assertEqual(parseDuration(f"{number}{unit}"), number * factor)

    @given(st.one_of(
        st.integers(min_value=1, max_value=10**12).map(float),
        st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False),
    ))
    def test_roundTrip(self, seconds):
        """
        L{formatDuration} gives text L{parseDuration} reads back exactly.
        """
        self.assertEqual(parseDuration(formatDuration(seconds)), seconds)

    def test_format(self):
        """
        L{formatDuration} picks the largest unit that divides exactly.
        """
        self.assertEqual(
            [formatDuration(s) for s in [300, 7200, 90, 604800, 86400 * 3, 1.5]],
            ["5m", "2h", "90s", "1w", "3d", "1.5s"],
        )

    @given(st.text(max_size=20))
    def test_garbage(self, text):
        """
        Any text either parses to a positive finite duration or raises L{ValueError}.
        """
        try:
            seconds = parseDuration(text)
        except ValueError:
            return
        self.assertGreater(seconds, 0)
        self.assertLess(seconds, float("inf"))


class SizeTests(SynchronousTestCase):
    """
    Tests for L{parseSize} and L{formatSize}.
    """

    def test_examples(self):
        """
        Multiples are binary; a bare number is bytes.
        """
        self.assertEqual(
            [parseSize(t) for t in ["25M", "512K", "1G", "1000", "2k", "3MiB", "4mb", "1T"]],
            [25 << 20, 512 << 10, 1 << 30, 1000, 2048, 3 << 20, 4 << 20, 1 << 40],
        )

    def test_bad(self):
        """
        Garbage, negative, fractional and zero sizes raise L{ValueError}.
        """
        for bad in ["", "M", "-1", "1.5M", "25X", "0", "0K", "10" * 20 + "T"]:
            self.assertRaises(ValueError, parseSize, bad)

    def test_allowZero(self):
        """
        Zero is accepted when asked for.
        """
        self.assertEqual(parseSize("0", allowZero=True), 0)

    @given(st.integers(min_value=1, max_value=10**9), st.sampled_from(["", "K", "M", "G"]))
    def test_units(self, number, unit):
        """
        C{N<unit>} is N times 1024 to the unit's power.
        """
        power = ["", "K", "M", "G"].index(unit)
        self.assertEqual(parseSize(f"{number}{unit}"), number * 1024**power)
        self.assertEqual(parseSize(f"{number}{unit.lower()}"), number * 1024**power)

    @given(st.integers(min_value=1, max_value=(1 << 63) - 1))
    def test_roundTrip(self, size):
        """
        L{formatSize} gives text L{parseSize} reads back exactly.
        """
        self.assertEqual(parseSize(formatSize(size)), size)


class BoolTests(SynchronousTestCase):
    """
    Tests for L{parseBool}.
    """

    def test_values(self):
        """
        The documented spellings parse, in any case.
        """
        for text in ["on", "yes", "true", "1", "ON", " Yes "]:
            self.assertIs(parseBool(text), True)
        for text in ["off", "no", "false", "0", "Off", "FALSE"]:
            self.assertIs(parseBool(text), False)

    def test_bad(self):
        """
        Anything else raises L{ValueError} naming the value.
        """
        for text in ["", "y", "2", "enabled"]:
            error = self.assertRaises(ValueError, parseBool, text)
            self.assertEqual(str(error), f"expected on or off, got {text!r}")


_durations = st.sampled_from([1, 30, 60, 90, 300, 3600, 5400, 7200, 86400, 604800, 0.5])
_steps = st.lists(
    st.tuples(_durations, st.integers(min_value=1, max_value=5)), min_size=1, max_size=6
)
_schedules = st.tuples(_steps, st.booleans()).map(
    lambda s: RetrySchedule(tuple(s[0][:-1]) + ((s[0][-1][0], None if s[1] else s[0][-1][1]),))
)


class RetryScheduleTests(SynchronousTestCase):
    """
    Tests for L{RetrySchedule}.
    """

    def test_default(self):
        """
        The default schedule waits 5m, 10m, 20m, 40m, then 1h four times, then 2h.
        """
        self.assertEqual(
            [DEFAULT_RETRY.delay(n) for n in range(1, 13)],
            [300, 600, 1200, 2400, 3600, 3600, 3600, 3600, 7200, 7200, 7200, 7200],
        )
        self.assertEqual(DEFAULT_RETRY.delay(10**6), 7200)
        self.assertEqual(str(DEFAULT_RETRY), "5m, 10m, 20m, 40m, 1h*4, 2h*...")

    def test_lastRepeats(self):
        """
        Without C{*...} the last delay repeats forever.
        """
        schedule = RetrySchedule.parse("1m, 2m*2")
        self.assertEqual([schedule.delay(n) for n in range(1, 7)], [60, 120, 120, 120, 120, 120])

    def test_spacing(self):
        """
        Spaces around C{*} and commas are allowed.
        """
        self.assertEqual(RetrySchedule.parse(" 1m ,2h * 3,  1d *  ... "),
                         RetrySchedule(((60, 1), (7200, 3), (86400, None))))

    def test_badAttempt(self):
        """
        Attempts are numbered from 1.
        """
        self.assertRaises(ValueError, DEFAULT_RETRY.delay, 0)

    def test_bad(self):
        """
        Malformed schedules raise L{ValueError}.
        """
        for bad in ["", ",", "*3", "5m*", "5m*0", "5m*-1", "5m*x", "5m*...,1h", "5m**2",
                    "0s", "-5m", "5m*2*2", "5m*....", "5m*1.5"]:
            self.assertRaises(ValueError, RetrySchedule.parse, bad)

    def test_badSteps(self):
        """
        Building a schedule directly checks its steps too.
        """
        self.assertRaises(ValueError, RetrySchedule, ())
        self.assertRaises(ValueError, RetrySchedule, ((60, None), (60, 1)))
        self.assertRaises(ValueError, RetrySchedule, ((0, 1),))
        self.assertRaises(ValueError, RetrySchedule, ((60, 0),))

    @given(_schedules)
    def test_roundTrip(self, schedule):
        """
        C{str()} of a schedule parses back to an equal schedule.
        """
        self.assertEqual(RetrySchedule.parse(str(schedule)), schedule)

    @given(_schedules, st.integers(min_value=1, max_value=40))
    def test_delayMatchesExpansion(self, schedule, attempt):
        """
        C{delay(n)} is the n-th item of the written-out schedule, or its last item.
        """
        expanded = []
        for delay, count in schedule.steps:
            expanded.extend([delay] * (1 if count is None else count))
        expected = expanded[attempt - 1] if attempt <= len(expanded) else expanded[-1]
        self.assertEqual(schedule.delay(attempt), expected)


class HostnameTests(SynchronousTestCase):
    """
    Tests for L{isHostname}.
    """

    @given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True),
                    min_size=1, max_size=4))
    def test_valid(self, labels):
        """
        Dot-joined RFC 1123 labels are host names.
        """
        self.assertTrue(isHostname(".".join(labels)))

    def test_tooLong(self):
        """
        A name over 253 octets is not a host name.
        """
        self.assertFalse(isHostname(".".join(["a" * 63] * 4)))


_iniLines = st.one_of(
    st.sampled_from(["[smartrelay]", "[smtp]", "[delivery]", "[DEFAULT]", "", "# c", "  x",
                     "[domain:example.com]", "[domain:EXAMPLE.com.]", "[domain:]",
                     "[domain:a_b]", "[provider:p]", "[provider:p q]", "[dkim:x]"]),
    st.builds(
        "{} = {}".format,
        st.sampled_from(
            [k for _, c in SECTIONS.values() for k in sectionKeys(c)]
            + [k for _, c in NAMED_SECTIONS.values() for k in sectionKeys(c)]
            + ["bogus"]
        ),
        st.text(alphabet="0123456789abcdefxyzKMGsmhdw.:,*/[]()?+=% -\t\n#;", max_size=20),
    ),
    st.text(max_size=15),
)


class RobustnessTests(SynchronousTestCase):
    """
    Tests that no input escapes as anything but a one-line L{ConfigError}.
    """

    @given(st.lists(_iniLines, max_size=8))
    def test_anyText(self, lines):
        """
        Any text either parses or raises L{ConfigError} with a one-line message.
        """
        try:
            parseConfig("\n".join(lines), "x.ini")
        except ConfigError as e:
            self.assertNotIn("\n", str(e))
            self.assertNotIn("\r", str(e))
            self.assertTrue(str(e).startswith("x.ini: "), str(e))
