"""
Tests for the C{[export]} and C{[webhooks]} sections of
L{smartrelay.config}, the start-up check of the webhook target
(L{smartrelay.export.services}) and L{smartrelay.ssrf}.
"""

import socket

from twisted.trial.unittest import SynchronousTestCase

from smartrelay.config import ConfigError, parseConfig
from smartrelay.export.services import checkWebhookTarget
from smartrelay.ssrf import URLRefused, checkResolved, checkURL, refusal

SECRET = "secret = 0123456789abcdef\n"


class ExportConfigTests(SynchronousTestCase):
    """
    C{[export]}.
    """

    def test_defaults(self):
        """
        Without the section there is no export; the defaults are JSONL
        every 5 minutes, no gzip, no command.
        """
        export = parseConfig("").export
        self.assertEqual(
            (export.directory, export.format, export.interval, export.gzip, export.command),
            (None, "jsonl", 300.0, False, None),
        )

    def test_values(self):
        """
        Every key is read; the command is split into words like a shell.
        """
        export = parseConfig(
            "[export]\ndirectory = out\nformat = CSV\ninterval = 1h\ngzip = on\n"
            "command = /bin/upload --to 'a b'\ncommand_timeout = 30s\n"
        ).export
        self.assertEqual(
            (export.directory, export.format, export.interval, export.gzip, export.command,
             export.command_timeout),
            ("out", "csv", 3600.0, True, ("/bin/upload", "--to", "a b"), 30.0),
        )

    def test_badValues(self):
        """
        A bad value is one line naming the section and the key.
        """
        for text, key in [
            ("format = xml", "format"),
            ("interval = 0", "interval"),
            ("interval = soon", "interval"),
            ("gzip = maybe", "gzip"),
            ("command = 'unclosed", "command"),
            ("colour = red", "colour"),
        ]:
            with self.assertRaises(ConfigError) as e:
                parseConfig("[export]\n" + text + "\n", "x.ini")
            message = str(e.exception)
            self.assertTrue(message.startswith(f"x.ini: [export] {key}: "), message)
            self.assertNotIn("\n", message)


class WebhooksConfigTests(SynchronousTestCase):
    """
    C{[webhooks]}.
    """

    def parse(self, text):
        return parseConfig("[webhooks]\n" + text, "x.ini").webhooks

    def error(self, text):
        with self.assertRaises(ConfigError) as e:
            self.parse(text)
        self.assertNotIn("\n", str(e.exception))
        return str(e.exception)

    def test_defaults(self):
        """
        Without a URL there are no webhooks; the defaults are all types,
        batches of 100, three days of retries.
        """
        webhooks = parseConfig("").webhooks
        self.assertEqual(
            (webhooks.url, webhooks.events, webhooks.allow_private, webhooks.batch,
             webhooks.max_age),
            (None, (), False, 100, 3 * 86400.0),
        )

    def test_values(self):
        """
        Every key is read; the secret stays out of the C{repr}.
        """
        webhooks = self.parse(
            "url = https://hooks.example.com/in?x=1\n" + SECRET
            + "events = bounced, complained, bounced\nbatch = 10\nmax_age = 1d\n"
            "timeout = 5s\nconcurrency = 2\n"
        )
        self.assertEqual(webhooks.url, "https://hooks.example.com/in?x=1")
        self.assertEqual(webhooks.events, ("bounced", "complained"))
        self.assertEqual((webhooks.batch, webhooks.max_age, webhooks.timeout), (10, 86400.0, 5.0))
        self.assertNotIn("0123456789abcdef", repr(webhooks))
        self.assertEqual(self.parse("url = https://h.example/\n" + SECRET + "events = all\n")
                         .events, ())

    def test_privateTargetRefused(self):
        """
        A loopback, private, link-local or multicast URL, or localhost, is
        refused in one line naming C{[webhooks] url}, unless
        C{allow_private = on}.
        """
        for url in [
            "http://127.0.0.1:8000/h", "http://10.1.2.3/", "http://[::1]/",
            "http://169.254.169.254/latest", "http://224.0.0.1/", "http://localhost:9/",
            "http://api.localhost/", "http://[::ffff:192.168.1.1]/", "http://0.0.0.0/",
        ]:
            message = self.error(f"url = {url}\n" + SECRET)
            self.assertTrue(message.startswith("x.ini: [webhooks] url: "), message)
            self.assertIn("allow_private = on", message)
            self.assertEqual(self.parse(f"url = {url}\n{SECRET}allow_private = on\n").url, url)

    def test_badValues(self):
        """
        Other schemes, credentials in the URL, a missing or short secret,
        unknown event types and batch sizes out of range are refused.
        """
        for text, start in [
            ("url = ftp://example.com/\n" + SECRET, "x.ini: [webhooks] url: must be an http"),
            ("url = https://u:p@example.com/\n" + SECRET, "x.ini: [webhooks] url: must not"),
            ("url = https:///x\n" + SECRET, "x.ini: [webhooks] url: has no host"),
            ("url = https://example.com/\n", "x.ini: [webhooks] secret: required"),
            ("url = https://example.com/\nsecret = short\n", "x.ini: [webhooks] secret: must be"),
            ("events = bounce\n", "x.ini: [webhooks] events: unknown event type 'bounce'"),
            ("batch = 0\n", "x.ini: [webhooks] batch:"),
            ("batch = 1001\n", "x.ini: [webhooks] batch:"),
        ]:
            message = self.error(text)
            self.assertTrue(message.startswith(start), message)

    def test_startUpResolution(self):
        """
        At start-up a host name that resolves only to private addresses is
        refused naming C{[webhooks] url}; public, unresolvable, or allowed
        private ones pass.
        """
        def resolver(addresses):
            def getaddrinfo(host, port, type=0):
                if addresses is None:
                    raise socket.gaierror("no such name")
                return [(socket.AF_INET, type, 6, "", (a, port)) for a in addresses]
            return getaddrinfo

        config = parseConfig("[webhooks]\nurl = https://hooks.example.com/\n" + SECRET)
        with self.assertRaises(ConfigError) as e:
            checkWebhookTarget(config, resolver(["192.168.0.5"]))
        self.assertIn("[webhooks] url: https://hooks.example.com/: hooks.example.com resolves"
                      " to a private address (192.168.0.5)", str(e.exception))
        checkWebhookTarget(config, resolver(["192.168.0.5", "93.184.216.34"]))
        checkWebhookTarget(config, resolver(None))
        allowed = parseConfig("[webhooks]\nurl = https://hooks.example.com/\n" + SECRET
                              + "allow_private = on\n")
        checkWebhookTarget(allowed, resolver(["127.0.0.1"]))


