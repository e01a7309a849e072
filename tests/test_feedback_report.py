"""
Tests for L{smartrelay.feedback.report}: reading DSNs, bounces in words,
ARF complaints, auto-replies and unsubscribe mail.  Every sample here is
written for these tests.
"""

import base64
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.feedback.records import REPORT_TYPES, FeedbackRecord, Report
from smartrelay.feedback.report import queueIdIn, readReport, splitMailbox

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

    def test_reportingHostNamesProvider(self):
        """
        A DSN with no Remote-MTA is read in the words of the provider its
        Reporting-MTA names: Outlook.com's "mailbox unavailable" is an
        unknown user, which from an unknown host it is not.
        """
        group = (
            "Final-Recipient: rfc822; gone@example.org\n"
            "Action: failed\n"
            "Status: 5.5.0\n"
            "Diagnostic-Code: smtp; 550 Requested action not taken: mailbox unavailable"
        )
        [other] = readReport(dsn(group)).records
        self.assertEqual(other.reason, "filtered")
        raw = dsn(group).replace(b"Reporting-MTA: dns; mx.example.net", b"Reporting-MTA: dns; BAY004-MC1F2.hotmail.com")
        [record] = readReport(raw).records
        self.assertEqual((record.reason, record.kind), ("userunknown", "hard"))

    def test_reporterFromReceived(self):
        """
        Without a Reporting-MTA the report's writer is the host of its
        oldest Received field, else its From domain; the Reporting-MTA
        wins when there is one.
        """
        from smartrelay.feedback.bounces import reporterOf
        from smartrelay.feedback.mailtext import Headers
        from smartrelay.feedback.mimescan import parse

        head = Headers(
            parse(
                message(
                    "Received: from relay.example.com by mx.shop.example; Mon, 7 Dec 2026 01:02:03 +0000",
                    "Received: from [127.0.0.1] by SNT004-MC2F2.hotmail.com with Microsoft SMTPSVC;",
                    " Mon, 7 Dec 2026 01:02:00 +0000",
                    "From: postmaster@outlook.example",
                    "",
                    "body",
                )
            )
        )
        self.assertEqual(reporterOf(head), "snt004-mc2f2.hotmail.com")
        self.assertEqual(reporterOf(head, {"reporting-mta": "dns; mx.example.net"}), "mx.example.net")
        bare = Headers(parse(message("From: MAILER-DAEMON@Mail.Example.ORG", "", "body")))
        self.assertEqual(reporterOf(bare), "mail.example.org")
        self.assertIsNone(reporterOf(Headers(parse(message("Subject: x", "", "body")))))

    def test_commandFromReportText(self):
        """
        The SMTP command the report's words give for a recipient (Postfix's
        "refused to talk to me", folded over lines) counts when the
        Diagnostic-Code names none: a refusal at the greeting is a block.
        """
        report = readReport(
            dsn(
                "Final-Recipient: rfc822; someone@example.org\n"
                "Action: failed\n"
                "Status: 5.5.0\n"
                "Diagnostic-Code: smtp; 550 5.5.0 Service refused, please try later.",
                text="<someone@example.org>: host mx.example.org[192.0.2.1] refused to\n"
                "    talk to me: 550 5.5.0 Service refused, please try later.",
            )
        )
        [record] = report.records
        self.assertEqual(record.reason, "blocked")

    def test_multilineReplyFromTranscript(self):
        """
        A Diagnostic-Code that is only the first line of a multi-line
        reply ("550-5.7.1 ...") is completed from the transcript quoted in
        the report's words; without a transcript it stays as it is.
        """
        group = (
            "Final-Recipient: rfc822; someone@example.org\n"
            "Action: failed\n"
            "Status: 5.7.1\n"
            "Diagnostic-Code: smtp; 550-5.7.1 [192.0.2.1   13] Messages with multiple addresses in From:"
        )
        transcript = (
            "   ----- Transcript of session follows -----\n"
            "... while talking to mx.example.org.:\n"
            ">>> DATA\n"
            "<<< 550-5.7.1 [192.0.2.1   13] Messages with multiple addresses in From:\n"
            "<<< 550 5.7.1 header are not accepted. abc123 - gsmtp\n"
            "554 5.0.0 Service unavailable"
        )
        [record] = readReport(dsn(group, text=transcript)).records
        self.assertEqual(
            record.diagnostic,
            "550-5.7.1 [192.0.2.1 13] Messages with multiple addresses in From: 550 5.7.1 header are not accepted."
            " abc123 - gsmtp",
        )
        self.assertEqual(record.reason, "notcompliantrfc")
        [alone] = readReport(dsn(group)).records
        self.assertEqual(alone.diagnostic, "550-5.7.1 [192.0.2.1 13] Messages with multiple addresses in From:")

    def test_queueIdInText(self):
        """
        L{queueIdIn} finds the id in a returned header block and not in a
        value of the wrong shape.
        """
        self.assertEqual(queueIdIn(b"X-SmartRelay-ID: " + QUEUE_ID.encode() + b"\r\n"), QUEUE_ID)
        self.assertIsNone(queueIdIn(b"X-SmartRelay-ID: 3A/7F-42-0BADC0DE\r\n"))
        self.assertEqual(queueIdIn(b"> x-smartrelay-id: " + QUEUE_ID.lower().encode() + b"\r\n"), QUEUE_ID)


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


    def test_recipientFromEmbeddedMessage(self):
        """
        Without C{Original-Rcpt-To}, the complaint is about the embedded
        message's C{To}; C{opt-out} is kept as the feedback type.
        """
        data = message(
            "From: fbl@isp.example",
            'Content-Type: multipart/report; report-type=feedback-report; boundary="F"',
            "",
            "--F",
            "Content-Type: message/feedback-report",
            "",
            "Feedback-Type: opt-out",
            "Version: 1",
            "--F",
            "Content-Type: text/rfc822-headers",
            "",
            "From: news@shop.example",
            "To: Someone <someone@isp.example>",
            "--F--",
        )
        [record] = readReport(data).records
        self.assertEqual((record.recipient, record.feedback_type), ("someone@isp.example", "opt-out"))

    def test_jmrp(self):
        """
        A Microsoft JMRP report: ARF, no Original-Rcpt-To, the mailbox in
        the returned message's C{X-HmXmrOriginalRecipient}.
        """
        data = message(
            "From: staff@hotmail.example",
            'Content-Type: multipart/report; report-type=feedback-report; boundary="J"',
            "",
            "--J",
            "Content-Type: message/feedback-report",
            "",
            "Feedback-Type: abuse",
            "User-Agent: Microsoft Junk Mail Reporting Program",
            "Version: 1",
            "--J",
            "Content-Type: message/rfc822",
            "",
            "X-HmXmrOriginalRecipient: <reader@outlook.example>",
            "From: news@shop.example",
            "To: list@shop.example",
            f"X-SmartRelay-ID: {QUEUE_ID}",
            "",
            "hi",
            "--J--",
        )
        [record] = readReport(data).records
        self.assertEqual(
            (record.recipient, record.feedback_type, record.user_agent, record.queue_id),
            ("reader@outlook.example", "abuse", "Microsoft Junk Mail Reporting Program", QUEUE_ID),
        )

    def test_hotmailForm(self):
        """
        A Hotmail / JMRP report without a feedback-report part: the
        complained-about message attached, its recipient in
        C{X-HmXmrOriginalRecipient}.
        """
        data = message(
            "From: staff@hotmail.example",
            "Subject: complaint about message from 192.0.2.9",
            'Content-Type: multipart/mixed; boundary="H"',
            "",
            "--H",
            "Content-Type: text/plain",
            "",
            "This is a complaint.",
            "--H",
            "Content-Type: message/rfc822",
            "",
            "X-HmXmrOriginalRecipient: <reader@hotmail.example>",
            "From: news@shop.example",
            "To: undisclosed-recipients:;",
            "",
            "hi",
            "--H--",
        )
        report = readReport(data)
        self.assertEqual(report.type, "complaint")
        self.assertEqual([r.recipient for r in report.records], ["reader@hotmail.example"])


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


