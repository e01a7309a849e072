"""
Tests for L{smartrelay.feedback.report}: reading DSNs, bounces in words,
ARF complaints, auto-replies and unsubscribe mail.  Every sample here is
written for these tests.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.feedback.records import REPORT_TYPES, FeedbackRecord, Report
from smartrelay.feedback.report import queueIdIn, readReport

QUEUE_ID = "3A/7F-00042-0BADC0DE"


def message(*lines: str) -> bytes:
    """
    @return: C{lines} joined with CRLF, as bytes.
    """
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def dsn(perRecipient: str, text: str = "Your message could not be delivered.", returned: str = "") -> bytes:
    """
    @return: an RFC 3464 report with the given per-recipient fields
        (LF-separated), human text and returned headers.
    """
    returned = returned or (
        "From: sender@shop.example\nTo: someone@example.net\nSubject: Your order\n"
        f"X-SmartRelay-ID: {QUEUE_ID}\nMessage-ID: <1@shop.example>\n"
    )
    body = (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\n"
        "To: bounce+abc@bounces.shop.example\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="BB"\n'
        "\n"
        "--BB\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        f"{text}\n"
        "\n"
        "--BB\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        "Reporting-MTA: dns; mx.example.net\n"
        "Arrival-Date: Mon, 7 Dec 2026 01:02:03 +0000\n"
        "\n"
        f"{perRecipient}\n"
        "\n"
        "--BB\n"
        "Content-Type: text/rfc822-headers\n"
        "\n"
        f"{returned}"
        "--BB--\n"
    )
    return body.replace("\n", "\r\n").encode("utf-8")


class DeliveryStatusTests(SynchronousTestCase):
    """
    RFC 3464 reports.
    """

    def test_oneRecipient(self):
        """
        A DSN with one failed recipient gives one hard bounce record with
        its status, reply code, diagnostic, remote MTA and the returned
        message's queue id.
        """
        report = readReport(
            dsn(
                "Final-Recipient: rfc822; gone@Example.NET\n"
                "Original-Recipient: rfc822;gone@example.net\n"
                "Action: failed\n"
                "Status: 5.1.1\n"
                "Remote-MTA: dns; mx1.example.net\n"
                "Diagnostic-Code: smtp; 550 5.1.1 <gone@example.net>: Recipient address\n"
                "    rejected: User unknown in virtual mailbox table"
            )
        )
        self.assertEqual(report.type, "bounce")
        [record] = report.records
        self.assertEqual(record.recipient, "gone@example.net")
        self.assertEqual(record.action, "failed")
        self.assertEqual(record.status, "5.1.1")
        self.assertEqual(record.replycode, 550)
        self.assertEqual(record.remote, "mx1.example.net")
        self.assertEqual(record.queue_id, QUEUE_ID)
        self.assertEqual(record.kind, "hard")
        self.assertEqual(record.reason, "userunknown")
        self.assertIn("User unknown in virtual mailbox table", record.diagnostic)

    def test_severalRecipientsInOrder(self):
        """
        Each per-recipient group is one record, in the order of the report,
        also when an MTA leaves out the blank line between groups.
        """
        report = readReport(
            dsn(
                "Final-Recipient: rfc822; first@example.net\n"
                "Action: failed\n"
                "Status: 5.2.2\n"
                "Diagnostic-Code: smtp; 552 5.2.2 Mailbox full\n"
                "Final-Recipient: rfc822; second@example.org\n"
                "Action: failed\n"
                "Status: 5.1.1\n"
                "Diagnostic-Code: smtp; 550 5.1.1 No such user\n"
                "\n"
                "Final-Recipient: rfc822; third@example.com\n"
                "Action: failed\n"
                "Status: 5.4.4\n"
            )
        )
        self.assertEqual(
            [r.recipient for r in report.records],
            ["first@example.net", "second@example.org", "third@example.com"],
        )
        self.assertEqual([r.status for r in report.records], ["5.2.2", "5.1.1", "5.4.4"])

    def test_delayed(self):
        """
        C{Action: delayed} is a soft record with action delayed, not a
        failure.
        """
        report = readReport(
            dsn(
                "Final-Recipient: rfc822; slow@example.net\n"
                "Action: delayed\n"
                "Status: 4.4.1\n"
                "Will-Retry-Until: Fri, 11 Dec 2026 01:02:03 +0000",
                text="Delivery to the following recipient has been delayed: slow@example.net",
            )
        )
        [record] = report.records
        self.assertEqual((record.action, record.kind), ("delayed", "soft"))

    def test_queueIdInText(self):
        """
        L{queueIdIn} finds the id in a returned header block and not in a
        value of the wrong shape.
        """
        self.assertEqual(queueIdIn(b"X-SmartRelay-ID: " + QUEUE_ID.encode() + b"\r\n"), QUEUE_ID)
        self.assertIsNone(queueIdIn(b"X-SmartRelay-ID: 3A/7F-42-0BADC0DE\r\n"))


class ComplaintTests(SynchronousTestCase):
    """
    ARF reports.
    """

    def test_arf(self):
        """
        A feedback report gives a complaint with the feedback type, the
        original recipient, the source IP and the user agent.
        """
        data = message(
            "From: staff@fbl.example.com",
            "To: fbl@bounces.shop.example",
            "Subject: FW: Your order",
            "MIME-Version: 1.0",
            'Content-Type: multipart/report; report-type=feedback-report; boundary="F"',
            "",
            "--F",
            "Content-Type: text/plain",
            "",
            "This is an email abuse report for an email message received from IP 192.0.2.7.",
            "--F",
            "Content-Type: message/feedback-report",
            "",
            "Feedback-Type: abuse",
            "User-Agent: ExampleFBL/1.0",
            "Version: 1",
            "Original-Mail-From: <bounce+abc@bounces.shop.example>",
            "Original-Rcpt-To: <Reader@Example.COM>",
            "Source-IP: 192.0.2.7",
            "Arrival-Date: Mon, 7 Dec 2026 01:02:03 +0000",
            "--F",
            "Content-Type: message/rfc822",
            "",
            "From: sender@shop.example",
            "To: reader@example.com",
            f"X-SmartRelay-ID: {QUEUE_ID}",
            "Subject: Your order",
            "",
            "Hello",
            "--F--",
        )
        report = readReport(data)
        self.assertEqual(report.type, "complaint")
        [record] = report.records
        self.assertEqual(record.recipient, "Reader@example.com")
        self.assertEqual(record.feedback_type, "abuse")
        self.assertEqual(record.reason, "feedback")
        self.assertEqual(record.source_ip, "192.0.2.7")
        self.assertEqual(record.user_agent, "ExampleFBL/1.0")
        self.assertEqual(record.queue_id, QUEUE_ID)
        self.assertIsNone(record.kind)


class AutoReplyTests(SynchronousTestCase):
    """
    RFC 3834 auto-replies.
    """

    def test_autoSubmitted(self):
        """
        C{Auto-Submitted: auto-replied} makes an auto-reply from the sender
        of the reply, never a bounce.
        """
        report = readReport(
            message(
                "From: Reader <reader@example.com>",
                "To: sender@shop.example",
                "Subject: Re: Your order",
                "Auto-Submitted: auto-replied",
                "",
                "I am out of the office until Monday; your message could not be read.",
            )
        )
        self.assertEqual(report.type, "autoreply")
        [record] = report.records
        self.assertEqual((record.recipient, record.reason), ("reader@example.com", "vacation"))


class RobustnessTests(SynchronousTestCase):
    """
    Whatever the input, L{readReport} returns a L{Report}.
    """

    def assertValid(self, report):
        self.assertIsInstance(report, Report)
        self.assertIn(report.type, REPORT_TYPES)
        for record in report.records:
            self.assertIsInstance(record, FeedbackRecord)
            self.assertIn(record.kind, (None, "hard", "soft"))
        if report.type == "none":
            self.assertEqual(report.records, ())

    def test_notMail(self):
        """
        Empty input, binary junk and plain mail are no report.
        """
        for data in (b"", b"\x00\xff" * 100, message("From: a@example.com", "Subject: hi", "", "hello")):
            self.assertEqual(readReport(data), Report("none"))

    @given(st.binary(max_size=2000))
    def test_arbitraryBytes(self, data):
        """
        Arbitrary bytes never make L{readReport} raise.
        """
        self.assertValid(readReport(data))