class SSRFTests(SynchronousTestCase):
    """
    L{smartrelay.ssrf}.
    """

    def test_refusal(self):
        """
        Each kind of address that is not public unicast is named.
        """
        for address, why in [
            ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"),
            ("10.0.0.1", "a private address"), ("172.16.5.4", "a private address"),
            ("192.168.1.1", "a private address"), ("fd00::1", "a private address"),
            ("169.254.169.254", "a link-local address"), ("fe80::1", "a link-local address"),
            ("224.0.0.251", "a multicast address"), ("ff02::1", "a multicast address"),
            ("0.0.0.0", "an unspecified address"), ("::ffff:10.0.0.1", "a private address"),
            ("64:ff9b::7f00:1", "a loopback address"),
            ("100.64.0.1", "a reserved (not globally routable) address"),
            ("8.8.8.8", None), ("2606:4700:4700::1111", None),
        ]:
            self.assertEqual(refusal(address), why, address)

    def test_checkResolved(self):
        """
        The allowed addresses are kept; none allowed is an error naming
        the first refused.
        """
        self.assertEqual(checkResolved("h", ["10.0.0.1", "8.8.8.8"], False), ["8.8.8.8"])
        self.assertEqual(checkResolved("h", ["10.0.0.1"], True), ["10.0.0.1"])
        self.assertRaises(URLRefused, checkResolved, "h", [], False)
        with self.assertRaises(URLRefused) as e:
            checkResolved("h", ["10.0.0.1", "127.0.0.1"], False)
        self.assertEqual(
            str(e.exception),
            "h resolves to a private address (10.0.0.1); set allow_private = on to allow it",
        )

    def test_checkURL(self):
        """
        Fragments, spaces, port 0 and non-ASCII are refused.
        """
        for url in ["http://h.example/#x", "http://h.example/a b", "http://h.example:0/",
                    "http://h.example/é", "http://h.example:99999/"]:
            self.assertRaises(URLRefused, checkURL, url, False)
        self.assertEqual(checkURL("https://h.example:8443/x", False).port, 8443)


class ExportStartupTests(SynchronousTestCase):
    """
    What the relay checks of C{[export]} when it is built.
    """

    def test_directoryAndCommand(self):
        """
        The directory is created; one that cannot be, or a command that
        does not exist, is one line naming the key.
        """
        import os

        from smartrelay.export.services import checkExport

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        good = parseConfig(f"[export]\ndirectory = {base}/a/b\ncommand = sh -c true\n").export
        checkExport(good)
        self.assertTrue(os.path.isdir(f"{base}/a/b"))
        blocker = os.path.join(base, "file")
        open(blocker, "w").close()
        for text, key, words in [
            (f"directory = {blocker}/x\n", "directory", "cannot create"),
            (f"directory = {base}\ncommand = no-such-program-here --x\n", "command",
             "no-such-program-here: no such program"),
            (f"directory = {base}\ncommand = {blocker}\n", "command", "no such program"),
        ]:
            with self.assertRaises(ConfigError) as e:
                checkExport(parseConfig("[export]\n" + text).export)
            self.assertIn(f"[export] {key}: ", str(e.exception))
            self.assertIn(words, str(e.exception))
