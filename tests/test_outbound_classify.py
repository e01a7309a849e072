"""
Tests for L{smartrelay.outbound.classify}.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.outbound.classify import REASONS, classify

CASES = [
    ("5.1.1", "<bob@example.com>: Recipient address rejected: User unknown", "userunknown"),
    ("5.1.0", "Address rejected: no such user", "userunknown"),
    (None, "mailbox unavailable: user does not exist", "userunknown"),
    ("5.1.1", "The email account that you tried to reach does not exist.", "userunknown"),
    ("5.2.2", "mailbox full", "mailboxfull"),
    ("4.2.2", "The email account that you tried to reach is over quota", "mailboxfull"),
    ("5.1.2", "bad destination system", "hostunknown"),
    ("5.1.10", "Recipient address has null MX", "hostunknown"),
    ("5.3.4", "Message too big for system", "mesgtoobig"),
    (None, "message size exceeds fixed maximum message size", "mesgtoobig"),
    ("5.7.1", "Message rejected as spam by Content Filtering", "spamdetected"),
    ("5.7.1", "Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org", "blocked"),
    ("5.7.1", "Your IP is listed on a spam blocklist", "blocked"),
    ("5.7.1", "Delivery not authorized, message refused", "policyviolation"),
    ("5.7.26", "Unauthenticated email is not accepted (DMARC policy)", "policyviolation"),
    ("5.2.1", "The email account that you tried to reach is disabled", "suspend"),
    ("5.7.0", "Message filtered", "filtered"),
    ("5.3.0", "Other mail system problem", "systemerror"),
    ("5.4.6", "routing loop detected", "networkerror"),
    ("5.0.0", "rejected for unknown reasons", "rejected"),
    (None, "", "rejected"),
]


class ClassifyTests(SynchronousTestCase):
    """
    L{classify} maps (status, text) to a Sisimai-style reason.
    """

    def test_table(self):
        """Typical real-world replies get the expected reason."""
        for status, text, reason in CASES:
            self.assertEqual(classify(status, text), reason, (status, text))

    @given(st.one_of(st.none(), st.text(max_size=12)), st.text(max_size=80))
    def test_total(self, status, text):
        """Any input yields a known reason and never raises."""
        self.assertIn(classify(status, text), REASONS)
