"""
End-to-end tests of the feedback loop through the installed twistd: a
message is delivered to a sink, a report comes back to the feedback
listener (a DSN to the VERP address, an ARF complaint to an FBL address,
mail to the unsubscribe address), and the next message to that recipient
is accepted and C{suppressed}; a delay warning suppresses nothing; the
listener refuses unknown and forged addresses at RCPT; a kill -9 after a
report's 250 loses nothing and duplicates nothing.

The reports are written here (never copied from a corpus).
"""

import os
import re
import shutil
import smtplib
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.sink import waitFor
from tests.test_e2e import RelayTestMixin, events, submit

BOUNCE_DOMAIN = "relay.test"
FBL = "fbl@feedback.example.net"


def dsn(verp, recipient, queueID, status="5.1.1", action="failed", diagnostic=None):
    """
    An RFC 3464 report (multipart/report; report-type=delivery-status) from
    a remote MTA about C{recipient}, returning the headers of the message.
    """
    diagnostic = diagnostic or {
        "5.1.1": "550 5.1.1 <%s>: Recipient address rejected: User unknown" % (recipient,),
        "4.2.2": "452 4.2.2 <%s>: Mailbox full, will keep trying" % (recipient,),
    }[status]
    return (
        "Return-Path: <>\r\n"
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n"
        "To: %(verp)s\r\n"
        "Subject: %(subject)s\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b0undary"\r\n'
        "\r\n"
        "--b0undary\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "This is the mail system at host mx.example.org.\r\n"
        "\r\n"
        "%(human)s\r\n"
        "\r\n"
        "<%(recipient)s>: host mx.example.org said: %(diagnostic)s\r\n"
        "\r\n"
        "--b0undary\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n"
        "Arrival-Date: Mon, 7 Dec 2026 02:00:00 +0000\r\n"
        "\r\n"
        "Final-Recipient: rfc822; %(recipient)s\r\n"
        "Original-Recipient: rfc822; %(recipient)s\r\n"
        "Action: %(action)s\r\n"
        "Status: %(status)s\r\n"
        "Remote-MTA: dns; mx.example.org\r\n"
        "Diagnostic-Code: smtp; %(diagnostic)s\r\n"
        "\r\n"
        "--b0undary\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
        "X-SmartRelay-ID: %(queue)s\r\n"
        "From: App <app@example.com>\r\n"
        "To: %(recipient)s\r\n"
        "Subject: hello\r\n"
        "\r\n"
        "--b0undary--\r\n"
    ) % {
        "verp": verp,
        "recipient": recipient,
        "queue": queueID,
        "status": status,
        "action": action,
        "diagnostic": diagnostic,
        "subject": "Delayed Mail (still being retried)"
        if action == "delayed"
        else "Undelivered Mail Returned to Sender",
        "human": "Your message could not be delivered yet; the mail system will keep trying."
        if action == "delayed"
        else "I'm sorry to have to inform you that your message could not be delivered.",
    }


def arf(recipient, queueID, feedbackType="abuse"):
    """
    An RFC 5965 feedback report (a spam complaint) about C{recipient},
    returning the whole message.
    """
    return (
        "From: Feedback Loop <fbl@isp.example>\r\n"
        "To: %(fbl)s\r\n"
        "Subject: FW: hello\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="arf-b"\r\n'
        "\r\n"
        "--arf-b\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "This is an email abuse report for an email message received from IP\r\n"
        "127.0.0.1 on Mon, 7 Dec 2026 02:00:00 +0000.\r\n"
        "\r\n"
        "--arf-b\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        "Feedback-Type: %(type)s\r\n"
        "User-Agent: ISP-FBL/2.1\r\n"
        "Version: 1\r\n"
        "Original-Mail-From: <bounce@relay.test>\r\n"
        "Original-Rcpt-To: <%(recipient)s>\r\n"
        "Source-IP: 127.0.0.1\r\n"
        "Reported-Domain: example.com\r\n"
        "\r\n"
        "--arf-b\r\n"
        "Content-Type: message/rfc822\r\n"
        "\r\n"
        "X-SmartRelay-ID: %(queue)s\r\n"
        "From: App <app@example.com>\r\n"
        "To: %(recipient)s\r\n"
        "Subject: hello\r\n"
        "\r\n"
        "Line one\r\n"
        "\r\n"
        "--arf-b--\r\n"
    ) % {"fbl": FBL, "recipient": recipient, "queue": queueID, "type": feedbackType}


