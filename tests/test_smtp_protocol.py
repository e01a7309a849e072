"""
Tests for L{smartrelay.smtp.protocol}: the hardened ESMTP server, driven
byte by byte over a StringTransport with a fake policy and a Clock.
"""

from typing import Optional

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.smtp.protocol import HardenedESMTP, normaliseLine
from smartrelay.smtp.replies import SMTPReply, reply


@attrs.define
class FakePolicy:
    """
    Records what the protocol asks; answers from its attributes.
    """

    authAvailable: bool = False
    refuseConnection: Optional[SMTPReply] = None
    refuseSender: Optional[SMTPReply] = None
    pendingSender: Optional[Deferred] = None
    pendingMessage: Optional[Deferred] = None
    storeFailure: Optional[Exception] = None
    refuseAuth: Optional[SMTPReply] = None
    pendingAuth: Optional[Deferred] = None
    authAnswer: Optional[SMTPReply] = None
    users: dict = attrs.field(factory=lambda: {"app": "secret"})
    messages: list = attrs.field(factory=list)
    rejected: list = attrs.field(factory=list)
    calls: list = attrs.field(factory=list)
    lost: int = 0

    def connectionMade(self, session):
        if self.refuseConnection is not None:
            raise self.refuseConnection

    def connectionLost(self, session):
        self.lost += 1

    def checkAuth(self, session):
        self.calls.append(("AUTH",))
        if self.refuseAuth is not None:
            raise self.refuseAuth

    def authenticate(self, session, username, password):
        self.calls.append(("authenticate", username))
        if self.pendingAuth is not None:
            return self.pendingAuth
        if self.authAnswer is not None:
            return fail(self.authAnswer)
        if self.users.get(username) == password:
            return succeed(username)
        return fail(reply(535, "5.7.8", "Authentication credentials invalid"))

    def checkSender(self, session, sender, size):
        self.calls.append(("MAIL", sender, size))
        if self.refuseSender is not None:
            raise self.refuseSender
        if self.pendingSender is not None:
            return self.pendingSender

    def checkRecipient(self, session, sender, recipient, accepted):
        self.calls.append(("RCPT", recipient))
        if accepted >= 3:
            raise reply(452, "4.5.3", "Too many recipients")

    def messageReceived(self, session, sender, recipients, data):
        self.messages.append((sender, recipients, data))
        if self.storeFailure is not None:
            return fail(self.storeFailure)
        if self.pendingMessage is not None:
            return self.pendingMessage
        return succeed("79/BC-00001-5C348706")

    def messageRejected(self, session, sender, recipients, answer):
        self.rejected.append((sender, recipients, answer.code))


class FakeTLSTransport(StringTransport):
    """
    A StringTransport that records C{startTLS}.
    """

    tlsStarted = None

    def startTLS(self, context):
        self.tlsStarted = context


from zope.interface import implementer  # noqa: E402
from twisted.internet.interfaces import ITLSTransport  # noqa: E402

implementer(ITLSTransport)(FakeTLSTransport)


class ServerMixin:
    maxMessageSize = 10000
    maxLineLength = 100

    def connect(self, peer="127.0.0.1", policy=None, tls=False):
        self.clock = Clock()
        self.policy = policy or FakePolicy()
        self.protocol = HardenedESMTP(
            self.policy,
            self.clock,
            hostname="relay.example",
            maxMessageSize=self.maxMessageSize,
            maxLineLength=self.maxLineLength,
            commandTimeout=60,
            dataTimeout=300,
            tlsContext=object() if tls else None,
        )
        transportClass = FakeTLSTransport if tls else StringTransport
        self.transport = transportClass(peerAddress=IPv4Address("TCP", peer, 40000))
        self.protocol.makeConnection(self.transport)
        return self.replies()

    def send(self, data: bytes) -> list:
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list:
        value = self.transport.value().decode("utf-8")
        self.transport.clear()
        return [line for line in value.split("\r\n") if line]

    def codes(self, lines) -> list:
        return [line[:3] for line in lines if line[3:4] == " "]


