"""
Tests for L{smartrelay.smtp.feedback}: the feedback listener's policy (which
recipients it takes, what it refuses, the report on disk before its 250)
over the hardened protocol on an in-memory connection.
"""

import os

from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.feedback.inbox import FeedbackInbox, decodeReport
from smartrelay.feedback.addresses import (
    FeedbackAddresses,
    ForgedToken,
    NotAFeedbackAddress,
    Target,
    UnknownAddress,
)
from smartrelay.smtp.feedback import FeedbackPolicy, refusalFor
from smartrelay.smtp.protocol import Session
from smartrelay.smtp.replies import SMTPReply
from smartrelay.smtp.submission import SubmissionFactory
from smartrelay.tokens import Tokens

QUEUE_ID = "2A/BC-00001-5C348706"
DSN = (
    b"From: MAILER-DAEMON@mx.example.org\r\nTo: bounce@relay.test\r\n"
    b"Subject: Undelivered Mail\r\n\r\nSorry.\r\n"
)


class FeedbackTestMixin:
    maxMessageSize = 2000

    def setUp(self):
        self.tokens = Tokens([b"k" * 32])
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.directory = self.mktemp()
        self.fsyncFails = False

        def fsync(fd):
            if self.fsyncFails:
                raise OSError(28, "No space left on device")
            os.fsync(fd)

        self.inbox = FeedbackInbox(self.directory, maybeDeferred, fsync=fsync)
        self.successResultOf(self.inbox.open())
        self.handedOver = []
        self.policy = FeedbackPolicy(
            clock=self.clock,
            addresses=FeedbackAddresses(
                tokens=self.tokens,
                bounceDomain="relay.test",
                verpPrefix="bounce",
                fblAddresses=frozenset(["fbl@example.com"]),
            ),
            inbox=self.inbox,
            received=lambda *args: self.handedOver.append(args),
            maxConnections=3,
            maxConnectionsPerClient=2,
            maxRecipients=3,
        )
        self.factory = SubmissionFactory(
            policy=self.policy,
            clock=self.clock,
            hostname="relay.test",
            maxMessageSize=self.maxMessageSize,
            maxLineLength=998,
        )

    def verp(self, index=0, queueID=QUEUE_ID):
        return "bounce+%s@relay.test" % (self.tokens.compact("v", queueID, index),)

    def unsub(self, index=0, queueID=QUEUE_ID):
        return "unsub+%s@relay.test" % (self.tokens.compact("u", queueID, index),)

    def connect(self, peer="192.0.2.7"):
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.protocol.makeConnection(self.transport)
        return self.replies()

    def send(self, data: bytes) -> list:
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list:
        value = self.transport.value().decode("utf-8")
        self.transport.clear()
        return [line for line in value.split("\r\n") if line]

    def rcpt(self, address: str) -> str:
        self.connect()
        self.send(b"EHLO mx.example.org\r\nMAIL FROM:<>\r\n")
        [answer] = self.send(b"RCPT TO:<%s>\r\n" % (address.encode(),))
        self.protocol.connectionLost(None)
        return answer


