"""
Tests for L{smartrelay.smtp.submission}: the submission policy (limits,
access, AUTH, what happens to an accepted message) and the protocol and
policy together over an in-memory connection.
"""

import ipaddress

from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.auth import HashedPasswordChecker, PasswordFile, hashPassword
from smartrelay.config import ConfigError, defaultConfig, parseConfig
from smartrelay.events import EventLog
from smartrelay.ids import LEASE, IDState, isQueueID, startRun
from smartrelay.smtp.protocol import Session
from smartrelay.smtp.replies import SMTPReply
from smartrelay.smtp.submission import (
    SubmissionFactory,
    SubmissionPolicy,
    makeLoginLimiter,
    removeHeader,
    traceHeaders,
)
from smartrelay.ratelimit import LoginLimiter
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
        # The header block as stored, in the first recipient's event only.
        self.assertEqual(
            events[0].detail["headers"], data[: data.index(b"\r\n\r\n") + 2].decode()
        )
        self.assertTrue(events[0].detail["headers"].endswith("Subject: hi\r\n"))
        self.assertNotIn("headers", events[1].detail)

    def test_eventHeadersBounded(self):
        """The headers kept in an event are at most 16 KiB, undecodable bytes replaced."""
        from smartrelay.smtp.submission import MAX_EVENT_HEADERS, eventHeaders

        self.assertEqual(eventHeaders(b"A: \xff\r\n\r\nbody"), "A: \ufffd\r\n")
        self.assertEqual(eventHeaders(b"A: b\r\n"), "A: b\r\n")
        big = b"X: " + b"y" * 100_000 + b"\r\n\r\n"
        self.assertEqual(len(eventHeaders(big)), MAX_EVENT_HEADERS)

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


class CountingChecker:
    """
    A L{HashedPasswordChecker} (cheap scrypt) whose password checks are
    counted: each one is a call of its C{runInThread}.
    """

    def __init__(self, passwords):
        self.hashes = 0

        def runInThread(f, *args):
            self.hashes += 1
            return maybeDeferred(f, *args)

        self.checker = HashedPasswordChecker(
            PasswordFile.parse(
                "".join(f"{user}:{hashPassword(pw, ln=4)}\n" for user, pw in passwords.items())
            ),
            runInThread,
        )

    def requestAvatarId(self, credentials):
        return self.checker.requestAvatarId(credentials)


def plain(user: str, password: str) -> bytes:
    import base64

    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


