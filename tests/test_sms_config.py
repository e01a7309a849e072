"""
Tests for the C{[sms]} section of L{smartrelay.config}.
"""

from twisted.trial.unittest import SynchronousTestCase

from smartrelay.config import SECTIONS, SMSConfig, parseConfig, sectionKeys

from tests.test_config import ConfigTestMixin

#: The smallest section that turns SMS on.
ON = "domain = sms.example.com\nsmsc = tcp:host=127.0.0.1:port=2775\nsystem_id = relay\n"


class SMSSectionTests(ConfigTestMixin, SynchronousTestCase):
    """
    C{[sms]}: its keys, defaults and the one-line errors of bad values.
    """

    def test_registered(self):
        """
        C{[sms]} is a known section with the keys of DESIGN section 1.2a (and
        the timers).
        """
        self.assertEqual(SECTIONS["sms"], ("sms", SMSConfig))
        self.assertEqual(
            sectionKeys(SMSConfig),
            [
                "domain", "smsc", "system_id", "password", "system_type", "source_addr",
                "window", "rate", "max_parts", "subject", "response_timeout",
                "enquire_link", "queue_timeout", "max_binds",
            ],
        )

    def test_defaults(self):
        """
        Without the section there is no SMS domain; window 10, no rate limit,
        5 parts, the subject ignored.
        """
        sms = parseConfig("", "x.ini").sms
        self.assertEqual(
            (sms.domain, sms.smsc, sms.window, sms.rate, sms.max_parts, sms.subject,
             sms.source_addr, sms.response_timeout, sms.enquire_link, sms.queue_timeout),
            (None, None, 10, None, 5, "ignore", None, 30.0, 30.0, 60.0),
        )

    def test_on(self):
        """
        A domain, an SMSC endpoint and a system id turn SMS on; the domain is
        lower-case; the password is kept out of the repr.
        """
        sms = parseConfig(
            "[sms]\n" + ON.replace("sms.example.com", "SMS.Example.COM.")
            + "password = s3cret\nsource_addr = Shop\nrate = 50/s\nwindow = 20\n"
            "max_parts = 8\nsubject = Prepend\n",
            "x.ini",
        ).sms
        self.assertEqual(
            (sms.domain, sms.smsc, sms.system_id, sms.password, sms.source_addr, sms.rate,
             sms.window, sms.max_parts, sms.subject),
            ("sms.example.com", "tcp:host=127.0.0.1:port=2775", "relay", "s3cret", "Shop",
             50.0, 20, 8, "prepend"),
        )
        self.assertNotIn("s3cret", repr(sms))

    def test_smscRequired(self):
        """
        A domain without an SMSC, or without a system id, is one line
        naming the missing key.
        """
        error = self.assertRaises(
            Exception, parseConfig, "[sms]\ndomain = sms.example.com\n", "x.ini"
        )
        self.assertEqual(
            str(error),
            "x.ini: [sms] smsc: required with domain (e.g. tcp:host=smsc.example.com:port=2775)",
        )
        error = self.assertRaises(
            Exception, parseConfig,
            "[sms]\ndomain = sms.example.com\nsmsc = tcp:host=a:port=1\n", "x.ini",
        )
        self.assertEqual(str(error), "x.ini: [sms] system_id: required with domain")

    def test_domainOfAnotherSection(self):
        """
        The SMS domain may not have a [domain:...] section (its keys would
        never apply) nor be the feedback listener's bounce domain.
        """
        error = self.assertRaises(
            Exception, parseConfig,
            "[sms]\n" + ON + "[domain:sms.example.com]\nmax_connections = 2\n", "x.ini",
        )
        self.assertEqual(
            str(error),
            "x.ini: [sms] domain: sms.example.com also has a [domain:sms.example.com] "
            "section, whose keys never apply to SMS",
        )
        error = self.assertRaises(
            Exception, parseConfig,
            "[sms]\n" + ON + "[feedback]\nbounce_domain = SMS.example.com\n", "x.ini",
        )
        self.assertEqual(
            str(error),
            "x.ini: [sms] domain: must not be [feedback] bounce_domain "
            "(mail there is the feedback listener's)",
        )

    def test_badDomain(self):
        """
        C{domain} must be a domain name.
        """
        self.assertKeyError("sms", "domain", "bad_domain!",
                            "'bad_domain!' is not a valid domain name")

    def test_badSMSC(self):
        """
        C{smsc} must be a client endpoint string.
        """
        self.assertKeyErrorMatches("sms", "smsc", "tcp:host=a:port=x",
                                   r"^invalid client endpoint 'tcp:host=a:port=x': ")

    def test_bindStrings(self):
        """
        C{system_id}, C{password} and C{system_type} are printable ASCII of
        at most 15, 8 and 12 characters (the SMPP 3.4 field sizes).
        """
        self.assertEqual(self.parseKey("sms", "system_id", "a" * 15).system_id, "a" * 15)
        self.assertKeyError("sms", "system_id", "a" * 16,
                            "must be at most 15 printable ASCII characters")
        self.assertKeyError("sms", "system_id", "relé",
                            "must be at most 15 printable ASCII characters")
        self.assertKeyError("sms", "password", "123456789",
                            "must be at most 8 printable ASCII characters")
        self.assertKeyError("sms", "system_type", "x" * 13,
                            "must be at most 12 printable ASCII characters")

    def test_sourceAddr(self):
        """
        C{source_addr} is an E.164 number, a short code, or up to 11 letters
        and digits with a letter.
        """
        for good in ["+393331234567", "12345", "Shop", "My Shop.it"]:
            self.assertEqual(self.parseKey("sms", "source_addr", good).source_addr, good)
        problem = (
            "{!r} is not a sender id: an E.164 number (+393331234567), a short code, "
            "or 1 to 11 letters, digits, spaces and ._&'- with a letter"
        )
        for bad in ["TooLongSenderId", "Shop!", "+1234567890123456", "Ünicode"]:
            self.assertKeyError("sms", "source_addr", bad, problem.format(bad))

    def test_window(self):
        """
        C{window} is a positive integer.
        """
        self.assertKeyError("sms", "window", "0", "expected a positive integer, got '0'")
        self.assertKeyError("sms", "window", "ten", "expected a positive integer, got 'ten'")

    def test_rate(self):
        """
        C{rate} is a positive number of submits per second (C{/s} allowed),
        or C{off}.
        """
        self.assertEqual(self.parseKey("sms", "rate", "2.5").rate, 2.5)
        self.assertIsNone(self.parseKey("sms", "rate", "off").rate)
        for bad in ["0", "-1", "inf"]:
            self.assertKeyError("sms", "rate", bad,
                                "must be a positive number of submits per second")
        self.assertKeyError("sms", "rate", "fast",
                            "'fast' is not a number of submits per second (e.g. 50)")

    def test_maxParts(self):
        """
        C{max_parts} is 1 to 255.
        """
        self.assertEqual(self.parseKey("sms", "max_parts", "255").max_parts, 255)
        self.assertKeyError("sms", "max_parts", "256",
                            "must be 1 to 255 (a concatenated SMS has at most 255 parts)")
        self.assertKeyError("sms", "max_parts", "0", "expected a positive integer, got '0'")

    def test_maxBinds(self):
        """
        C{max_binds} (issue 17) is not set by default (no cluster-wide bind
        limit), empty is not set, else a positive integer; anything else
        stops start-up with one line naming the key.
        """
        self.assertIsNone(parseConfig("", "x.ini").sms.max_binds)
        self.assertIsNone(parseConfig("[sms]\n" + ON, "x.ini").sms.max_binds)
        self.assertIsNone(self.parseKey("sms", "max_binds", "").max_binds)
        self.assertEqual(self.parseKey("sms", "max_binds", "1").max_binds, 1)
        self.assertEqual(self.parseKey("sms", "max_binds", " 4 ").max_binds, 4)
        sms = parseConfig("[sms]\n" + ON + "max_binds = 2\n", "x.ini").sms
        self.assertEqual(sms.max_binds, 2)
        for bad in ["0", "-1", "2.5", "two", "3 binds", "0x2"]:
            self.assertKeyError(
                "sms", "max_binds", bad, f"expected a positive integer, got {bad!r}"
            )

    def test_maxBindsErrorLine(self):
        """
        The error of a bad C{max_binds} is exactly one line: the file, the
        section and the key, then the problem.
        """
        error = self.assertRaises(
            Exception, parseConfig, "[sms]\n" + ON + "max_binds = 0\n", "x.ini"
        )
        self.assertEqual(str(error), "x.ini: [sms] max_binds: expected a positive integer, got '0'")
        self.assertNotIn("\n", str(error))

    def test_subject(self):
        """
        C{subject} is C{prepend} or C{ignore}.
        """
        self.assertKeyError("sms", "subject", "top", "must be prepend or ignore")

    def test_timers(self):
        """
        The timers are durations greater than zero.
        """
        self.assertEqual(self.parseKey("sms", "queue_timeout", "2m").queue_timeout, 120.0)
        for key in ["response_timeout", "enquire_link", "queue_timeout"]:
            self.assertKeyError(
                "sms", key, "0",
                "expected a duration such as 30s, 5m, 2h, 3d or 1w (greater than zero), got '0'",
            )

    def test_unknownKey(self):
        """
        A misspelt key is an error with a suggestion.
        """
        self.assertKeyError("sms", "windw", "3", "unknown key 'windw' (did you mean 'window'?)")