class RecipientTests(FeedbackTestMixin, SynchronousTestCase):
    def test_verpAddress(self):
        """
        A VERP address with a valid token is taken, whatever its case.
        """
        self.assertEqual(self.rcpt(self.verp()), "250 2.1.5 Recipient OK")
        self.assertEqual(self.rcpt(self.verp(3).upper()), "250 2.1.5 Recipient OK")

    def test_unsubscribeAddress(self):
        """
        C{unsub+TOKEN@} with a valid token is taken.
        """
        self.assertEqual(self.rcpt(self.unsub(1)), "250 2.1.5 Recipient OK")

    def test_postmasterAndFBL(self):
        """
        C{postmaster@} the bounce domain and each FBL address are taken.
        """
        self.assertEqual(self.rcpt("postmaster@relay.test"), "250 2.1.5 Recipient OK")
        self.assertEqual(self.rcpt("PostMaster@Relay.Test"), "250 2.1.5 Recipient OK")
        self.assertEqual(self.rcpt("FBL@example.com"), "250 2.1.5 Recipient OK")

    def test_forgedToken(self):
        """
        A VERP or unsub token that does not verify (another key's, a
        changed character, truncated, the other kind's) gets 550 5.7.1.
        """
        other = Tokens([b"o" * 32]).compact("v", QUEUE_ID, 0)
        good = self.tokens.compact("v", QUEUE_ID, 0)
        changed = good[:-1] + ("a" if good[-1] != "a" else "b")
        for address in [
            "bounce+%s@relay.test" % (other,),
            "bounce+%s@relay.test" % (changed,),
            "bounce+%s@relay.test" % (good[:-3],),
            "bounce+@relay.test",
            "unsub+%s@relay.test" % (good,),
            "bounce+%s@relay.test" % (self.tokens.compact("u", QUEUE_ID, 0),),
        ]:
            answer = self.rcpt(address)
            self.assertTrue(answer.startswith("550 5.7.1 "), (address, answer))
            self.assertIn("token does not verify", answer)

    def test_unknownAddress(self):
        """
        Any other local part, and any address at another domain (a valid
        token included: the listener never relays), gets 550 5.1.1.
        """
        for address in [
            "someone@relay.test",
            "bounce@relay.test",
            "other+%s@relay.test" % (self.tokens.compact("v", QUEUE_ID, 0),),
            "postmaster@example.org",
            self.verp().replace("@relay.test", "@example.org"),
            "abuse@example.com",
        ]:
            self.assertEqual(
                self.rcpt(address),
                "550 5.1.1 No such recipient here: this server only takes reports",
                address,
            )

    def test_targets(self):
        """
        L{FeedbackAddresses.target} says what each address is, with the
        queue id and recipient index of a token.
        """
        addresses = self.policy.addresses
        self.assertEqual(addresses.target(self.verp(7)), Target("verp", QUEUE_ID, 7))
        self.assertEqual(addresses.target(self.unsub(2)), Target("unsubscribe", QUEUE_ID, 2))
        self.assertEqual(addresses.target("postmaster@relay.test"), Target("postmaster"))
        self.assertEqual(addresses.target("fbl@EXAMPLE.com"), Target("fbl"))
        self.assertRaises(UnknownAddress, addresses.target, "someone@relay.test")
        self.assertRaises(ForgedToken, addresses.target, "bounce+aaaa@relay.test")

    def test_badSyntax(self):
        """
        Malformed addresses are refused by the protocol before the policy.
        """
        self.assertTrue(self.rcpt("no-at-sign").startswith("553 5.1.3 "))
        self.assertTrue(self.rcpt('"a@b"@relay.test').startswith("550 5.1.1 "))
        self.assertTrue(self.rcpt("x" * 70 + "@relay.test").startswith("553 5.1.3 "))

    def test_tooManyRecipients(self):
        """
        More than the policy's recipient limit get 452 4.5.3.
        """
        self.connect()
        self.send(b"EHLO mx.example.org\r\nMAIL FROM:<>\r\n")
        for _ in range(3):
            self.assertEqual(self.send(b"RCPT TO:<postmaster@relay.test>\r\n"), ["250 2.1.5 Recipient OK"])
        [answer] = self.send(b"RCPT TO:<postmaster@relay.test>\r\n")
        self.assertTrue(answer.startswith("452 4.5.3 "), answer)


