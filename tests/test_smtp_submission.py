"""
Tests for L{smartrelay.smtp.submission}: the submission policy (limits,
access, AUTH, what happens to an accepted message) and the protocol and
policy together over an in-memory connection.
"""

import ipaddress

from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.auth import HashedPasswordChecker, PasswordFile, hashPassword
from smartrelay.events import EventLog
from smartrelay.ids import LEASE, IDState, isQueueID, startRun
from smartrelay.smtp.protocol import Session
from smartrelay.smtp.replies import SMTPReply
from smartrelay.smtp.submission import (
    SubmissionFactory,
    SubmissionPolicy,
    removeHeader,
    traceHeaders,
)
from smartrelay.spool import SpoolError
from smartrelay.store.memory import MemoryStore

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class FakeSpool:
    def __init__(self):
        self.stored = []
        self.failure = None

    def store(self, entry, data):
        if self.failure is not None:
            return fail(self.failure)
        self.stored.append((entry, data))
        return succeed(entry)


class PolicyMixin:
    def makePolicy(self, **kwargs):
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.spool = FakeSpool()
        self.store = MemoryStore()
        self.successResultOf(self.store.start())
        self.events = EventLog(self.store, self.clock)
        self.enqueued = []
        _, generator = startRun(IDState(), self.clock.seconds(), node=0x79)
        defaults = dict(
            clock=self.clock,
            hostname="relay.example",
            spool=self.spool,
            ids=generator,
            events=self.events,
            enqueue=self.enqueued.append,
            allowedClients=LOOPBACK,
        )
        defaults.update(kwargs)
        self.policy = SubmissionPolicy(**defaults)
        return self.policy

    def storedEvents(self):
        self.clock.advance(0)
        return self.successResultOf(self.store.queryEvents(limit=1000)).events


class LimitsTests(PolicyMixin, SynchronousTestCase):
    def test_globalLimit(self):
        """
        Past max_connections new clients get 421 4.7.0; a slot frees when a
        client leaves.
        """
        policy = self.makePolicy(maxConnections=2)
        sessions = [Session(peer="10.0.0.%d" % i, loopback=False) for i in range(3)]
        policy.connectionMade(sessions[0])
        policy.connectionMade(sessions[1])
        refusal = self.assertRaises(SMTPReply, policy.connectionMade, sessions[2])
        self.assertEqual((refusal.code, refusal.status), (421, "4.7.0"))
        policy.connectionLost(sessions[0])
        policy.connectionMade(sessions[2])

    def test_perClientLimit(self):
        """
        Past max_connections_per_client one address is refused, others not.
        """
        policy = self.makePolicy(maxConnectionsPerClient=1)
        policy.connectionMade(Session(peer="10.0.0.1", loopback=False))
        self.assertRaises(SMTPReply, policy.connectionMade, Session(peer="10.0.0.1", loopback=False))
        policy.connectionMade(Session(peer="10.0.0.2", loopback=False))
        self.assertEqual(policy.perClient, {"10.0.0.1": 1, "10.0.0.2": 1})