class BasicsTests(ServerMixin, SynchronousTestCase):
    def test_greetingAndEHLO(self):
        """
        The greeting is 220 and EHLO advertises the required extensions.
        """
        self.assertEqual(self.connect(), ["220 relay.example ESMTP smartrelay"])
        lines = self.send(b"EHLO client.example\r\n")
        self.assertEqual(lines[0], "250-relay.example Hello client.example [127.0.0.1]")
        for ext in ("PIPELINING", "SIZE 10000", "8BITMIME", "ENHANCEDSTATUSCODES"):
            self.assertIn(ext, [line[4:] for line in lines])

    def test_submitMessage(self):
        """
        A complete transaction gets 250 with the queue id from the policy;
        dot-stuffing is undone.
        """
        self.connect()
        lines = self.send(
            b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
            b"DATA\r\nSubject: x\r\n\r\n..leading dot\r\nbody\r\n.\r\n"
        )
        self.assertEqual(lines[-1], "250 2.0.0 OK 79/BC-00001-5C348706")
        sender, recipients, data = self.policy.messages[0]
        self.assertEqual((sender, recipients), ("a@example.com", ["b@example.org"]))
        self.assertEqual(data, b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n")

    def test_nullSender(self):
        """
        MAIL FROM:<> is the null reverse path, passed as "".
        """
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<>\r\n")
        self.assertEqual(self.policy.calls, [("MAIL", "", None)])

    def test_unknownCommand(self):
        """
        An unknown command is 500 5.5.1 with a sentence.
        """
        self.connect()
        self.assertEqual(
            self.send(b"FOO bar\r\n"), ["500 5.5.1 Command not recognised: FOO"]
        )

    def test_mailBeforeHelo(self):
        """
        MAIL before HELO/EHLO is a sequence error.
        """
        self.connect()
        self.assertEqual(self.send(b"MAIL FROM:<a@b.c>\r\n"), ["503 5.5.1 Send HELO or EHLO first"])

    def test_badSyntax(self):
        """
        Malformed MAIL and RCPT get 501 5.5.4; bad addresses 553 5.1.3.
        """
        self.connect()
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.codes(self.send(b"MAIL TO:<a@b.c>\r\n")), ["501"])
        self.assertEqual(self.codes(self.send(b"MAIL FROM:<nodomain>\r\n")), ["553"])
        self.assertEqual(self.codes(self.send(b"MAIL FROM:<a@bad_domain!>\r\n")), ["553"])
        self.send(b"MAIL FROM:<a@b.com>\r\n")
        self.assertEqual(self.codes(self.send(b"RCPT TO:<@@>\r\n")), ["553"])
        self.assertEqual(self.codes(self.send(b"RCPT FROM:<x@y.z>\r\n")), ["501"])

    def test_addressLengths(self):
        """
        Local parts over 64 octets and domains over 255 are refused.
        """
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\n")
        longLocal = b"x" * 65 + b"@example.com"
        self.assertEqual(
            self.send(b"RCPT TO:<" + longLocal + b">\r\n"),
            ["553 5.1.3 The recipient's local part is longer than 64 octets"],
        )
        self.assertEqual(
            self.codes(self.send(b"RCPT TO:<" + b"x" * 64 + b"@example.com>\r\n")), ["250"]
        )
        longDomain = b"a@" + b".".join([b"d" * 60] * 5)
        self.assertEqual(self.codes(self.send(b"RCPT TO:<" + longDomain + b">\r\n")), ["553"])

    def test_sizeParameter(self):
        """
        A declared SIZE above the limit is 552 5.3.4 at MAIL.
        """
        self.connect()
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.codes(self.send(b"MAIL FROM:<a@b.com> SIZE=10001\r\n")), ["552"]
        )
        self.assertEqual(self.codes(self.send(b"MAIL FROM:<a@b.com> SIZE=99\r\n")), ["250"])
        self.assertEqual(self.policy.calls[-1], ("MAIL", "a@b.com", 99))

    def test_unknownMailParameter(self):
        """
        MAIL parameters we did not advertise get 555 5.5.4.
        """
        self.connect()
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.codes(self.send(b"MAIL FROM:<a@b.com> SMTPUTF8\r\n")), ["555"])

    def test_policyRefusesSender(self):
        """
        A policy refusal becomes the reply, verbatim.
        """
        policy = FakePolicy(refuseSender=reply(554, "5.7.1", "Relay access denied"))
        self.connect(policy=policy)
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.com>\r\n"), ["554 5.7.1 Relay access denied"])

    def test_tooManyRecipients(self):
        """
        The policy's 452 for too many recipients is passed on; DATA still works
        for the accepted ones.
        """
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\n")
        for i in range(3):
            self.send(b"RCPT TO:<r%d@b.com>\r\n" % i)
        self.assertEqual(self.codes(self.send(b"RCPT TO:<r4@b.com>\r\n")), ["452"])
        self.send(b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(len(self.policy.messages[0][1]), 3)

    def test_dataWithoutRecipients(self):
        """
        DATA before a recipient is refused.
        """
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\n")
        self.assertEqual(self.codes(self.send(b"DATA\r\n")), ["554"])

    def test_connectionRefused(self):
        """
        A policy refusal at connect is sent instead of the greeting and the
        connection is closed.
        """
        policy = FakePolicy(refuseConnection=reply(421, "4.7.0", "Too many connections"))
        self.assertEqual(self.connect(policy=policy), ["421 4.7.0 Too many connections"])
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(None)
        self.assertEqual(policy.lost, 0)

    def test_connectionLostTellsPolicy(self):
        """
        The policy hears about the end of every admitted connection, once.
        """
        self.connect()
        self.protocol.connectionLost(None)
        self.protocol.connectionLost(None)
        self.assertEqual(self.policy.lost, 1)

    def test_tooManyErrors(self):
        """
        A client that keeps sending garbage is disconnected.
        """
        self.connect()
        lines = self.send(b"BAD\r\n" * 25)
        self.assertIn("421 4.7.0 Too many errors, closing connection", lines)
        self.assertTrue(self.transport.disconnecting)

    def test_commandLineTooLong(self):
        """
        A command line over the limit is refused and the next line is read
        as a fresh command.
        """
        self.connect()
        lines = self.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
        self.assertEqual(self.codes(lines), ["500", "250"])


class PipeliningTests(ServerMixin, SynchronousTestCase):
    def test_commandsWaitForPolicy(self):
        """
        While MAIL waits for the policy, the pipelined RCPT and DATA are not
        looked at; they run in order once the policy answers.
        """
        pending = Deferred()
        self.connect(policy=FakePolicy(pendingSender=pending))
        lines = self.send(
            b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nhi\r\n.\r\n"
        )
        self.assertNotIn("250 2.1.0 Sender OK", lines)
        self.assertEqual(self.policy.calls, [("MAIL", "a@b.com", None)])
        pending.callback(None)
        self.assertEqual(
            self.codes(self.replies()), ["250", "250", "354", "250"]
        )

    def test_commandsAfterDataWaitForStorage(self):
        """
        A command pipelined after the end of DATA is answered only after the
        message's 250.
        """
        pending = Deferred()
        self.connect(policy=FakePolicy(pendingMessage=pending))
        lines = self.send(
            b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(self.codes(lines)[-1], "354")
        pending.callback("79/BC-00002-5C348706")
        self.assertEqual(
            self.replies(), ["250 2.0.0 OK 79/BC-00002-5C348706", "250 2.0.0 OK"]
        )

    def test_backpressure(self):
        """
        A client that floods input while a command is pending is paused, and
        resumed when the command is done.
        """
        pending = Deferred()
        self.connect(policy=FakePolicy(pendingSender=pending))
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\n" + b"NOOP\r\n" * 100000)
        self.assertEqual(self.transport.producerState, "paused")
        pending.callback(None)
        self.assertEqual(self.transport.producerState, "producing")


class StartTLSTests(ServerMixin, SynchronousTestCase):
    def test_injectionDiscarded(self):
        """
        Commands sent in the same plaintext packet after STARTTLS are
        discarded, never answered inside TLS, and EHLO is needed again.
        """
        self.connect(tls=True)
        self.send(b"EHLO c\r\n")
        lines = self.send(b"STARTTLS\r\nMAIL FROM:<evil@x.com>\r\nRCPT TO:<v@y.com>\r\n")
        self.assertEqual(lines, ["220 2.0.0 Ready to start TLS"])
        self.assertIsNotNone(self.transport.tlsStarted)
        self.assertEqual(self.policy.calls, [])
        self.assertEqual(self.send(b"MAIL FROM:<a@b.com>\r\n"), ["503 5.5.1 Send HELO or EHLO first"])
        lines = self.send(b"EHLO c\r\n")
        self.assertNotIn("250-STARTTLS", lines)

    def test_notAvailable(self):
        """
        Without a certificate STARTTLS is neither advertised nor accepted.
        """
        self.connect()
        self.assertNotIn("250-STARTTLS", self.send(b"EHLO c\r\n"))
        self.assertEqual(self.codes(self.send(b"STARTTLS\r\n")), ["454"])


class DataHardeningTests(ServerMixin, SynchronousTestCase):
    def startData(self):
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\n")

    def test_longLineConsumesRestOfData(self):
        """
        An over-long line inside DATA does not drop back into command mode:
        the rest of DATA, including lines that look like commands, is
        consumed, and only then 500 5.5.2 is answered.
        """
        self.startData()
        lines = self.send(
            b"Subject: x\r\n\r\n" + b"A" * 150 + b"\r\nRSET\r\nMAIL FROM:<evil@x.com>\r\n"
            b"RCPT TO:<victim@y.com>\r\nDATA\r\n.\r\n"
        )
        self.assertEqual(lines, ["500 5.5.2 Line too long"])
        self.assertEqual(self.policy.calls, [("MAIL", "a@b.com", None), ("RCPT", "x@y.com")])
        self.assertEqual(self.policy.messages, [])
        self.assertEqual(self.policy.rejected, [("a@b.com", ["x@y.com"], 500)])

    def test_longLineAcrossPackets(self):
        """
        A long line that arrives in many packets without a line end is
        detected without buffering it all, and its tail is never taken for
        the end of DATA or a command.
        """
        self.startData()
        for _ in range(50):
            self.assertEqual(self.send(b"B" * 64), [])
        self.assertLess(len(self.protocol._buffer), 200)
        self.assertEqual(self.send(b"\r\nQUIT\r\n"), [])
        self.assertEqual(self.send(b".\r\n"), ["500 5.5.2 Line too long"])

    def test_longLineTailLooksLikeTerminator(self):
        """
        When the over-long line's tail is a lone dot, it is still part of
        the long line, not the end of DATA.
        """
        self.startData()
        self.send(b"C" * 200)
        self.assertEqual(self.send(b".\r\nNOOP\r\n"), [])
        self.assertEqual(self.send(b".\r\n"), ["500 5.5.2 Line too long"])

    def test_bareLFDoesNotEndData(self):
        """
        Only CRLF.CRLF ends DATA: LF.LF and CR.CR are message content,
        normalised to CRLF when stored.
        """
        self.startData()
        lines = self.send(b"Subject: x\r\n\r\nline1\n.\nMAIL FROM:<e@x.com>\r\nline2\r.\rend\r\n.\r\n")
        self.assertEqual(self.codes(lines), ["250"])
        data = self.policy.messages[0][2]
        self.assertEqual(
            data,
            b"Subject: x\r\n\r\nline1\r\n.\r\nMAIL FROM:<e@x.com>\r\nline2\r\n.\r\nend\r\n",
        )
        self.assertEqual(data.count(b"\r"), data.count(b"\n"))

    def test_nulRefused(self):
        """
        NUL in DATA is refused with 554 5.6.0 after the end of DATA.
        """
        self.startData()
        self.assertEqual(self.send(b"a\0b\r\n.\r\n"), [
            "554 5.6.0 Message contains NUL characters, not accepted"
        ])
        self.assertEqual(self.policy.messages, [])

    def test_messageTooBig(self):
        """
        A message over the size limit is consumed and refused with 552 5.3.4.
        """
        self.startData()
        for _ in range(200):
            self.send(b"x" * 98 + b"\r\n")
        self.assertEqual(self.send(b".\r\n"), ["552 5.3.4 Message too big"])
        self.assertEqual(self.policy.messages, [])

    def test_storageFailure(self):
        """
        If storing fails the client gets 451 4.3.0, never a 5xx.
        """
        self.connect(policy=FakePolicy(storeFailure=OSError(28, "No space left on device")))
        lines = self.send(
            b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nhi\r\n.\r\n"
        )
        self.assertEqual(lines[-1][:9], "451 4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_sessionContinuesAfterRefusedData(self):
        """
        After a refused DATA the session can send a good message.
        """
        self.startData()
        self.send(b"\0\r\n.\r\n")
        lines = self.send(b"MAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nok\r\n.\r\n")
        self.assertEqual(self.codes(lines), ["250", "250", "354", "250"])

    @given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 30))
    def test_anyChunkingSameResult(self, lines, chunk):
        """
        However the input is split into packets, the stored message is the
        same.
        """
        body = b"".join(
            line.replace(b"\0", b"").replace(b"\r\n", b"") + b"\r\n" for line in lines
        )
        stuffed = b"".join(
            (b"." + l if l.startswith(b".") else l) + b"\r\n" for l in body.split(b"\r\n")[:-1]
        )
        stream = (
            b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\n" + stuffed + b".\r\n"
        )
        self.connect()
        for i in range(0, len(stream), chunk):
            self.protocol.dataReceived(stream[i : i + chunk])
        expected = b"".join(normaliseLine(l) + b"\r\n" for l in body.split(b"\r\n")[:-1])
        self.assertEqual(self.policy.messages[0][2], expected)


class FastPathTests(ServerMixin, SynchronousTestCase):
    maxLineLength = 20
    maxMessageSize = 300

    def outcome(self, stream, chunk, slowOnly):
        self.connect()
        if slowOnly:
            self.protocol._processDataBlock = lambda: None
        for i in range(0, len(stream), chunk):
            self.protocol.dataReceived(stream[i : i + chunk])
        return self.replies(), self.policy.messages, self.policy.rejected

    @given(
        st.lists(
            st.sampled_from(
                [b"a", b"b" * 19, b"c" * 25, b".", b"..", b".x", b"\r", b"\n", b"\0", b"\r\n", b" "]
            ),
            max_size=60,
        ),
        st.integers(1, 40),
    )
    def test_sameAsLineByLine(self, pieces, chunk):
        """
        The block fast path gives exactly the replies, stored messages and
        rejections of the line-by-line path, for any input and packet split
        (long lines, bare CR/LF, NUL, dots, size limit included).
        """
        stream = (
            b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\n"
            + b"".join(pieces)
            + b"\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(self.outcome(stream, chunk, False), self.outcome(stream, chunk, True))


class TimeoutTests(ServerMixin, SynchronousTestCase):
    def test_commandTimeout(self):
        """
        An idle client is told 421 4.4.2 and disconnected.
        """
        self.connect()
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(self.codes(self.replies()), ["421"])
        self.assertTrue(self.transport.disconnecting)

    def test_dataPhaseTimeout(self):
        """
        A slow-loris client that trickles DATA is cut off when the whole DATA
        phase exceeds its limit, even though it is never idle for long.
        """
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\n")
        lines = []
        for _ in range(10):
            self.clock.advance(30)
            lines += self.send(b"x\r\n")
        self.assertEqual(self.codes(lines), ["421"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.policy.messages, [])

    def test_noTimersLeft(self):
        """
        After the connection is lost no timer is left behind.
        """
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\n")
        self.protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AuthTests(ServerMixin, SynchronousTestCase):
    def test_plain(self):
        """
        AUTH PLAIN with an initial response authenticates on loopback.
        """
        self.connect(policy=FakePolicy(authAvailable=True))
        self.assertIn("250 AUTH PLAIN LOGIN", self.send(b"EHLO c\r\n"))
        self.assertEqual(
            self.send(b"AUTH PLAIN AGFwcABzZWNyZXQ=\r\n"), ["235 2.7.0 Authentication successful"]
        )
        self.assertEqual(self.protocol.session.user, "app")

    def test_login(self):
        """
        AUTH LOGIN asks for user name and password.
        """
        self.connect(policy=FakePolicy(authAvailable=True))
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(self.send(b"YXBw\r\n"), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(self.codes(self.send(b"c2VjcmV0\r\n")), ["235"])

    def test_wrongPassword(self):
        """
        Wrong credentials get 535 5.7.8; three failures end the session.
        """
        self.connect(policy=FakePolicy(authAvailable=True))
        self.send(b"EHLO c\r\n")
        bad = b"AUTH PLAIN AGFwcAB3cm9uZw==\r\n"
        self.assertEqual(self.codes(self.send(bad)), ["535"])
        self.send(bad)
        self.assertEqual(self.codes(self.send(bad)), ["535", "421"])
        self.assertTrue(self.transport.disconnecting)

    def test_notOverPlaintextFromRemote(self):
        """
        A non-loopback client may not AUTH before STARTTLS, and AUTH is not
        advertised to it.
        """
        self.connect(peer="192.0.2.7", policy=FakePolicy(authAvailable=True))
        self.assertNotIn("250 AUTH PLAIN LOGIN", self.send(b"EHLO c\r\n"))
        self.assertEqual(self.codes(self.send(b"AUTH PLAIN AGFwcABzZWNyZXQ=\r\n")), ["538"])

    def test_badBase64(self):
        """
        Undecodable AUTH data is a 501, not a crash.
        """
        self.connect(policy=FakePolicy(authAvailable=True))
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.codes(self.send(b"AUTH PLAIN !!!\r\n")), ["501"])
        self.assertEqual(self.codes(self.send(b"AUTH PLAIN AGFw\r\n")), ["501"])

    def test_unknownMechanism(self):
        """
        Unknown mechanisms get 504.
        """
        self.connect(policy=FakePolicy(authAvailable=True))
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.codes(self.send(b"AUTH CRAM-MD5\r\n")), ["504"])

    def test_cancel(self):
        """
        "*" cancels an exchange.
        """
        self.connect(policy=FakePolicy(authAvailable=True))
        self.send(b"EHLO c\r\nAUTH LOGIN\r\n")
        self.assertEqual(self.codes(self.send(b"*\r\n")), ["501"])
        self.assertEqual(self.codes(self.send(b"NOOP\r\n")), ["250"])

    def test_refusedBeforeExchange(self):
        """
        The policy's C{checkAuth} refusal answers the AUTH command itself:
        no C{334} challenge, no exchange, no credentials asked for; the
        session goes on.
        """
        policy = FakePolicy(
            authAvailable=True,
            refuseAuth=reply(454, "4.7.0", "Too many failed authentications, try again later"),
        )
        self.connect(policy=policy)
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"AUTH LOGIN\r\n"),
            ["454 4.7.0 Too many failed authentications, try again later"],
        )
        self.assertEqual(self.codes(self.send(b"NOOP\r\n")), ["250"])
        self.assertFalse(self.transport.disconnecting)
        self.assertNotIn(("authenticate", "app"), policy.calls)

    def test_refusal421Closes(self):
        """
        A C{421} refusal of the AUTH command closes the connection, and
        nothing sent after it is run.
        """
        policy = FakePolicy(authAvailable=True, refuseAuth=reply(421, "4.7.0", "Go away"))
        self.connect(policy=policy)
        self.send(b"EHLO c\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN AGFwcABzZWNyZXQ=\r\nMAIL FROM:<a@b.c>\r\n"),
            ["421 4.7.0 Go away"],
        )
        self.assertTrue(self.transport.disconnecting)
        self.assertNotIn(("authenticate", "app"), policy.calls)
        self.assertNotIn(("MAIL", "a@b.c", None), policy.calls)

    def test_temporaryRefusalsDoNotCount(self):
        """
        A C{454} from C{authenticate} (an attempt refused unchecked) is
        answered as it is and does not count toward the three failures that
        end a session; a C{421} from it closes the connection.
        """
        policy = FakePolicy(authAvailable=True, authAnswer=reply(454, "4.7.0", "Later"))
        self.connect(policy=policy)
        self.send(b"EHLO c\r\n")
        bad = b"AUTH PLAIN AGFwcAB3cm9uZw==\r\n"
        for _ in range(4):
            self.assertEqual(self.send(bad), ["454 4.7.0 Later"])
        self.assertFalse(self.transport.disconnecting)
        policy.authAnswer = reply(421, "4.7.0", "Closing")
        self.assertEqual(self.send(bad), ["421 4.7.0 Closing"])
        self.assertTrue(self.transport.disconnecting)

    def test_pendingAuthenticationBlocksInput(self):
        """
        While C{authenticate} has not answered (a delayed failure), nothing
        after AUTH is run; its answer comes first.
        """
        pending = Deferred()
        policy = FakePolicy(authAvailable=True, pendingAuth=pending)
        self.connect(policy=policy)
        self.send(b"EHLO c\r\n")
        self.assertEqual(self.send(b"AUTH PLAIN AGFwcAB3cm9uZw==\r\nNOOP\r\n"), [])
        pending.errback(reply(535, "5.7.8", "Authentication credentials invalid"))
        self.assertEqual(self.codes(self.replies()), ["535", "250"])

    def test_connectionLostCancelsAuthentication(self):
        """
        When the client hangs up while C{authenticate} is pending, its
        Deferred is cancelled, the session ends cleanly and nothing is
        written or logged as an error.
        """
        cancelled = []
        pending = Deferred(lambda d: cancelled.append(True))
        policy = FakePolicy(authAvailable=True, pendingAuth=pending)
        self.connect(policy=policy)
        self.send(b"EHLO c\r\nAUTH PLAIN AGFwcAB3cm9uZw==\r\n")
        self.protocol.connectionLost(None)
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.replies(), [])
        self.assertEqual(policy.lost, 1)
        self.assertEqual(self.flushLoggedErrors(), [])