class SessionTests(FeedbackTestMixin, SynchronousTestCase):
    def test_reportOnDiskBefore250(self):
        """
        A report from C{<>} is written to C{new/} (with its envelope) and
        handed to the processor, then answered 250 with its report id.
        """
        self.connect()
        self.send(b"EHLO mx.example.org\r\nMAIL FROM:<>\r\n")
        self.send(b"RCPT TO:<%s>\r\nDATA\r\n" % (self.verp().encode(),))
        [answer] = self.send(DSN + b".\r\n")
        self.assertTrue(answer.startswith("250 2.0.0 OK "), answer)
        reportID = answer.split()[-1]
        self.assertTrue(reportID.startswith("1700000000000-"), reportID)
        [(handed, envelope, data)] = self.handedOver
        self.assertEqual((handed, data), (reportID, DSN))
        with open(self.inbox.path("new", reportID), "rb") as f:
            stored, message = decodeReport(f.read())
        self.assertEqual(message, DSN)
        self.assertEqual(stored, envelope)
        self.assertEqual(
            (stored.sender, stored.recipients, stored.received, stored.client["ip"]),
            ("", (self.verp(),), 1700000000.0, "192.0.2.7"),
        )
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])

    def test_anySender(self):
        """
        Complaints and unsubscribe mail come from ordinary senders.
        """
        self.connect()
        self.send(b"EHLO mx.example.org\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<user@example.org>\r\n"), ["250 2.1.0 Sender OK"])

    def test_diskFailure(self):
        """
        A report that cannot be made durable gets 451 4.3.0 and is not
        handed over or left in C{new/}.
        """
        self.fsyncFails = True
        self.connect()
        self.send(b"EHLO mx.example.org\r\nMAIL FROM:<>\r\n")
        self.send(b"RCPT TO:<postmaster@relay.test>\r\nDATA\r\n")
        [answer] = self.send(DSN + b".\r\n")
        self.assertTrue(answer.startswith("451 4.3.0 "), answer)
        self.assertEqual(self.handedOver, [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "new")), [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_sizeLimit(self):
        """
        A SIZE above max_message_size gets 552 5.3.4 at MAIL; a bigger
        report gets 552 5.3.4 at the end of DATA and is not stored.
        """
        self.connect()
        [answer] = self.send(b"EHLO mx.example.org\r\nMAIL FROM:<> SIZE=5000\r\n")[-1:]
        self.assertTrue(answer.startswith("552 5.3.4 "), answer)
        self.send(b"MAIL FROM:<>\r\nRCPT TO:<postmaster@relay.test>\r\nDATA\r\n")
        [answer] = self.send(b"x" * 60 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 40 + b".\r\n")
        self.assertTrue(answer.startswith("552 5.3.4 "), answer)
        self.assertEqual(self.handedOver, [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "new")), [])

    def test_noAuth(self):
        """
        AUTH is neither offered nor accepted.
        """
        lines = self.connect() + self.send(b"EHLO mx.example.org\r\n")
        self.assertFalse([line for line in lines if "AUTH" in line])
        self.assertEqual(self.send(b"AUTH PLAIN AGFAYg==\r\n"), ["502 5.5.1 AUTH not available"])

    def test_bareLineFeedsAndNUL(self):
        """
        The protocol's hardening applies: bare LF is stored as CRLF, NUL is
        refused with 554 5.6.0.
        """
        self.connect()
        self.send(b"EHLO mx.example.org\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster@relay.test>\r\nDATA\r\n")
        [answer] = self.send(b"Subject: x\r\n\r\none\ntwo\r\n.\r\n")
        self.assertTrue(answer.startswith("250 "), answer)
        self.assertEqual(self.handedOver[0][2], b"Subject: x\r\n\r\none\r\ntwo\r\n")
        self.send(b"MAIL FROM:<>\r\nRCPT TO:<postmaster@relay.test>\r\nDATA\r\n")
        [answer] = self.send(b"Subject: x\r\n\r\n\0\r\n.\r\n")
        self.assertTrue(answer.startswith("554 5.6.0 "), answer)

    def test_connectionLimits(self):
        """
        Past the per-client and global limits clients get 421 4.7.0.
        """
        self.connect("192.0.2.1")
        self.connect("192.0.2.1")
        [answer] = self.connect("192.0.2.1")
        self.assertEqual(answer, "421 4.7.0 Too many connections from your address, try again later")
        self.connect("192.0.2.2")
        [answer] = self.connect("192.0.2.3")
        self.assertEqual(answer, "421 4.7.0 Too many connections, try again later")

    def test_commandTimeout(self):
        """
        An idle client is cut off after the command timeout.
        """
        self.connect()
        self.clock.advance(301)
        [answer] = self.replies()
        self.assertTrue(answer.startswith("421 4.4.2 "), answer)

    def test_startTLSWithCertificate(self):
        """
        With a TLS context (the [smtp] certificate) STARTTLS is offered and
        started; without one it is not offered.
        """
        from tests.test_smtp_protocol import FakeTLSTransport

        lines = self.connect() + self.send(b"EHLO mx.example.org\r\n")
        self.assertFalse([line for line in lines if "STARTTLS" in line])
        context = object()
        self.factory.tlsContext = context
        self.protocol = self.factory.buildProtocol(None)
        self.transport = FakeTLSTransport(peerAddress=IPv4Address("TCP", "192.0.2.8", 40000))
        self.protocol.makeConnection(self.transport)
        lines = self.replies() + self.send(b"EHLO mx.example.org\r\n")
        self.assertIn("250 STARTTLS", lines)
        [answer] = self.send(b"STARTTLS\r\n")
        self.assertTrue(answer.startswith("220 "), answer)
        self.assertIs(self.transport.tlsStarted, context)

    def test_policyDirect(self):
        """
        The policy refuses AUTH outright, takes any sender and raises the
        550 replies as L{SMTPReply}.
        """
        session = Session(peer="192.0.2.9", loopback=False)
        self.assertRaises(SMTPReply, self.policy.checkAuth, session)
        self.failureResultOf(self.policy.authenticate(session, "u", "p"), SMTPReply)
        self.assertIsNone(self.policy.checkSender(session, "", None))
        refusal = self.assertRaises(
            SMTPReply, self.policy.checkRecipient, session, "", "x@relay.test", 0
        )
        self.assertEqual((refusal.code, refusal.status), (550, "5.1.1"))