class AccessTests(PolicyMixin, SynchronousTestCase):
    def test_allowedClient(self):
        """
        Clients in allowed_clients may submit without AUTH.
        """
        policy = self.makePolicy()
        policy.checkSender(Session(peer="127.0.0.1", loopback=True), "a@b.c", None)

    def test_ipv4MappedAddress(self):
        """
        An IPv4-mapped IPv6 peer is matched as IPv4.
        """
        policy = self.makePolicy()
        policy.checkSender(Session(peer="::ffff:127.0.0.1", loopback=False), "a@b.c", None)

    def test_strangerRefused(self):
        """
        Anyone else gets 554 5.7.1 at MAIL and at RCPT: never an open relay.
        """
        policy = self.makePolicy()
        stranger = Session(peer="192.0.2.1", loopback=False)
        refusal = self.assertRaises(SMTPReply, policy.checkSender, stranger, "a@b.c", None)
        self.assertEqual((refusal.code, refusal.status), (554, "5.7.1"))
        refusal = self.assertRaises(SMTPReply, policy.checkRecipient, stranger, "a@b.c", "x@y.z", 0)
        self.assertEqual(refusal.code, 554)

    def test_nonIPPeerRefused(self):
        """
        A peer without an IP address (UNIX socket) must authenticate.
        """
        policy = self.makePolicy()
        self.assertRaises(
            SMTPReply, policy.checkSender, Session(peer="/tmp/s", loopback=False), "a@b.c", None
        )

    def test_authenticatedUserAllowed(self):
        """
        An authenticated user may submit from anywhere.
        """
        policy = self.makePolicy(allowedClients=())
        policy.checkSender(Session(peer="192.0.2.1", loopback=False, user="app"), "a@b.c", None)

    def test_authenticate(self):
        """
        AUTH asks the credentials checker; a wrong password is 535 5.7.8.
        """
        passwords = PasswordFile.parse("app:" + hashPassword("secret", ln=4) + "\n")
        checker = HashedPasswordChecker(passwords, maybeDeferred)
        policy = self.makePolicy(checker=checker)
        self.assertTrue(policy.authAvailable)
        session = Session(peer="127.0.0.1", loopback=True)
        self.assertEqual(self.successResultOf(policy.authenticate(session, "app", "secret")), "app")
        failure = self.failureResultOf(policy.authenticate(session, "app", "nope"), SMTPReply)
        self.assertEqual(failure.value.code, 535)

    def test_recipientLimit(self):
        """
        Past max_recipients RCPT gets 452 4.5.3.
        """
        policy = self.makePolicy(maxRecipients=2)
        session = Session(peer="127.0.0.1", loopback=True)
        policy.checkRecipient(session, "", "a@b.c", 1)
        refusal = self.assertRaises(SMTPReply, policy.checkRecipient, session, "", "a@b.c", 2)
        self.assertEqual((refusal.code, refusal.status), (452, "4.5.3"))