class ShutDownTests(ServerMixin, SynchronousTestCase):
    """
    L{HardenedESMTP.shutDown}: the session ends at its next command with
    C{421 4.3.2}; a message being received or stored is finished first.
    """

    SHUTTING_DOWN = "421 4.3.2 relay.example Service shutting down, closing connection"

    def lose(self):
        """The transport has closed: tell the protocol, as a reactor would."""
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(None)

    def test_betweenCommands(self):
        """An idle session is answered 421 at once and closed."""
        self.connect()
        self.send(b"EHLO c\r\n")
        done = self.protocol.shutDown()
        self.assertEqual(self.replies(), [self.SHUTTING_DOWN])
        self.assertNoResult(done)
        self.lose()
        self.successResultOf(done)
        self.assertEqual(self.policy.lost, 1)

    def test_transactionNotYetInData(self):
        """After MAIL and RCPT but before DATA, nothing was sent: 421 at once."""
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\n")
        self.protocol.shutDown()
        self.assertEqual(self.replies(), [self.SHUTTING_DOWN])
        self.assertEqual(self.policy.messages, [])

    def test_duringData(self):
        """
        A message being received is read to its end and answered; then
        421, and what the client pipelined after it is not run.
        """
        self.connect()
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nSubject: hi\r\n")
        done = self.protocol.shutDown()
        self.assertEqual(self.replies(), [])
        self.assertFalse(self.transport.disconnecting)
        lines = self.send(b"\r\nbody\r\n.\r\nMAIL FROM:<c@d.com>\r\n")
        self.assertEqual(lines, ["250 2.0.0 OK 79/BC-00001-5C348706", self.SHUTTING_DOWN])
        self.assertEqual(len(self.policy.messages), 1)
        self.assertEqual(self.policy.calls, [("MAIL", "a@b.com", None), ("RCPT", "x@y.com")])
        self.lose()
        self.successResultOf(done)

    def test_whileStoring(self):
        """
        A message being stored gets its 250 once stored, then 421; the
        returned Deferred waits for both.
        """
        pending = Deferred()
        self.connect(policy=FakePolicy(pendingMessage=pending))
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nhi\r\n.\r\n")
        done = self.protocol.shutDown()
        self.assertEqual(self.replies(), [])
        pending.callback("79/BC-00002-5C348706")
        self.assertEqual(
            self.replies(), ["250 2.0.0 OK 79/BC-00002-5C348706", self.SHUTTING_DOWN]
        )
        self.assertNoResult(done)
        self.lose()
        self.successResultOf(done)

    def test_storeFails(self):
        """A message the store refuses gets its 451, then 421."""
        self.connect(policy=FakePolicy(storeFailure=OSError("disk on fire")))
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\n")
        self.protocol.shutDown()
        lines = self.send(b"hi\r\n.\r\n")
        self.flushLoggedErrors(OSError)
        self.assertEqual(self.codes(lines), ["451", "421"])

    def test_abortedWhileStoring(self):
        """
        If the connection is cut while the message is being stored, the
        Deferred still waits for the store (whose event comes after it).
        """
        pending = Deferred()
        self.connect(policy=FakePolicy(pendingMessage=pending))
        self.send(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nhi\r\n.\r\n")
        done = self.protocol.shutDown()
        self.protocol.connectionLost(None)
        self.assertNoResult(done)
        pending.callback("79/BC-00002-5C348706")
        self.successResultOf(done)

    def test_alreadyClosed(self):
        """On a session whose connection is gone, it fires at once."""
        self.connect()
        self.protocol.connectionLost(None)
        self.successResultOf(self.protocol.shutDown())