class InboxGroupCommitTests(SynchronousTestCase):
    def test_directoryFsyncShared(self):
        """
        Reports renamed into C{new/} while a directory fsync runs share the
        next one: three reports, two fsyncs, each report durable before
        its store returns.
        """
        import threading
        import time

        from smartrelay.feedback.inbox import Envelope

        calls, release, first = [], threading.Event(), threading.Event()

        def fsyncDirectory(path):
            calls.append(sorted(os.listdir(path)))
            if len(calls) == 1:
                first.set()
                release.wait(10)

        inbox = FeedbackInbox(self.mktemp(), maybeDeferred, fsyncDirectory=fsyncDirectory)
        inbox._open()
        envelope = Envelope("", ("postmaster@relay.test",), 1700000000.0, {})
        ids = []
        threads = [threading.Thread(target=lambda: ids.append(inbox._store(envelope, b"x")))]
        threads[0].start()
        self.assertTrue(first.wait(10))
        for _ in range(2):
            threads.append(threading.Thread(target=lambda: ids.append(inbox._store(envelope, b"y"))))
            threads[-1].start()
        deadline = time.monotonic() + 10
        while inbox._renamed < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        release.set()
        for thread in threads:
            thread.join(10)
        self.assertEqual(len(ids), 3)
        self.assertEqual(len(calls), 2)
        self.assertEqual(calls[1], sorted(ids))


class PropertyTests(SynchronousTestCase):
    addresses = FeedbackAddresses(
        tokens=Tokens([b"k" * 32]), bounceDomain="relay.test", verpPrefix="bounce",
        fblAddresses=frozenset(["fbl@example.com"]),
    )

    @given(st.text(max_size=300))
    def test_targetOnlyRefuses(self, address):
        """
        Any text given as a RCPT address is a target or an SMTP refusal
        (550 5.1.1 / 5.7.1), never another exception.
        """
        try:
            self.addresses.target(address)
        except NotAFeedbackAddress as error:
            refusal = refusalFor(error)
            self.assertIn((refusal.code, refusal.status), [(550, "5.1.1"), (550, "5.7.1")])

    @given(st.sampled_from(["bounce", "unsub"]), st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", max_size=60))
    def test_randomTokensRefused(self, prefix, token):
        """
        A random token never verifies (5.7.1).
        """
        error = self.assertRaises(
            ForgedToken, self.addresses.target, "%s+%s@relay.test" % (prefix, token)
        )
        self.assertEqual((refusalFor(error).code, refusalFor(error).status), (550, "5.7.1"))

    @given(st.binary(max_size=500))
    def test_decodeReportOnlyValueError(self, blob):
        """
        Any bytes read back as a report file decode or raise ValueError.
        """
        try:
            decodeReport(blob)
        except ValueError:
            pass

    @given(
        st.text(max_size=40),
        st.lists(st.text(max_size=40), max_size=5),
        st.floats(min_value=0, max_value=4e9, allow_nan=False),
        st.dictionaries(st.text(max_size=10), st.text(max_size=20) | st.booleans() | st.none(), max_size=3),
        st.binary(max_size=300),
    )
    def test_reportFileRoundTrip(self, sender, recipients, received, client, data):
        """
        A report file gives back its envelope and message byte for byte.
        """
        from smartrelay.feedback.inbox import Envelope, encodeReport

        envelope = Envelope(sender, tuple(recipients), received, client)
        self.assertEqual(decodeReport(encodeReport(envelope, data)), (envelope, data))