def textBounce(headers: str, body: str) -> bytes:
    """
    @return: a single-part message with the given header lines and body
        (LF-separated), CRLF line breaks.
    """
    return (headers.strip("\n") + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")


class TextBounceTests(SynchronousTestCase):
    """
    Bounces in words, as MTAs write them without (or beside) a DSN part.
    """


    def test_lastRecipientEndsWithItsParagraph(self):
        """
        The last recipient's words end with the paragraph holding its
        server's reply: a second copy of the list below (another
        language's) does not run into its diagnostic.
        """
        listing = (
            "  full@example.jp\n"
            "    SMTP error from remote mail server after RCPT TO:<full@example.jp>:\n"
            "    host mx.example.jp [192.0.2.12]: 550 5.2.2 <full@example.jp>... Mailbox Full\n"
            "  gone@example.jp\n"
            "    SMTP error from remote mail server after RCPT TO:<gone@example.jp>:\n"
            "    host mx.example.jp [192.0.2.12]: 550 5.1.1 <gone@example.jp>... User Unknown\n"
        )
        body = (
            "Your message could not be delivered to one or more recipients:\n\n" + listing + "\n"
            "Please check the addresses.\n\n"
            "This message was created automatically by mail delivery software.\n"
            "The following address(es) failed:\n\n" + listing
        )
        report = readReport(
            textBounce("From: Mail Delivery System <MAILER-DAEMON@mx.example.ru>\nSubject: Mail failure.", body)
        )
        self.assertEqual(
            [(r.recipient, r.reason) for r in report.records],
            [("full@example.jp", "mailboxfull"), ("gone@example.jp", "userunknown")],
        )
        self.assertNotIn("Please check", report.records[1].diagnostic)

    def test_googleWorkspaceNotice(self):
        """
        A Google Workspace notice whose words name no address is about the
        returned message's recipient, not its X-Failed-Recipients; a
        notice that names its address keeps that one.
        """
        def notice(words: str) -> bytes:
            return message(
                "From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>",
                "To: sender@shop.example",
                "Subject: Delivery Status Notification (Failure)",
                "X-Failed-Recipients: group@groups.example.com",
                "MIME-Version: 1.0",
                'Content-Type: multipart/report; report-type=delivery-status; boundary="G"',
                "",
                "--G",
                "Content-Type: text/plain",
                "",
                words,
                "--G",
                "Content-Type: message/delivery-status",
                "",
                "",
                "--G",
                "Content-Type: message/rfc822",
                "",
                "From: <sender@shop.example>",
                "To: <reader@example.co.jp>",
                "Subject: Hello",
                "",
                "Hello",
                "--G--",
            )

        [record] = readReport(
            notice("** Message not delivered **\r\n\r\nThe response was:\r\n\r\n550 Smtp server does not advertise AUTH")
        ).records
        self.assertEqual(record.recipient, "reader@example.co.jp")
        [named] = readReport(
            notice("** Address not found **\r\n\r\nYour message wasn't delivered to group@groups.example.com.")
        ).records
        self.assertEqual(named.recipient, "group@groups.example.com")

    def test_mailingListNotice(self):
        """
        An fml notice (known by X-MLServer, an -admin@ sender and its
        Message-ID) names the list that refused in angle brackets: one
        record for it, read by fml's own words, else by its Subject; the
        returned message after "Original mail as follows:" names none.
        """
        headers = (
            "From: shop-list-admin@lists.example.org\n"
            "To: sender@shop.example\n"
            "Subject: Loop Alert: something (shop-list ML)\n"
            "Message-ID: <202612070102.FMLAAAAAA0.shop-list@lists.example.org>\n"
            "X-MLServer: fml [fml 4.0.3 release (20011202/4.0.3)]"
        )
        body = (
            "You are not a member of this mailing list <shop-list@lists.example.org>.\n\n"
            "Original mail as follows:\n\n   To: <other@example.net>\n"
        )
        report = readReport(textBounce(headers, body))
        self.assertEqual(report.type, "bounce")
        [record] = report.records
        self.assertEqual((record.recipient, record.reason, record.kind), ("shop-list@lists.example.org", "rejected", "soft"))
        [bySubject] = readReport(textBounce(headers, "Something odd about <shop-list@lists.example.org>.\n")).records
        self.assertEqual(bySubject.reason, "systemerror")
        plain = headers.replace("X-MLServer", "X-Mailer")
        self.assertEqual(readReport(textBounce(plain, body)).type, "none")

    def test_reportingProgramsOwnWords(self):
        """
        A program known by its header (InterScan MSS here) gives its own
        reason: "Unable to deliver message to" is an unknown user from it,
        and nothing from an unknown writer.
        """
        body = (
            "Reason: Unable to deliver message to <gone@example.jp> (and other recipients in the same domain).\n"
        )
        [record] = readReport(
            textBounce(
                'From: postmaster@mx.example.jp ("InterScan Notification")\n'
                "To: bounce@shop.example\nSubject: Mail could not be delivered",
                body,
            )
        ).records
        self.assertEqual((record.recipient, record.reason, record.kind), ("gone@example.jp", "userunknown", "hard"))
        [other] = readReport(
            textBounce("From: MAILER-DAEMON@mx.example.jp\nTo: bounce@shop.example\nSubject: Returned mail", body)
        ).records
        self.assertNotEqual(other.reason, "userunknown")

    def assertRecords(self, report, expected):
        """
        C{report} is a bounce whose records have the expected
        C{(recipient, status, replycode, kind)}.
        """
        self.assertEqual(report.type, "bounce")
        self.assertEqual(
            [(r.recipient, r.status, r.replycode, r.kind) for r in report.records], expected
        )

    def test_eximTwoRecipients(self):
        """
        An Exim bounce names each failed address on a line of its own with
        the remote server's reply below it; the returned message after the
        marker line is not read for recipients.
        """
        report = readReport(
            textBounce(
                "From: Mail Delivery System <Mailer-Daemon@relay.example.org>\n"
                "To: news@shop.example\n"
                "Subject: Mail delivery failed: returning message to sender\n"
                "X-Failed-Recipients: anna@example.net, bob@example.com\n"
                "Auto-Submitted: auto-replied\n",
                "This message was created automatically by mail delivery software.\n\n"
                "A message that you sent could not be delivered to one or more of its\n"
                "recipients. This is a permanent error. The following address(es) failed:\n\n"
                "  anna@example.net\n"
                "    host mx.example.net [192.0.2.10]\n"
                "    SMTP error from remote mail server after RCPT TO:<anna@example.net>:\n"
                "    550 5.1.1 <anna@example.net>: Recipient address rejected: User unknown\n"
                "  bob@example.com\n"
                "    host mx.example.com [192.0.2.20]\n"
                "    SMTP error from remote mail server after RCPT TO:<bob@example.com>:\n"
                "    552 5.2.2 Mailbox full\n\n"
                "------ This is a copy of the message, including all the headers. ------\n\n"
                "Return-path: <news@shop.example>\n"
                "From: news@shop.example\n"
                "To: anna@example.net, carol@example.org\n"
                f"X-SmartRelay-ID: {QUEUE_ID}\n"
                "Subject: News\n\n"
                "Write to carol@example.org.\n",
            )
        )
        self.assertRecords(
            report,
            [("anna@example.net", "5.1.1", 550, "hard"), ("bob@example.com", "5.2.2", 552, "soft")],
        )
        self.assertEqual([r.remote for r in report.records], ["mx.example.net", "mx.example.com"])
        self.assertEqual({r.queue_id for r in report.records}, {QUEUE_ID})
        self.assertEqual({r.reason for r in report.records}, {"userunknown", "mailboxfull"})

    def test_qmail(self):
        """
        qmail writes C{<address>:} and the remote host's words below it.
        """
        report = readReport(
            textBounce(
                "From: MAILER-DAEMON@mail.example.net\nTo: news@shop.example\n"
                "Subject: failure notice\n",
                "Hi. This is the qmail-send program at mail.example.net.\n"
                "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
                "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
                "<gone@example.org>:\n"
                "192.0.2.30 does not like recipient.\n"
                "Remote host said: 550 5.1.1 <gone@example.org>: No such user\n"
                "Giving up on 192.0.2.30.\n\n"
                "--- Below this line is a copy of the message.\n\n"
                "Return-Path: <news@shop.example>\nTo: gone@example.org\n\nhello\n",
            )
        )
        self.assertRecords(report, [("gone@example.org", "5.1.1", 550, "hard")])

    def test_gmail(self):
        """
        Gmail's notice: the address indented after 'failed permanently',
        the other server's reply further down.
        """
        report = readReport(
            textBounce(
                "From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\n"
                "To: news@shop.example\nSubject: Delivery Status Notification (Failure)\n",
                "Delivery to the following recipient failed permanently:\n\n"
                "     nobody@example.jp\n\n"
                "Technical details of permanent failure:\n"
                "Google tried to deliver your message, but it was rejected by the server for "
                "the recipient domain example.jp by mx.example.jp. [192.0.2.40].\n\n"
                "The error that the other server returned was:\n"
                "550 5.1.1 <nobody@example.jp>... User Unknown\n\n"
                "----- Original message -----\n\n"
                "From: news@shop.example\nTo: nobody@example.jp\nSubject: hi\n\nhi\n",
            )
        )
        self.assertRecords(report, [("nobody@example.jp", "5.1.1", 550, "hard")])
        self.assertEqual(report.records[0].remote, "mx.example.jp")

    def test_office365(self):
        """
        An Exchange / Office 365 notice names the address as
        C{address<mailto:address>} and quotes the remote server's reply.
        """
        report = readReport(
            textBounce(
                "From: Microsoft Outlook <postmaster@contoso.example>\n"
                "To: news@shop.example\nSubject: Undeliverable: News\n",
                "Delivery has failed to these recipients or groups:\n\n"
                "ghost@contoso.example<mailto:ghost@contoso.example>\n"
                "The email address you entered couldn't be found.\n\n"
                "Diagnostic information for administrators:\n\n"
                "Generating server: AM0PR01MB0000.eurprd01.prod.example\n\n"
                "ghost@contoso.example\n"
                "Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; "
                "Recipient not found by SMTP address lookup'\n\n"
                "Original message headers:\n\n"
                "Received: from shop.example (192.0.2.50) by example with SMTP\n"
                "From: news@shop.example\nTo: ghost@contoso.example\n",
            )
        )
        self.assertRecords(report, [("ghost@contoso.example", "5.1.10", 550, "hard")])

    def test_sendmailTranscript(self):
        """
        A Sendmail bounce without a DSN part: the address after 'permanent
        fatal errors' and the transcript's reply.
        """
        report = readReport(
            textBounce(
                "From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.edu>\n"
                "To: news@shop.example\nSubject: Returned mail: see transcript for details\n",
                "The original message was received at Mon, 7 Dec 2026 01:02:03 +0900\n"
                "from shop.example [192.0.2.60]\n\n"
                "   ----- The following addresses had permanent fatal errors -----\n"
                "<left@example.edu>\n"
                "    (reason: 550 5.1.1 <left@example.edu>... User unknown)\n\n"
                "   ----- Transcript of session follows -----\n"
                "... while talking to mail.example.edu.:\n"
                ">>> RCPT To:<left@example.edu>\n"
                "<<< 550 5.1.1 <left@example.edu>... User unknown\n"
                "550 5.1.1 <left@example.edu>... User unknown\n\n"
                "   ----- Original message follows -----\n\n"
                "From: news@shop.example\nTo: left@example.edu\n",
            )
        )
        self.assertRecords(report, [("left@example.edu", "5.1.1", 550, "hard")])
        self.assertEqual(report.records[0].remote, "mail.example.edu")

    def test_transcriptExchangeAboveAddress(self):
        """
        In a Sendmail transcript the ">>> / <<<" exchange just above an
        address's own error line is that address's: the refused MAIL
        FROM reaches its diagnostic (and the classifier).
        """
        report = readReport(
            textBounce(
                "From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.com>\n"
                "To: news@shop.example\nSubject: Returned mail: Deferred\n",
                "   ----- Transcript of session follows -----\n"
                "While talking to mx.example.org:\n"
                ">>> MAIL From:<news@shop.example>\n"
                "<<< 421 mx.example.org relaying denied, go away\n"
                "554 <left@example.org>... Remote protocol error\n\n"
                "   ----- Unsent message follows -----\n"
                "From: news@shop.example\nTo: left@example.org\n",
            )
        )
        [record] = report.records
        self.assertEqual(record.recipient, "left@example.org")
        self.assertIn(">>> MAIL From:<news@shop.example>", record.diagnostic)

    def test_errorBeforeAddress(self):
        """
        A short notice that writes the error before the address keeps the
        error in the diagnostic.
        """
        report = readReport(
            textBounce(
                'From: "Postmaster" <postmaster@example.org>\nTo: news@shop.example\n'
                "Subject: Undeliverable Mail\n",
                "Mailbox full: filled@example.org\n\nOriginal message follows.\n\n"
                "From: news@shop.example\nTo: filled@example.org\n",
            )
        )
        [record] = report.records
        self.assertEqual(record.recipient, "filled@example.org")
        self.assertIn("Mailbox full", record.diagnostic)

    def test_mimecast(self):
        """
        Mimecast writes each address and each error line after "-- ".
        """
        report = readReport(
            textBounce(
                "From: Postmaster <postmaster@eu.mimecast.example>\nTo: news@shop.example\n"
                "Subject: [Postmaster] Email Delivery Failure\n",
                "An email that you attempted to send to the following address could not be delivered:\n"
                "-- ghost@corp.example\n\nThe problem appears to be :\n"
                "-- Recipient email address is possibly incorrect\n\nAdditional information follows :\n"
                "-- 5.4.1 Recipient address rejected: Access denied.\n",
            )
        )
        self.assertEqual([(r.recipient, r.status) for r in report.records], [("ghost@corp.example", "5.4.1")])

    def test_gmxQuotedAddress(self):
        """
        GMX quotes the address (C{"a@b":}) and names the host after
        C{host:}.
        """
        report = readReport(
            textBounce(
                'From: "Mail Delivery System" <mailer-daemon@gmx.example>\nTo: news@shop.example\n'
                "Subject: Mail delivery failed: returning message to sender\n",
                "A message that you sent could not be delivered to one or more of\nits recipients. "
                'The following address\nfailed:\n\n"ghost@example.de":\n\n'
                "SMTP error from remote server for RCPT TO command, host: mx.example.de (192.0.2.8) "
                "reason: 550 5.1.1 User unknown\n\n"
                "--- The header of the original message is following. ---\n\nFrom: news@shop.example\n",
            )
        )
        self.assertRecords(report, [("ghost@example.de", "5.1.1", 550, "hard")])
        self.assertEqual(report.records[0].remote, "mx.example.de")

    def test_exchangeHashReply(self):
        """
        Exchange 2007 writes the reply as C{#550 5.1.1 ...##}.
        """
        report = readReport(
            textBounce(
                "From: Microsoft Exchange <MicrosoftExchange329e71ec@corp.example>\n"
                "To: news@shop.example\nSubject: Undeliverable: News\n",
                "Delivery has failed to these recipients or groups:\n\nghost@corp.example\n"
                "The e-mail address you entered couldn't be found.\n\n"
                "Diagnostic information for administrators:\n\nGenerating server: mail.corp.example\n\n"
                "ghost@corp.example\n#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##\n\n"
                "Original message headers:\n\nFrom: news@shop.example\n",
            )
        )
        self.assertRecords(report, [("ghost@corp.example", "5.1.1", 550, "hard")])

    def test_postfixTextTwoRecipients(self):
        """
        Postfix's notice without its DSN part: each C{<address>: host ...
        said:} paragraph is one recipient, with its own reply and host.
        """
        report = readReport(
            textBounce(
                "From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\nTo: news@shop.example\n"
                "Subject: Undelivered Mail Returned to Sender\n",
                "This is the mail system at host mx.example.org.\n\n"
                "<ghost@example.net>: host mx.example.net[192.0.2.11] said: 550 5.1.1\n"
                "    <ghost@example.net>: Recipient address rejected: User unknown (in reply to\n"
                "    RCPT TO command)\n"
                "<full@example.com>: host mx.example.com[192.0.2.12] said: 452 4.2.2 Mailbox full\n"
                "    (in reply to RCPT TO command)\n",
            )
        )
        self.assertRecords(
            report, [("ghost@example.net", "5.1.1", 550, "hard"), ("full@example.com", "4.2.2", 452, "soft")]
        )
        self.assertEqual([r.remote for r in report.records], ["mx.example.net", "mx.example.com"])

    def test_delayWarning(self):
        """
        A warning that delivery is delayed and will be retried is a delayed,
        soft record.
        """
        report = readReport(
            textBounce(
                "From: Mail Delivery System <Mailer-Daemon@relay.example.org>\n"
                "To: news@shop.example\nSubject: Warning: message 1abc-000 delayed 24 hours\n",
                "This message was created automatically by mail delivery software.\n"
                "A message that you sent has not yet been delivered to one or more of its\n"
                "recipients after more than 24 hours on the queue on relay.example.org.\n\n"
                "  slow@example.net\n"
                "    host mx.example.net [192.0.2.70]: 451 4.4.1 Try again later\n\n"
                "No action is required on your part. Delivery attempts will continue for\n"
                "some time, and this warning may be repeated at intervals if the message\n"
                "remains undelivered.\n",
            )
        )
        [record] = report.records
        self.assertEqual((record.recipient, record.action, record.kind), ("slow@example.net", "delayed", "soft"))

    def test_postmasterInFooter(self):
        """
        A postmaster address on a line of its own in the notice's footer is
        no recipient when the notice names another; alone, it is one.
        """
        body = (
            "Hi. This is the qmail-send program at mail.example.net.\n\n"
            "<gone@example.org>:\nRemote host said: 550 5.1.1 No such user\n\n"
            "Questions? Write to\n  postmaster@mail.example.net\n"
        )
        headers = "From: MAILER-DAEMON@mail.example.net\nTo: news@shop.example\nSubject: failure notice\n"
        report = readReport(textBounce(headers, body))
        self.assertEqual([r.recipient for r in report.records], ["gone@example.org"])
        report = readReport(textBounce(headers, "<postmaster@example.org>:\n550 5.1.1 No such user\n"))
        self.assertEqual([r.recipient for r in report.records], ["postmaster@example.org"])

    def test_senderWroteToItself(self):
        """
        When the failed recipient is the report's own addressee (someone
        wrote to themselves), it is still found.
        """
        report = readReport(
            textBounce(
                "From: MAILER-DAEMON@mail.example.net\nTo: me@example.net\nSubject: failure notice\n",
                "Hi. This is the qmail-send program at mail.example.net.\n\n"
                "<me@example.net>:\nRemote host said: 552 Error: disk quota exceeded\n\n"
                "--- Below this line is a copy of the message.\n\nFrom: me@example.net\n",
            )
        )
        self.assertEqual([r.recipient for r in report.records], ["me@example.net"])


class DiagnosticTests(SynchronousTestCase):
    """
    What goes into a record's diagnostic when the report is terse.
    """

    def test_statusComment(self):
        """
        Without a Diagnostic-Code, the words after the status code are the
        diagnostic, not the delivery-status fields quoted in the text.
        """
        report = readReport(
            dsn(
                "Final-Recipient: rfc822; far@example.net\nAction: delayed\n"
                "Status: 4.4.3 (example.net: host name lookup failure)",
                text="Final-Recipient: rfc822; far@example.net\nAction: delayed",
            )
        )
        [record] = report.records
        self.assertEqual(record.diagnostic, "example.net: host name lookup failure")

    def test_wordsBesideAddress(self):
        """
        Words on the address's own line ("a@b [User unknown]") are kept.
        """
        report = readReport(
            textBounce(
                "From: MAILER-DAEMON@mx.example.org\nTo: news@shop.example\nSubject: Returned mail\n",
                "---The following addresses had delivery errors---\n\nwho@example.org [User unknown]\n",
            )
        )
        [record] = report.records
        self.assertEqual((record.recipient, record.diagnostic), ("who@example.org", "who@example.org [User unknown]"))

    def test_mislabelledCharset(self):
        """
        Text labelled ISO-2022-JP but written in EUC-JP is read as EUC-JP.
        """
        from smartrelay.feedback.mailtext import decodeBytes

        words = "送信できませんでした"
        self.assertEqual(decodeBytes(words.encode("euc_jp"), "ISO-2022-JP"), words)
        self.assertEqual(decodeBytes("café".encode("utf-8"), "us-ascii"), "café")
        self.assertEqual(decodeBytes(b"caf\xe9", "nonsense-charset"), "caf\ufffd")


class StructureTests(SynchronousTestCase):
    """
    Reports whose structure is bent: lost MIME headers, mailboxes,
    notifications as JSON.
    """

    def test_multipartWithoutHeader(self):
        """
        A body with boundary lines but no C{Content-Type} saying so is read
        as the multipart it is.
        """
        report = readReport(
            textBounce(
                "From: MAILER-DAEMON@mx.example.net\nTo: news@shop.example\n"
                "Subject: Returned mail: see transcript for details\n",
                "This is a MIME-encapsulated message\n\n--XYZ.1/mx\n\n"
                "The original message was received somewhere.\n\n"
                "--XYZ.1/mx\nContent-Type: message/delivery-status\n\n"
                "Reporting-MTA: dns; mx.example.net\n\n"
                "Final-Recipient: RFC822; lost@example.net\nAction: failed\nStatus: 5.1.1\n\n"
                "--XYZ.1/mx--\n",
            )
        )
        self.assertEqual([(r.recipient, r.status) for r in report.records], [("lost@example.net", "5.1.1")])

    def test_dsnFieldsWithoutBoundaries(self):
        """
        A multipart/report whose boundary lines were lost is read from its
        delivery-status fields.
        """
        report = readReport(
            textBounce(
                "From: MAILER-DAEMON@mx.example.net\nTo: news@shop.example\n"
                'Content-Type: multipart/report; report-type=delivery-status; boundary="gone"\n',
                "Your message could not be delivered.\n\nReporting-MTA: dns; mx.example.net\n"
                "Arrival-Date: Mon, 7 Dec 2026 01:02:03 +0000\n\n"
                "Final-Recipient: rfc822; lost@example.net\nAction: failed\nStatus: 5.2.2\n"
                "Diagnostic-Code: smtp; 552 5.2.2 Mailbox full\n",
            )
        )
        self.assertEqual([(r.recipient, r.status, r.replycode) for r in report.records], [("lost@example.net", "5.2.2", 552)])

    def test_mailbox(self):
        """
        L{splitMailbox} splits an mbox file at its From lines; other data
        is one message.
        """
        one = b"From MAILER-DAEMON Mon Dec  7 01:02:03 2026\nFrom: a@example.com\n\nbody\nFrom here on, text.\n"
        two = b"From MAILER-DAEMON Mon Dec  7 01:02:04 2026\nFrom: b@example.com\n\nbody\n"
        self.assertEqual(splitMailbox(one + two), [one.rstrip(b"\n"), two])
        self.assertEqual(splitMailbox(b"From: a@example.com\n\nx\n"), [b"From: a@example.com\n\nx\n"])

    def test_sesJSON(self):
        """
        An Amazon SES notification (here inside an SNS envelope) gives its
        bounced recipients with status and diagnostic, and its complaints.
        """
        bounce = json.dumps(
            {
                "notificationType": "Bounce",
                "bounce": {
                    "bounceType": "Permanent",
                    "bouncedRecipients": [
                        {"emailAddress": "gone@example.net", "action": "failed", "status": "5.1.1",
                         "diagnosticCode": "smtp; 550 5.1.1 user unknown"}
                    ],
                    "reportingMTA": "dsn; a1.smtp-out.example.com",
                },
            }
        )
        report = readReport(message("From: no-reply@sns.example.com", "Subject: AWS Notification", "",
                                    json.dumps({"Type": "Notification", "Message": bounce})))
        [record] = report.records
        self.assertEqual(
            (report.type, record.recipient, record.status, record.replycode, record.kind, record.remote),
            ("bounce", "gone@example.net", "5.1.1", 550, "hard", "a1.smtp-out.example.com"),
        )
        complaint = json.dumps(
            {"notificationType": "Complaint",
             "complaint": {"complainedRecipients": [{"emailAddress": "angry@example.com"}],
                           "complaintFeedbackType": "abuse", "userAgent": "ExampleFBL"}}
        )
        report = readReport(message("From: no-reply@sns.example.com", "", complaint))
        [record] = report.records
        self.assertEqual((report.type, record.recipient, record.feedback_type), ("complaint", "angry@example.com", "abuse"))

    def test_queueIdInEncodedMessage(self):
        """
        The queue id is found in a returned message sent base64-encoded.
        """
        inner = base64.b64encode(f"From: news@shop.example\r\nX-SmartRelay-ID: {QUEUE_ID}\r\n\r\nhi\r\n".encode()).decode()
        data = dsn("Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.1.1", returned="X-Dummy: 1\n")
        data = data.replace(b"Content-Type: text/rfc822-headers\r\n\r\nX-Dummy: 1\r\n",
                            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n" + inner.encode() + b"\r\n")
        self.assertEqual(readReport(data).records[0].queue_id, QUEUE_ID)


class AutoReplyMoreTests(SynchronousTestCase):
    """
    Auto-replies without RFC 3834 headers, and bounces that carry them.
    """

    def test_outOfOfficeSubject(self):
        """
        An out-of-office subject alone makes an auto-reply.
        """
        report = readReport(
            message("From: reader@example.com", "Subject: Out of Office: Your order", "",
                    "I am away until Monday.")
        )
        self.assertEqual([(r.type, r.recipient) for r in report.records], [("autoreply", "reader@example.com")])

    def test_nullSenderAutoReply(self):
        """
        An RFC 3834 reply sent with the null return path it recommends is
        still an auto-reply.
        """
        report = readReport(
            message("Return-Path: <>", "From: reader@example.com", "Subject: Automatic reply: News",
                    "Auto-Submitted: auto-replied", "", "Back on Monday.")
        )
        self.assertEqual(report.type, "autoreply")

    def test_autoReplyQuotingABounce(self):
        """
        An auto-reply whose subject and quoted text speak of a rejected
        delivery notification is still an auto-reply.
        """
        report = readReport(
            message("From: reader@example.com", "Subject: Automatic reply: Order notification rejected",
                    "Auto-Submitted: auto-replied", "", "I am away.",
                    "> Your message to pat@example.org could not be delivered.")
        )
        self.assertEqual([(r.type, r.recipient) for r in report.records], [("autoreply", "reader@example.com")])

    def test_bounceMarkedAutoReplied(self):
        """
        A bounce from the mail system that says C{Auto-Submitted:
        auto-replied} (as Exim's do) is a bounce.
        """
        report = readReport(
            textBounce(
                "From: Mail Delivery System <Mailer-Daemon@relay.example.org>\n"
                "To: news@shop.example\nSubject: Mail delivery failed\nAuto-Submitted: auto-replied\n",
                "The following address(es) failed:\n\n  gone@example.net\n    550 5.1.1 No such user\n",
            )
        )
        self.assertEqual([(r.type, r.recipient) for r in report.records], [("bounce", "gone@example.net")])


class UnsubscribeTests(SynchronousTestCase):
    """
    Mail to an C{unsub+TOKEN@} address.
    """

    def test_unsubscribe(self):
        """
        Whatever its content, mail addressed to C{unsub+TOKEN@} is an
        unsubscribe record for its sender.
        """
        report = readReport(
            message("From: Reader <Reader@Example.COM>", "To: <unsub+Zm9v_YmFy-1@bounces.shop.example>",
                    "Subject: unsubscribe", "", "")
        )
        self.assertEqual(report.type, "unsubscribe")
        self.assertEqual([(r.type, r.recipient) for r in report.records], [("unsubscribe", "Reader@example.com")])

    def test_deliveredTo(self):
        """
        The envelope address in C{Delivered-To} counts as well.
        """
        report = readReport(
            message("Delivered-To: unsub+abc@bounces.shop.example", "From: r@example.com", "To: list@shop.example", "", "x")
        )
        self.assertEqual(report.type, "unsubscribe")


_FIELD_NAMES = st.sampled_from(
    ["Final-Recipient", "Original-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
     "Reporting-MTA", "Feedback-Type", "Original-Rcpt-To", "Source-IP", "User-Agent", "X-Junk"]
)
_FIELD_VALUES = st.one_of(
    st.sampled_from(["rfc822; a@example.net", "failed", "delayed", "5.1.1", "4.4.7", "smtp; 550 5.1.1 no",
                     "dns; mx.example.net", "abuse", "<b@example.org>", "192.0.2.1", "", ";", "rfc822;"]),
    st.text(max_size=40).map(lambda text: text.replace("\r", " ").replace("\n", " ")),
)
_TYPES = st.sampled_from(
    ["text/plain", "text/html", "message/delivery-status", "message/feedback-report", "message/rfc822",
     "text/rfc822-headers", "message/global-delivery-status", "application/octet-stream"]
)


@st.composite
def mimeTrees(draw, depth=0):
    """
    A multipart/report (or other multipart) of random parts with random
    report fields, nested a little, with random transfer encodings and
    an occasional broken boundary.
    """
    if depth < 2 and draw(st.booleans()):
        boundary = draw(st.sampled_from(["B1", "b-2", "=_x", "very" * 20]))
        children = draw(st.lists(mimeTrees(depth + 1), max_size=4))
        kind = draw(st.sampled_from(["report; report-type=delivery-status", "report; report-type=feedback-report",
                                     "mixed", "alternative"]))
        header = f"Content-Type: multipart/{kind}; boundary=\"{boundary}\"\r\n"
        closing = draw(st.sampled_from([f"--{boundary}--\r\n", "", f"--{boundary}\r\n"]))
        body = "".join(f"--{boundary}\r\n{child}\r\n" for child in children) + closing
        return header + "\r\n" + body
    ctype = draw(_TYPES)
    encoding = draw(st.sampled_from(["7bit", "base64", "quoted-printable", "8bit"]))
    fields = draw(st.lists(st.tuples(_FIELD_NAMES, _FIELD_VALUES), max_size=8))
    blank = draw(st.sampled_from(["\r\n", "\r\n\r\n"]))
    body = blank.join(f"{name}: {value}" for name, value in fields)
    return f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n{body}\r\n"


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

    def test_personSaysNotDelivered(self):
        """
        A person's mail that says a message could not be delivered (and
        names an address) is no bounce: only software's words count.
        """
        report = readReport(
            message("From: Pat <pat@example.com>", "To: news@shop.example", "Subject: Re: your order", "",
                    "My mail to sam@example.org could not be delivered, can you check?")
        )
        self.assertEqual(report, Report("none"))

    def test_bounceSubjectInOtherLanguages(self):
        """
        A notice whose subject says it is a bounce in another language,
        from an address that is not the mail system's, is read.
        """
        for subject in ("Unzustellbar: News", "Non remis : News", "=?UTF-8?B?44Oh44O844Or44Ko44Op44O86YCa55+l?="):
            report = readReport(
                message("From: no-reply@isp.example", f"Subject: {subject}", "",
                        "<full@isp.example>:", "552 5.2.2 Mailbox full")
            )
            self.assertEqual([r.recipient for r in report.records], ["full@isp.example"], subject)

    @given(st.binary(max_size=2000))
    def test_arbitraryBytes(self, data):
        """
        Arbitrary bytes never make L{readReport} raise.
        """
        self.assertValid(readReport(data))

    @given(mimeTrees(), st.sampled_from(["", "From: MAILER-DAEMON@mx.example.net\r\nSubject: Undelivered\r\n",
                                          "From: a@example.com\r\nAuto-Submitted: auto-replied\r\n"]))
    def test_arbitraryMIMETrees(self, tree, header):
        """
        Random report-shaped MIME trees with random fields never make
        L{readReport} raise, and every record it returns is valid.
        """
        self.assertValid(readReport((header + tree).encode("utf-8", "surrogatepass")))

    def test_hugeHeader(self):
        """
        A message with a huge header, a field of a megabyte and deep nesting
        is read without error.
        """
        data = b"From: MAILER-DAEMON@x.example\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n"
        data += b"Content-Type: multipart/mixed; boundary=n\r\n\r\n" + b"--n\r\nContent-Type: multipart/mixed; boundary=n\r\n\r\n" * 200
        self.assertValid(readReport(data))

    def test_internalErrorIsNoReport(self):
        """
        Should reading fail inside (a bug), the message is no report and the
        failure is logged, never raised.
        """
        from smartrelay.feedback import report as module

        def broken(data, depth=0):
            raise RuntimeError("bug")

        self.patch(module, "_read", broken)
        self.assertEqual(readReport(b"From: a@example.com\r\n\r\nx"), Report("none"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class AddressTests(SynchronousTestCase):
    """
    L{smartrelay.feedback.mailtext.addresses}, which every reader uses.
    """

    def test_found(self):
        """
        Addresses are found in text with their offsets, the domain
        lower-cased, brackets and a final dot left out.
        """
        from smartrelay.feedback.mailtext import addressIn, addresses

        self.assertEqual(
            list(addresses("to <Foo.Bar+x@Mail.Example.COM>, y@z.example.")),
            [(4, "Foo.Bar+x@mail.example.com"), (33, "y@z.example")],
        )
        self.assertEqual(addressIn("no address here"), None)

    def test_quotedAndPaths(self):
        """
        A quoted local part is kept with its quotes; a mailbox path ending
        in an address gives the address.
        """
        from smartrelay.feedback.mailtext import addresses

        self.assertEqual(list(addresses('to "a..b"@example.org.')), [(3, '"a..b"@example.org')])
        self.assertEqual(list(addresses("/home/u/.cat/who@example.com")), [(13, "who@example.com")])

    def test_notAddresses(self):
        """
        A local part longer than 64 characters, a domain without a dot or
        with a bad top-level label, and a run of local-part characters with
        no C{@} are no addresses.
        """
        from smartrelay.feedback.mailtext import addresses

        for text in ("x" * 65 + "@example.com", "user@localhost", "a@b.c", "-" * 10000, "a..b@example.com"):
            self.assertEqual(list(addresses(text)), [], text[:20])