class AcceptTests(PolicyMixin, SynchronousTestCase):
    def session(self):
        return Session(peer="127.0.0.1", loopback=True, helo="app.example", esmtp=True)

    def test_accepted(self):
        """
        An accepted message gets a queue id, trace headers, is stored, handed
        to delivery, and each recipient gets an accepted event.
        """
        policy = self.makePolicy()
        queueID = self.successResultOf(
            policy.messageReceived(
                self.session(), "app@example.com", ["a@x.com", "b@y.com"], b"Subject: hi\r\n\r\nbody\r\n"
            )
        )
        self.assertTrue(isQueueID(queueID))
        [(entry, data)] = self.spool.stored
        self.assertEqual(entry.queue_id, queueID)
        self.assertEqual([r.address for r in entry.recipients], ["a@x.com", "b@y.com"])
        self.assertTrue(data.startswith(b"Received: from app.example ([127.0.0.1])\r\n\tby relay.example"))
        self.assertIn(b"X-SmartRelay-ID: " + queueID.encode() + b"\r\nSubject: hi\r\n", data)
        self.assertEqual(self.enqueued, [entry])
        events = self.storedEvents()
        self.assertEqual(
            [(e.type, e.queue_id, e.recipient) for e in events],
            [("accepted", queueID, "a@x.com"), ("accepted", queueID, "b@y.com")],
        )
        self.assertEqual(events[0].detail["sender"], "app@example.com")

    def test_storageFailure(self):
        """
        A spool failure is 451 4.3.0; nothing is queued, no event claims
        acceptance.
        """
        policy = self.makePolicy()
        self.spool.failure = SpoolError("disk full")
        failure = self.failureResultOf(
            policy.messageReceived(self.session(), "", ["a@x.com"], b"x\r\n"), SMTPReply
        )
        self.assertEqual((failure.value.code, failure.value.status), (451, "4.3.0"))
        self.assertEqual(self.enqueued, [])
        self.assertEqual(self.storedEvents(), [])

    def test_leaseExpired(self):
        """
        When queue ids cannot be handed out safely the message gets 451.
        """
        policy = self.makePolicy()
        self.clock.advance(LEASE + 1)
        failure = self.failureResultOf(
            policy.messageReceived(self.session(), "", ["a@x.com"], b"x\r\n"), SMTPReply
        )
        self.assertEqual(failure.value.code, 451)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_renewsLease(self):
        """
        Every accepted message gives the lease a chance to be renewed.
        """
        calls = []
        policy = self.makePolicy(renewLease=lambda: calls.append(1))
        policy.messageReceived(self.session(), "", ["a@x.com"], b"x\r\n")
        self.assertEqual(calls, [1])

    def test_controlHeaders(self):
        """
        Control headers are removed from the stored message; the tag,
        metadata and options are kept with the entry and the tag and
        metadata are in the accepted events.
        """
        policy = self.makePolicy()
        data = (
            b"Subject: hi\r\nX-SmartRelay-Tag: welcome\r\nX-SmartRelay-Track: opens\r\n"
            b"X-SmartRelay-Metadata-user: 42\r\n\r\nbody\r\n"
        )
        queueID = self.successResultOf(
            policy.messageReceived(self.session(), "app@example.com", ["a@x.com"], data)
        )
        [(entry, stored)] = self.spool.stored
        self.assertNotIn(b"X-SmartRelay-Tag", stored)
        self.assertNotIn(b"X-SmartRelay-Track", stored)
        self.assertTrue(stored.endswith(b"Subject: hi\r\n\r\nbody\r\n"))
        self.assertEqual(
            (entry.tag, entry.metadata, entry.options),
            ("welcome", {"user": "42"}, {"opens": True, "clicks": False}),
        )
        [event] = self.storedEvents()
        self.assertEqual((event.queue_id, event.tag, event.metadata), (queueID, "welcome", {"user": "42"}))

    def test_badControlHeader(self):
        """
        A bad control header refuses the message with 554 5.6.0 naming the
        header; nothing is stored; each recipient gets a rejected event.
        """
        policy = self.makePolicy()
        failure = self.failureResultOf(
            policy.messageReceived(
                self.session(), "app@example.com", ["a@x.com"],
                b"X-SmartRelay-Track: always\r\n\r\nbody\r\n",
            ),
            SMTPReply,
        )
        self.assertEqual((failure.value.code, failure.value.status), (554, "5.6.0"))
        self.assertIn("X-SmartRelay-Track", failure.value.text)
        self.assertEqual(self.spool.stored, [])
        self.assertEqual(self.enqueued, [])
        [event] = self.storedEvents()
        self.assertEqual((event.type, event.detail["code"]), ("rejected", 554))

    def test_rejectedEvents(self):
        """
        A message refused at DATA leaves a rejected event per recipient.
        """
        from smartrelay.smtp.replies import MESSAGE_TOO_BIG

        policy = self.makePolicy()
        policy.messageRejected(self.session(), "s@x.com", ["a@x.com"], MESSAGE_TOO_BIG)
        [event] = self.storedEvents()
        self.assertEqual((event.type, event.queue_id, event.recipient), ("rejected", None, "a@x.com"))
        self.assertEqual(event.detail["code"], 552)


