"""
Tests for L{smartrelay.smtp.controls}: control headers are read, checked
and removed; providers' headers map to ours; bad values raise
L{InvalidControlHeader} naming the header (the policy's 554 5.6.0 is tested
in L{tests.test_smtp_submission}).
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.smtp.controls import Controls, InvalidControlHeader, readControls
from smartrelay.smtp.replies import SMTPReply

BODY = b"\r\nHello\r\nX-SmartRelay-Tag: not-a-header-in-the-body\r\n"


def message(*headers: str) -> bytes:
    lines = ["From: app@example.com", "To: you@example.org", *headers, "Subject: hi"]
    return ("\r\n".join(lines) + "\r\n").encode() + BODY


class ReadTests(SynchronousTestCase):
    def read(self, *headers):
        return readControls(message(*headers))

    def refused(self, *headers) -> str:
        error = self.assertRaises(InvalidControlHeader, readControls, message(*headers))
        self.assertEqual(str(error), f"Invalid {error.header} header: {error.reason}")
        return str(error)

    def test_none(self):
        """A message without control headers is returned as it was (the same object)."""
        data = message()
        controls, out = readControls(data)
        self.assertEqual(controls, Controls())
        self.assertIs(out, data)

    def test_ours(self):
        """Our four headers are read into Controls and removed; folded values are unfolded."""
        controls, out = self.read(
            "X-SmartRelay-Track: opens, clicks",
            "X-SmartRelay-Tag: password-reset",
            "X-SmartRelay-Unsubscribe: off",
            "X-SmartRelay-Metadata-User-ID: 4711",
            "X-SmartRelay-Metadata-plan: gold\r\n plus",
        )
        self.assertEqual(
            controls,
            Controls(opens=True, clicks=True, unsubscribe=False, tag="password-reset",
                     metadata={"user-id": "4711", "plan": "gold plus"}),
        )
        self.assertEqual(out, message())

    def test_trackNone(self):
        """X-SmartRelay-Track: none turns off both opens and clicks."""
        controls, _ = self.read("X-SmartRelay-Track: none")
        self.assertEqual((controls.opens, controls.clicks), (False, False))

    def test_bodyUntouched(self):
        """Only the header section is read: the same text in the body stays."""
        _, out = self.read("X-SmartRelay-Tag: t")
        self.assertTrue(out.endswith(BODY))

    def test_encodedMetadata(self):
        """RFC 2047 encoded words in a metadata value are decoded."""
        controls, _ = self.read("X-SmartRelay-Metadata-name: =?utf-8?q?J=C3=BCrgen?=")
        self.assertEqual(controls.metadata, {"name": "J\u00fcrgen"})

    def test_mailgun(self):
        """Mailgun's headers map to ours; tags after the first become metadata."""
        controls, out = self.read(
            "X-Mailgun-Track: yes",
            "X-Mailgun-Track-Clicks: no",
            "X-Mailgun-Tag: welcome",
            "X-Mailgun-Tag: onboarding",
        )
        self.assertEqual(
            controls,
            Controls(opens=True, clicks=False, tag="welcome",
                     metadata={"mailgun-tag-2": "onboarding"}),
        )
        self.assertNotIn(b"Mailgun", out)

    def test_postmark(self):
        """Postmark's tag and tracking headers map to ours and are removed."""
        controls, out = self.read(
            "X-PM-Tag: invoice", "X-PM-TrackOpens: true", "X-PM-TrackLinks: HtmlOnly"
        )
        self.assertEqual(controls, Controls(opens=True, clicks=True, tag="invoice"))
        self.assertNotIn(b"X-PM", out)
        controls, _ = self.read("X-PM-TrackLinks: None")
        self.assertFalse(controls.clicks)

    def test_ses(self):
        """X-SES-MESSAGE-TAGS pairs become metadata with lower-cased names."""
        controls, out = self.read("X-SES-MESSAGE-TAGS: campaign=spring, Team=growth")
        self.assertEqual(controls.metadata, {"campaign": "spring", "team": "growth"})
        self.assertNotIn(b"X-SES", out)

    def test_oursWin(self):
        """Our header overrides a provider's header for the same thing."""
        controls, _ = self.read("X-Mailgun-Track-Opens: yes", "X-SmartRelay-Track: clicks",
                                "X-PM-Tag: theirs", "X-SmartRelay-Tag: ours")
        self.assertEqual((controls.opens, controls.clicks, controls.tag), (False, True, "ours"))

    def test_otherHeadersKept(self):
        """X-SmartRelay-SMS-From (the SMS issue's) and unrelated X- headers stay."""
        _, out = self.read("X-SmartRelay-SMS-From: Shop", "X-Other: 1", "X-SmartRelay-Tag: t")
        self.assertIn(b"X-SmartRelay-SMS-From: Shop\r\n", out)
        self.assertIn(b"X-Other: 1\r\n", out)
        self.assertNotIn(b"X-SmartRelay-Tag: t\r\n", out)

    def test_badTrack(self):
        """An unknown X-SmartRelay-Track word is refused, naming the header and the value."""
        text = self.refused("X-SmartRelay-Track: everything")
        self.assertIn("X-SmartRelay-Track", text)
        self.assertIn("'everything'", text)

    def test_badTag(self):
        """A tag outside the allowed characters is refused, ours or a provider's."""
        self.assertIn("X-SmartRelay-Tag", self.refused("X-SmartRelay-Tag: two words"))
        self.assertIn("X-PM-Tag", self.refused("X-PM-Tag: -dash-first"))

    def test_badUnsubscribe(self):
        """X-SmartRelay-Unsubscribe takes on/off (yes/no, true/false) only."""
        self.assertIn("X-SmartRelay-Unsubscribe", self.refused("X-SmartRelay-Unsubscribe: maybe"))

    def test_badProviderValues(self):
        """Bad values in the providers' headers are refused too, naming them."""
        self.assertIn("X-Mailgun-Track", self.refused("X-Mailgun-Track: sometimes"))
        self.assertIn("X-PM-TrackLinks", self.refused("X-PM-TrackLinks: Always"))
        self.assertIn("X-SES-MESSAGE-TAGS", self.refused("X-SES-MESSAGE-TAGS: novalue"))

    def test_badMetadata(self):
        """Bad metadata keys, over-long values and too many keys are refused."""
        self.assertIn("Metadata", self.refused("X-SmartRelay-Metadata-: x"))
        self.assertIn("longer than", self.refused("X-SmartRelay-Metadata-k: " + "x" * 1001))
        many = [f"X-SmartRelay-Metadata-k{i}: v" for i in range(21)]
        self.assertIn("more than 20", self.refused(*many))

    def test_typedError(self):
        """
        A bad value raises L{InvalidControlHeader} with the header as the
        message spelled it and the reason, not an SMTP reply: what to
        answer is the submission policy's decision.
        """
        error = self.assertRaises(
            InvalidControlHeader, readControls, message("x-smartrelay-TRACK: always")
        )
        self.assertEqual(error.header, "x-smartrelay-TRACK")
        self.assertEqual(
            error.reason, "expected 'opens', 'clicks', 'opens,clicks' or 'none', got 'always'"
        )
        self.assertIsInstance(error, ValueError)
        self.assertNotIsInstance(error, SMTPReply)

    def test_twice(self):
        """One of our headers given twice is refused."""
        self.assertIn("more than once", self.refused("X-SmartRelay-Tag: a", "X-SmartRelay-Tag: b"))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400))
    def test_neverCrashes(self, data):
        """Any bytes: either an InvalidControlHeader or (controls, bytes)."""
        try:
            controls, out = readControls(data)
        except InvalidControlHeader as e:
            self.assertTrue(e.header and e.reason)
        else:
            self.assertIsInstance(controls, Controls)
            self.assertLessEqual(len(out), len(data))

    @settings(max_examples=100, deadline=None)
    @given(
        tag=st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True),
        meta=st.dictionaries(
            st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True),
            st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30),
            max_size=5,
        ),
    )
    def test_roundTrip(self, tag, meta):
        """Any valid tag and metadata read back as given and leave the message as without them."""
        headers = [f"X-SmartRelay-Tag: {tag}"] + [
            f"X-SmartRelay-Metadata-{k}: {v}" for k, v in meta.items()
        ]
        controls, out = readControls(message(*headers))
        self.assertEqual((controls.tag, controls.metadata), (tag, meta))
        self.assertEqual(out, message())