class AuthLimitTests(PolicyMixin, SynchronousTestCase):
    """
    The failed-AUTH limits (L{smartrelay.ratelimit.LoginLimiter}) through
    the policy and the protocol, over in-memory connections on a Clock.
    """

    def setUp(self):
        self.passwords = CountingChecker({"app1": "right", "app2": "other"})
        self.limiter = LoginLimiter(
            # Built before makePolicy sets self.clock: it reads the clock
            # through this object.
            self,
            clientRate=(3, 900.0),
            userRate=(6, 3600.0),
            lockout=900.0,
            delay=1.0,
            service="SMTP AUTH",
        )
        self.makePolicy(checker=self.passwords, limiter=self.limiter)
        self.factory = SubmissionFactory(
            policy=self.policy, clock=self.clock, hostname="relay.example", maxMessageSize=1000
        )

    def seconds(self):
        return self.clock.seconds()

    def connect(self, peer):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 5000))
        protocol.makeConnection(transport)
        # AUTH is offered without TLS only on loopback; these tests play
        # remote clients on loopback-like terms.
        protocol.session.loopback = True
        protocol.dataReceived(b"EHLO c\r\n")
        transport.clear()
        return protocol, transport

    def auth(self, connection, user, password, advance=0.0):
        protocol, transport = connection
        protocol.dataReceived(b"AUTH PLAIN " + plain(user, password) + b"\r\n")
        if advance:
            self.clock.advance(advance)
        answer = transport.value().decode()
        transport.clear()
        return answer

    def test_failureAnsweredAfterTheDelay(self):
        """
        A wrong password is answered 535 only when the delay has passed on
        the clock, and the delay doubles with the address's failures;
        nothing else the client sent is run meanwhile.
        """
        connection = self.connect("192.0.2.1")
        protocol, transport = connection
        self.assertEqual(self.auth(connection, "app1", "wrong"), "")
        protocol.dataReceived(b"NOOP\r\n")
        self.clock.advance(0.999)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.001)
        self.assertEqual(
            transport.value(),
            b"535 5.7.8 Authentication credentials invalid\r\n250 2.0.0 OK\r\n",
        )
        transport.clear()
        self.assertEqual(self.auth(connection, "app1", "wrong", advance=1.9), "")
        self.clock.advance(0.1)
        self.assertTrue(transport.value().startswith(b"535 "))

    def test_lockedClientCostsNoHash(self):
        """
        Once an address has failed C{clientRate} times, AUTH from it is
        answered 454 4.7.0 at the AUTH command, without a password check;
        a second AUTH in that session gets 421 4.7.0 and the connection is
        closed.
        """
        for user in ["app1", "app2", "nobody"]:
            connection = self.connect("192.0.2.1")
            self.auth(connection, user, "wrong", advance=15)
        self.assertEqual(self.passwords.hashes, 3)
        protocol, transport = connection = self.connect("192.0.2.1")
        self.assertEqual(
            self.auth(connection, "app1", "right"),
            "454 4.7.0 Too many failed authentications, try again later\r\n",
        )
        self.assertEqual(
            self.auth(connection, "app1", "right"),
            "421 4.7.0 Too many failed authentications, try again later; closing connection\r\n",
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.passwords.hashes, 3)
        self.assertEqual(self.limiter.counts["refused"], 2)

    def test_loginLocked(self):
        """
        AUTH LOGIN from a locked address is refused before the exchange:
        no 334 challenge.
        """
        for user in ["a", "b", "c"]:
            self.auth(self.connect("192.0.2.1"), user, "wrong", advance=15)
        protocol, transport = self.connect("192.0.2.1")
        protocol.dataReceived(b"AUTH LOGIN\r\n")
        self.assertTrue(transport.value().startswith(b"454 4.7.0 "))

    def test_rightPasswordFromElsewhere(self):
        """
        While one address is locked out for guessing app1's password, app1
        logs in from another address, and then submits.
        """
        for _ in range(3):
            self.auth(self.connect("192.0.2.1"), "app1", "wrong", advance=15)
        self.assertTrue(
            self.auth(self.connect("192.0.2.1"), "app1", "right").startswith("454 ")
        )
        connection = self.connect("198.51.100.7")
        self.assertEqual(
            self.auth(connection, "app1", "right"), "235 2.7.0 Authentication successful\r\n"
        )
        protocol, transport = connection
        protocol.dataReceived(b"MAIL FROM:<a@b.com>\r\nRCPT TO:<x@y.com>\r\n")
        self.assertEqual(transport.value(), b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n")

    def test_distributedGuessingSparesTheUsersAddress(self):
        """
        Guesses for app1 from many addresses lock the user name out for
        new addresses, not for the address app1 logged in from before.
        """
        self.auth(self.connect("198.51.100.7"), "app1", "right")
        for i in range(6):
            self.auth(self.connect(f"192.0.2.{i}"), "app1", "wrong", advance=15)
        hashes = self.passwords.hashes
        self.assertTrue(
            self.auth(self.connect("203.0.113.9"), "app1", "right").startswith("454 4.7.0 ")
        )
        self.assertEqual(self.passwords.hashes, hashes)
        self.assertTrue(
            self.auth(self.connect("198.51.100.7"), "app1", "right").startswith("235 ")
        )

    def test_hangUpDuringTheDelay(self):
        """
        A client that hangs up while its failure answer is delayed leaves
        no timer behind, and its failure still counts.
        """
        protocol, transport = connection = self.connect("192.0.2.1")
        self.auth(connection, "app1", "wrong")
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # delay + idle timeout
        protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.limiter.perClient.failures("192.0.2.1"), 1)
        self.assertEqual(self.factory.sessions, set())
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_checkerErrorCountsNothing(self):
        """
        A checker that breaks (not a wrong password) is a 451 for the
        client, is logged, and counts neither as a failure nor as a success.
        """

        class Broken:
            def requestAvatarId(self, credentials):
                return fail(OSError("thread pool gone"))

        self.policy.checker = Broken()
        answer = self.auth(self.connect("192.0.2.1"), "app1", "right")
        self.assertTrue(answer.startswith("451 4.3.0 "), answer)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.limiter.perClient.failures("192.0.2.1"), 0)
        self.assertEqual(self.limiter.perClient.retryAfter("192.0.2.1"), 0)

    def test_failureLogged(self):
        """
        Each failure is one line with the user name (escaped) and the
        client address; a lock-out adds one warning naming both.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(3):
            self.auth(self.connect("192.0.2.1"), "ap\np1", "wrong", advance=15)
        texts = [formatEvent(e) for e in logged]
        self.assertIn("failed SMTP AUTH for 'ap\\np1' from 192.0.2.1 (answered after 1s)", texts)
        self.assertIn(
            "SMTP AUTH: client locked out for 900s after 3 failed logins; "
            "last: client 192.0.2.1 user 'ap\\np1'",
            texts,
        )

    def test_longUserName(self):
        """
        A user name as long as a command line allows is refused like any
        other and is kept by the limiter as a short hash, not as sent.
        """
        connection = self.connect("192.0.2.1")
        self.assertEqual(self.auth(connection, "x" * 1400, "wrong", advance=1), "535 5.7.8 Authentication credentials invalid\r\n")
        [key] = self.limiter.perUser._records
        self.assertTrue(key.startswith("sha256:"), key)
        self.assertLess(len(key), 100)

    def test_withoutLimiter(self):
        """
        A policy without a limiter answers failures at once and never
        refuses AUTH.
        """
        self.policy.limiter = None
        for _ in range(5):
            self.assertTrue(
                self.auth(self.connect("192.0.2.1"), "app1", "wrong").startswith("535 ")
            )
        self.assertEqual(self.passwords.hashes, 5)


class LimiterConfigTests(SynchronousTestCase):
    """
    The C{[smtp] auth_*} keys and L{makeLoginLimiter}.
    """

    def test_defaults(self):
        """
        On by default: 10 failures per 15 minutes per address, 100 an hour
        per user name, 15 minutes locked, a 1 s first delay up to 15 s.
        """
        limiter = makeLoginLimiter(defaultConfig().smtp, Clock())
        self.assertEqual(
            (limiter.perClient.count, limiter.perClient.period, limiter.perClient.lockout),
            (10, 900.0, 900.0),
        )
        self.assertEqual((limiter.perUser.count, limiter.perUser.period), (100, 3600.0))
        self.assertEqual((limiter.delay, limiter.maxDelay), (1.0, 15.0))

    def test_keys(self):
        """
        The keys set the limits; C{off} turns one off; a delay longer than
        15 s is the longest delay too.
        """
        smtp = parseConfig(
            "[smtp]\nauth_client_failures = 5/m\nauth_user_failures = off\n"
            "auth_lockout = 1h\nauth_failure_delay = 20s\n"
        ).smtp
        limiter = makeLoginLimiter(smtp, Clock())
        self.assertEqual((limiter.perClient.count, limiter.perClient.period), (5, 60.0))
        self.assertEqual(limiter.perClient.lockout, 3600.0)
        self.assertIsNone(limiter.perUser)
        self.assertEqual((limiter.delay, limiter.maxDelay), (20.0, 20.0))

    def test_allOff(self):
        """
        Both limits off and no delay: no limiter at all.
        """
        smtp = parseConfig(
            "[smtp]\nauth_client_failures = off\nauth_user_failures = none\n"
            "auth_failure_delay = 0\n"
        ).smtp
        self.assertIsNone(makeLoginLimiter(smtp, Clock()))

    def test_badValues(self):
        """
        A bad value stops start-up with one line naming the key.
        """
        for text, message in [
            ("auth_client_failures = 10", "[smtp] auth_client_failures: expected failures per period such as '10/15m', or 'off', got '10'"),
            ("auth_user_failures = 0/h", "[smtp] auth_user_failures: expected failures per period"),
            ("auth_lockout = 0", "[smtp] auth_lockout:"),
            ("auth_failure_delay = soon", "[smtp] auth_failure_delay:"),
        ]:
            e = self.assertRaises(ConfigError, parseConfig, "[smtp]\n" + text + "\n", "x.ini")
            self.assertIn(message, str(e))
            self.assertNotIn("\n", str(e))