class HeaderTests(SynchronousTestCase):
    def test_removeHeader(self):
        """
        A client's own X-SmartRelay-ID (with continuation lines) is removed
        from the header section only.
        """
        data = (
            b"X-SmartRelay-ID: forged\r\n\tmore\r\nSubject: s\r\nx-smartrelay-id: again\r\n"
            b"\r\nX-SmartRelay-ID: in the body stays\r\n"
        )
        self.assertEqual(
            removeHeader(data, b"X-SmartRelay-ID"),
            b"Subject: s\r\n\r\nX-SmartRelay-ID: in the body stays\r\n",
        )

    def test_removeHeaderNoBody(self):
        """
        A message that is all header still works.
        """
        self.assertEqual(removeHeader(b"X-SmartRelay-ID: x\r\nA: b\r\n", b"X-SmartRelay-ID"), b"A: b\r\n")

    def test_traceProtocol(self):
        """
        The Received header names ESMTPSA for an authenticated TLS session
        and a single recipient.
        """
        session = Session(peer="192.0.2.1", loopback=False, helo="h", esmtp=True, tls=True, user="u")
        header = traceHeaders("79/BC-00001-5C348706", session, "relay.example", ["a@b.c"], 0)
        self.assertIn(b"with ESMTPSA id 79/BC-00001-5C348706 for <a@b.c>;", header)
        self.assertTrue(header.endswith(b"X-SmartRelay-ID: 79/BC-00001-5C348706\r\n"))
        self.assertIn(b"Thu, 01 Jan 1970 00:00:00 +0000", header)


class FactoryTests(PolicyMixin, SynchronousTestCase):
    def test_endToEndInMemory(self):
        """
        The factory's protocol and the policy together accept a message and
        answer with the queue id in the 250.
        """
        policy = self.makePolicy()
        factory = SubmissionFactory(
            policy=policy, clock=self.clock, hostname="relay.example", maxMessageSize=1000
        )
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n"
        )
        lines = transport.value().decode().split("\r\n")
        [ok] = [line for line in lines if line.startswith("250 2.0.0 OK ")]
        self.assertTrue(isQueueID(ok[len("250 2.0.0 OK ") :]))
        self.assertEqual(lines[-2], "221 2.0.0 Bye")
        protocol.connectionLost(None)
        self.assertEqual(policy.connections, 0)

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_shutDown(self):
        """
        C{shutDown} ends every session: an idle one at once with 421, one
        in DATA once its message is stored and answered; it fires when
        every session has ended, and the factory forgets them.
        """
        policy = self.makePolicy()
        factory = SubmissionFactory(
            policy=policy, clock=self.clock, hostname="relay.example", maxMessageSize=1000
        )
        idle, idleTransport = self.connect(factory)
        busy, busyTransport = self.connect(factory)
        busy.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nhi\r\n")
        self.assertEqual(factory.sessions, {idle, busy})
        d = factory.shutDown(30)
        self.assertTrue(
            idleTransport.value().endswith(
                b"421 4.3.2 relay.example Service shutting down, closing connection\r\n"
            )
        )
        idle.connectionLost(None)
        self.assertEqual(factory.sessions, {busy})
        self.assertNoResult(d)
        busyTransport.clear()
        busy.dataReceived(b".\r\n")
        lines = busyTransport.value().decode().split("\r\n")
        self.assertTrue(lines[0].startswith("250 2.0.0 OK "), lines)
        self.assertTrue(lines[1].startswith("421 4.3.2 "), lines)
        busy.connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(factory.sessions, set())
        self.clock.advance(0)  # the accepted event
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shutDownTimeout(self):
        """
        A client that does not finish its message within the timeout is
        cut off: no 250, so it keeps the message.
        """
        policy = self.makePolicy()
        factory = SubmissionFactory(
            policy=policy, clock=self.clock, hostname="relay.example", maxMessageSize=1000
        )
        slow, transport = self.connect(factory)
        slow.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\nDATA\r\nhi\r\n")
        transport.clear()
        d = factory.shutDown(30)
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(b"250", transport.value())
        slow.connectionLost(None)
        self.successResultOf(d)

    def test_shutDownNothingOpen(self):
        """With no session open, it fires at once."""
        factory = SubmissionFactory(
            policy=self.makePolicy(), clock=self.clock, hostname="relay.example", maxMessageSize=1000
        )
        self.successResultOf(factory.shutDown(30))