def report(port, recipient, body, sender=""):
    """
    Send C{body} to the feedback listener; returns the RCPT reply and, if
    it was taken, the DATA reply, as (code, text) pairs.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("mx.example.org")
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        rcpt = client.rcpt(recipient)
        if rcpt[0] != 250:
            return (rcpt[0], rcpt[1].decode()), None
        code, text = client.data(body.encode())
        return (rcpt[0], rcpt[1].decode()), (code, text.decode())


def rows(workdir, sql, *args):
    connection = sqlite3.connect(os.path.join(workdir, "var", "smartrelay.sqlite"))
    try:
        return connection.execute(sql, args).fetchall()
    finally:
        connection.close()


def suppression(workdir, address):
    found = rows(workdir, "SELECT reason FROM suppressions WHERE address = ?", address)
    return found[0][0] if found else None


class FeedbackLoopTests(RelayTestMixin, TestCase):
    timeout = 180

    def start(self, extra=""):
        self.sinkPort = self.startSink()
        config = self.relayConfig(self.sinkPort) + (
            "\n[feedback]\nlisten = tcp:0:interface=127.0.0.1\nfbl_addresses = %s\n%s"
            % (FBL, extra)
        )
        self.relay = self.makeRelay(config)
        self.relay.start()
        return self.relay.waitReady(reactor)

    async def deliver(self, recipient):
        """
        Submit a message to C{recipient}; wait for the sink to get it.

        @return: (queue id, the L{Received} copy).
        """
        (code, text), refused = await deferToThread(submit, self.relay.port, [recipient])
        self.assertEqual((code, refused), (250, []), text)
        queueID = text.split()[-1]
        await waitFor(reactor, lambda: queueID in self.sink.queueIDs())
        [received] = [r for r in self.sink.received if r.queueID == queueID]
        self.assertRegex(received.sender, r"^bounce\+[a-z2-7]{37}@relay\.test$")
        return queueID, received

    async def nextIsSuppressed(self, recipient, reason):
        """
        The next message to C{recipient} is accepted and C{suppressed}
        (never reaches the sink).
        """
        before = len(self.sink.received)
        (code, text), refused = await deferToThread(submit, self.relay.port, [recipient])
        self.assertEqual((code, refused), (250, []), text)
        queueID = text.split()[-1]

        def suppressedEvent():
            return [
                e for e in events(self.workdir) if e[0] == "suppressed" and e[1] == queueID
            ]

        await waitFor(reactor, suppressedEvent)
        [(_, _, address, detail)] = suppressedEvent()
        self.assertEqual(address, recipient)
        self.assertIn('"reason":"%s"' % (reason,), detail.replace(" ", ""))
        self.assertEqual(len(self.sink.received), before)

    def test_hardBounceDSN(self):
        """
        A DSN 5.1.1 to the VERP address of a delivered message is answered
        250 with a report id; a hard bounce (source dsn) is recorded and
        the next message to the recipient is suppressed.
        """
        return Deferred.fromCoroutine(self._hardBounceDSN())

    async def _hardBounceDSN(self):
        await self.start()
        queueID, received = await self.deliver("gone@example.org")
        rcpt, data = await deferToThread(
            report, self.relay.feedbackPort, received.sender,
            dsn(received.sender, "gone@example.org", queueID),
        )
        self.assertEqual(rcpt[0], 250)
        self.assertEqual(data[0], 250)
        self.assertRegex(data[1], r"^2\.0\.0 OK [0-9]{13}-[0-9a-f]{12}$")
        await waitFor(reactor, lambda: suppression(self.workdir, "gone@example.org"))
        self.assertEqual(suppression(self.workdir, "gone@example.org"), "bounce")
        [(queue, recipient, detail)] = [
            (e[1], e[2], e[3]) for e in events(self.workdir) if e[0] == "bounced"
        ]
        self.assertEqual((queue, recipient), (queueID, "gone@example.org"))
        for piece in ['"source":"dsn"', '"kind":"hard"', '"status":"5.1.1"', '"action":"failed"']:
            self.assertIn(piece, detail.replace(" ", ""))
        await self.nextIsSuppressed("gone@example.org", "bounce")
        reportID = data[1].split()[-1]
        self.assertTrue(
            os.path.exists(os.path.join(self.workdir, "var", "feedback", "done", reportID))
        )
        await self.relay.stop()

    def test_complaintAndUnsubscribe(self):
        """
        An ARF abuse report to an FBL address suppresses its recipient
        (reason complaint); any mail to the message's mailto unsubscribe
        address suppresses its recipient (reason unsubscribe).
        """
        return Deferred.fromCoroutine(self._complaintAndUnsubscribe())

    async def _complaintAndUnsubscribe(self):
        await self.start()
        queueID, _ = await self.deliver("angry@example.org")
        rcpt, data = await deferToThread(
            report, self.relay.feedbackPort, FBL, arf("angry@example.org", queueID),
            "fbl@isp.example",
        )
        self.assertEqual((rcpt[0], data[0]), (250, 250))
        await waitFor(reactor, lambda: suppression(self.workdir, "angry@example.org"))
        self.assertEqual(suppression(self.workdir, "angry@example.org"), "complaint")
        [complained] = [e for e in events(self.workdir) if e[0] == "complained"]
        self.assertEqual(complained[1:3], (queueID, "angry@example.org"))
        self.assertIn('"feedback_type":"abuse"', complained[3].replace(" ", ""))
        await self.nextIsSuppressed("angry@example.org", "complaint")

        queueID, received = await self.deliver("leaver@example.org")
        unsubscribe = re.search(rb"mailto:(unsub\+[a-z2-7]{37}@relay\.test)", received.data)
        self.assertTrue(unsubscribe, received.data[:2000])
        rcpt, data = await deferToThread(
            report, self.relay.feedbackPort, unsubscribe.group(1).decode(),
            "From: leaver@example.org\r\nSubject: unsubscribe\r\n\r\nunsubscribe\r\n",
            "leaver@example.org",
        )
        self.assertEqual((rcpt[0], data[0]), (250, 250))
        await waitFor(reactor, lambda: suppression(self.workdir, "leaver@example.org"))
        self.assertEqual(suppression(self.workdir, "leaver@example.org"), "unsubscribe")
        [unsubscribed] = [e for e in events(self.workdir) if e[0] == "unsubscribed"]
        self.assertEqual(unsubscribed[1:3], (queueID, "leaver@example.org"))
        await self.nextIsSuppressed("leaver@example.org", "unsubscribe")
        await self.relay.stop()

    def test_delayedAndRefusals(self):
        """
        A 4.2.2 delay warning is recorded as deferred (source dsn) and
        suppresses nothing: the next message is delivered.  An unknown
        local part gets 550 5.1.1 and a forged VERP token 550 5.7.1 at
        RCPT; a 5xx in the delivery session suppresses too.
        """
        return Deferred.fromCoroutine(self._delayedAndRefusals())

    async def _delayedAndRefusals(self):
        await self.start()
        queueID, received = await self.deliver("slow@example.org")
        rcpt, data = await deferToThread(
            report, self.relay.feedbackPort, received.sender,
            dsn(received.sender, "slow@example.org", queueID, status="4.2.2", action="delayed"),
        )
        self.assertEqual((rcpt[0], data[0]), (250, 250))

        def delayed():
            return [
                e for e in events(self.workdir)
                if e[0] == "deferred" and '"source":"dsn"' in e[3].replace(" ", "")
            ]

        await waitFor(reactor, delayed)
        self.assertIn('"action":"delayed"', delayed()[0][3].replace(" ", ""))
        self.assertIsNone(suppression(self.workdir, "slow@example.org"))
        self.assertEqual([e for e in events(self.workdir) if e[0] == "bounced"], [])
        await self.deliver("slow@example.org")

        port = self.relay.feedbackPort
        rcpt, data = await deferToThread(report, port, "nobody@relay.test", "Subject: x\r\n\r\n")
        self.assertEqual(rcpt, (550, "5.1.1 No such recipient here: this server only takes reports"))
        forged = "bounce+" + "a" * 37 + "@relay.test"
        rcpt, data = await deferToThread(report, port, forged, "Subject: x\r\n\r\n")
        self.assertEqual(rcpt[0], 550)
        self.assertTrue(rcpt[1].startswith("5.7.1 "), rcpt)
        local, domain = received.sender.split("@")
        truncated = local[:-5] + "@" + domain
        rcpt, data = await deferToThread(report, port, truncated, "Subject: x\r\n\r\n")
        self.assertEqual(rcpt[0], 550)
        self.assertTrue(rcpt[1].startswith("5.7.1 "), rcpt)

        # The sink answers 550 5.1.1 for local parts starting "bounce".
        (code, text), refused = await deferToThread(submit, self.relay.port, ["bounce-me@example.org"])
        self.assertEqual(code, 250)
        await waitFor(reactor, lambda: suppression(self.workdir, "bounce-me@example.org"))
        await self.nextIsSuppressed("bounce-me@example.org", "bounce")
        await self.relay.stop()

    def test_killAfter250(self):
        """
        A relay killed (-9) right after a report's 250 has it processed
        once: after a restart there is one bounce event for it, even when
        the report is processed a second time (put back into new/ as a
        crash before the move to done/ would leave it).
        """
        return Deferred.fromCoroutine(self._killAfter250())

    async def _killAfter250(self):
        await self.start()
        queueID, received = await self.deliver("crash@example.org")
        rcpt, data = await deferToThread(
            report, self.relay.feedbackPort, received.sender,
            dsn(received.sender, "crash@example.org", queueID),
        )
        self.relay.kill()
        self.assertEqual(data[0], 250)
        reportID = data[1].split()[-1]
        feedback = os.path.join(self.workdir, "var", "feedback")
        self.assertTrue(
            os.path.exists(os.path.join(feedback, "new", reportID))
            or os.path.exists(os.path.join(feedback, "done", reportID))
        )
        self.relay.start()
        await self.relay.waitReady(reactor)
        await waitFor(reactor, lambda: os.path.exists(os.path.join(feedback, "done", reportID)))
        await waitFor(reactor, lambda: suppression(self.workdir, "crash@example.org"))
        await self.relay.stop()
        shutil.move(os.path.join(feedback, "done", reportID), os.path.join(feedback, "new", reportID))
        self.relay.start()
        await self.relay.waitReady(reactor)
        await waitFor(reactor, lambda: os.path.exists(os.path.join(feedback, "done", reportID)))
        await self.relay.stop()
        bounces = [e for e in events(self.workdir) if e[0] == "bounced"]
        self.assertEqual([(e[1], e[2]) for e in bounces], [(queueID, "crash@example.org")])
        self.assertIn("processing 1 report(s) left from the last run", self.relay.log())
