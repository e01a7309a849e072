"""
End-to-end: the scheduler, the smarthost router and the real ESMTP client
deliver over loopback TCP (STARTTLS included) to an in-process
L{twisted.mail.smtp} server.  Uses the real reactor and an OS-chosen port.
"""

import os
import re

import twisted.test
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ServerFactory
from twisted.internet.ssl import PrivateCertificate
from twisted.mail import smtp
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from smartrelay.engine.workers import WorkerPool
from smartrelay.outbound.pool import Connector, DestinationPolicy, Limits, TLSContexts
from smartrelay.outbound.remote import WorkerConnector
from smartrelay.outbound.router import SmarthostRouter
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import (
    Delays,
    FakeSpool,
    RecordingEvents,
    ScriptedSMTPServer,
    SMTPScript,
    makeEntry,
)
from tests.certs import selfSigned


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, server, sender, recipient):
        self.server, self.sender, self.recipient = server, sender, recipient
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        self.server.received.append(
            (self.sender, self.recipient, b"".join(l + b"\r\n" for l in self.lines))
        )
        return smtp.defer.succeed(b"ok")

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class RecordingDelivery:
    """
    Accepts mail for anyone but nobody@; records what it gets.
    """

    def __init__(self):
        self.received = []

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        if user.dest.local == b"nobody":
            raise smtp.SMTPBadRcpt(user)
        return lambda: _Message(self, str(user.orig), str(user.dest))


class RecordingServerFactory(smtp.SMTPFactory):
    """
    ESMTP with STARTTLS; remembers TLS use and when connections end.
    """

    def __init__(self, delivery, tlsContext):
        smtp.SMTPFactory.__init__(self)
        self.delivery = delivery
        self.tlsContext = tlsContext
        self.protocols = []
        self.closed = []

    def buildProtocol(self, addr):
        factory = self

        class Server(smtp.ESMTP):
            def connectionLost(self, reason):
                smtp.ESMTP.connectionLost(self, reason)
                factory.closed.append(self)

        protocol = Server(contextFactory=self.tlsContext)
        protocol.factory = self
        protocol.host = b"mx.test"
        protocol.delivery = self.delivery
        self.protocols.append(protocol)
        return protocol


class WaitingEvents(RecordingEvents):
    """
    Fires C{waiting} once C{count} events were emitted.
    """

    def __init__(self, count):
        super().__init__()
        self.count = count
        self.waiting = Deferred()

    def emit(self, *args, **kwargs):
        super().emit(*args, **kwargs)
        if len(self.emitted) == self.count:
            reactor.callLater(0, self.waiting.callback, self.emitted)


class EndToEndTests(TestCase):
    """
    Real sockets on loopback.
    """

    timeout = 30

    @inlineCallbacks
    def test_deliverOverLoopbackWithSTARTTLS(self):
        """A message with dot lines goes through STARTTLS to a Twisted SMTP server intact; a refused recipient bounces."""
        pem = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")
        with open(pem, "rb") as f:
            serverTLS = PrivateCertificate.loadPEM(f.read()).options()
        delivery = RecordingDelivery()
        factory = RecordingServerFactory(delivery, serverTLS)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)

        data = (
            b"From: app@sender.example\r\nTo: alice@example.com\r\nSubject: e2e\r\n"
            b"X-SmartRelay-ID: 79/BC-12331-5C348706\r\n\r\n"
            b".leading dot\r\n.\r\n..two dots\r\nend\r\n"
        )
        spool = FakeSpool()
        entry = spool.add(
            makeEntry("79/BC-12331-5C348706", ["alice@example.com", "nobody@example.com"],
                      received=reactor.seconds()),
            data,
        )
        events = WaitingEvents(count=2)
        scheduler = DeliveryScheduler(
            spool=spool,
            router=SmarthostRouter(reactor, f"tcp:127.0.0.1:{port.getHost().port}", 5),
            connector=Connector(reactor, "relay.test", 10),
            events=events,
            clock=reactor,
            retry=Delays((60,)),
            maxAge=3600,
            maxConnections=2,
        )
        scheduler.startService()
        scheduler.enqueue(entry)
        emitted = yield events.waiting
        yield scheduler.stopService()

        byRecipient = {e[2]: e for e in emitted}
        delivered = byRecipient["alice@example.com"]
        self.assertEqual(delivered[0], "delivered")
        self.assertEqual(delivered[3]["code"], 250)
        self.assertTrue(delivered[3]["tls"])
        bounced = byRecipient["nobody@example.com"]
        # Twisted's "550 Cannot receive for specified address" names no
        # reason (Sisimai's "onhold"): a soft bounce (only unknown users and
        # domains are hard).
        self.assertEqual(
            (bounced[0], bounced[3]["kind"], bounced[3]["reason"]), ("bounced", "soft", "onhold")
        )
        self.assertTrue(bounced[3]["diagnostic"].startswith("550 "))

        self.assertEqual(
            delivery.received, [("app@sender.example", "alice@example.com", data)]
        )
        self.assertTrue(factory.protocols[0].startedTLS)
        self.assertEqual(spool.removed, ["79/BC-12331-5C348706"])
        self.assertEqual(scheduler.queued(), 0)

        # Let the server side see the connection close before the test ends.
        while len(factory.closed) < len(factory.protocols):
            d = Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d


class ScriptedServerFactory(ServerFactory):
    """
    L{ScriptedSMTPServer}s over real TCP, counting sessions: C{peak} is
    the most open at once.
    """

    def __init__(self, script):
        self.script = script
        self.servers = []
        self.open = 0
        self.peak = 0
        self.gone = Deferred()

    def buildProtocol(self, addr):
        factory = self

        class Counting(ScriptedSMTPServer):
            def connectionMade(self):
                factory.open += 1
                factory.peak = max(factory.peak, factory.open)
                ScriptedSMTPServer.connectionMade(self)

            def connectionLost(self, reason):
                factory.open -= 1
                ScriptedSMTPServer.connectionLost(self, reason)

        server = Counting(self.script)
        self.servers.append(server)
        return server

    def messages(self):
        return [c for server in self.servers for c in server.commands if c.startswith(b"MAIL")]


def _sleep(seconds):
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class PooledDeliveryTests(TestCase):
    """
    The delivery engine against scripted servers on loopback: pooled
    sessions, connection limits, replies that throttle, stalls, drops and
    TLS policies, over real sockets.
    """

    timeout = 60

    @inlineCallbacks
    def serve(self, script, tlsContext=None):
        factory = ScriptedServerFactory(script)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def scheduler(self, port, events, host="127.0.0.1", limits=None, contexts=None, timeout=10):
        spool = FakeSpool()
        scheduler = DeliveryScheduler(
            spool=spool,
            router=SmarthostRouter(reactor, f"tcp:host={host}:port={port}", 5),
            connector=self.connector(Connector(reactor, "relay.test", timeout, contexts or TLSContexts())),
            events=events,
            clock=reactor,
            retry=Delays((600,)),
            maxAge=3600,
            maxConnections=20,
            policy=DestinationPolicy(defaults=limits or Limits()),
            throttlePatterns=(re.compile("slow down", re.I),),
            idleTimeout=5,
        )
        scheduler.startService()
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return spool, scheduler

    def connector(self, local):
        """
        The scheduler's connector: here the relay's own; see
        L{WorkerPooledDeliveryTests}.
        """
        return local

    def submit(self, spool, scheduler, count, data=b"Subject: pooled\r\n\r\nhello\r\n"):
        for i in range(count):
            entry = makeEntry(f"79/BC-{i:05d}-5C348706", [f"r{i}@example.com"], received=reactor.seconds())
            spool.add(entry, data)
            scheduler.enqueue(entry)

    @inlineCallbacks
    def test_connectionLimitAndReuse(self):
        """
        Twenty messages to one destination limited to two connections: the
        server never sees more than two sessions, which carry all the mail.
        """
        factory, port = yield self.serve(SMTPScript(ehlo=[b"250-mx.test", b"250 PIPELINING"]))
        events = WaitingEvents(count=20)
        spool, scheduler = self.scheduler(port, events, limits=Limits(maxConnections=2))
        self.submit(spool, scheduler, 20)
        emitted = yield events.waiting
        self.assertEqual({e[0] for e in emitted}, {"delivered"})
        self.assertEqual(factory.peak, 2)
        self.assertEqual(len(factory.servers), 2)
        self.assertEqual(len(factory.messages()), 20)
        yield scheduler.stopService()
        while factory.open:
            yield _sleep(0.01)
        self.assertTrue(all(s.commands[-1] == b"QUIT" for s in factory.servers))

    @inlineCallbacks
    def test_throttlingReply(self):
        """A 421 closes the session, defers the message, and halves the destination's budget."""
        script = SMTPScript(final=b"421 4.7.0 slow down, too many messages")
        factory, port = yield self.serve(script)
        events = WaitingEvents(count=1)
        spool, scheduler = self.scheduler(port, events, limits=Limits(maxConnections=4))
        self.submit(spool, scheduler, 1)
        ((kind, _, _, detail),) = yield events.waiting
        self.assertEqual((kind, detail["code"]), ("deferred", 421))
        self.assertEqual(detail["throttle"]["max_connections"], 2)
        (state,) = scheduler.destinations()
        self.assertTrue(state["throttled"])

    @inlineCallbacks
    def test_permanentAndTemporaryReplies(self):
        """5xx bounces, 4xx defers, per recipient, over one pipelined transaction."""
        script = SMTPScript(
            ehlo=[b"250-mx.test", b"250 PIPELINING"],
            rcpt={
                "r0@example.com": b"550 5.1.1 no such user",
                "r1@example.com": b"452 4.2.2 mailbox full",
            },
        )
        factory, port = yield self.serve(script)
        events = WaitingEvents(count=3)
        spool, scheduler = self.scheduler(port, events, limits=Limits(maxConnections=1))
        self.submit(spool, scheduler, 3)
        emitted = yield events.waiting
        kinds = {e[2]: e[0] for e in emitted}
        self.assertEqual(
            kinds,
            {"r0@example.com": "bounced", "r1@example.com": "deferred", "r2@example.com": "delivered"},
        )

    @inlineCallbacks
    def test_droppedConnection(self):
        """A server that drops the connection in the middle of DATA: the message is deferred."""
        factory, port = yield self.serve(SMTPScript(dropMidData=True))
        events = WaitingEvents(count=1)
        spool, scheduler = self.scheduler(port, events)
        self.submit(spool, scheduler, 1)
        ((kind, _, _, detail),) = yield events.waiting
        self.assertEqual((kind, detail["status"]), ("deferred", "4.4.2"))
        self.assertIn("lost", detail["reply"])

    @inlineCallbacks
    def test_stall(self):
        """A server that stops answering is given up on after the reply timeout."""
        factory, port = yield self.serve(SMTPScript(silentAt=b"DATA"))
        events = WaitingEvents(count=1)
        spool, scheduler = self.scheduler(port, events, timeout=0.5)
        self.submit(spool, scheduler, 1)
        ((kind, _, _, detail),) = yield events.waiting
        self.assertEqual((kind, detail["status"]), ("deferred", "4.4.2"))
        self.assertIn("timeout", detail["reply"])

    @inlineCallbacks
    def tlsServer(self, names=("localhost",)):
        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = selfSigned("localhost", dnsNames=names)
        ca = os.path.join(directory, "ca.pem")
        with open(ca, "wb") as f:
            f.write(certificate)
        serverTLS = PrivateCertificate.loadPEM(certificate + key).options()
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"], tlsContext=serverTLS)
        factory, port = yield self.serve(script)
        return factory, port, ca

    @inlineCallbacks
    def test_tlsVerified(self):
        """tls = verify: a certificate that names the host and chains to the CA is used."""
        factory, port, ca = yield self.tlsServer()
        events = WaitingEvents(count=1)
        spool, scheduler = self.scheduler(
            port, events, host="localhost", limits=Limits(tls="verify"), contexts=TLSContexts(ca)
        )
        self.submit(spool, scheduler, 1)
        ((kind, _, _, detail),) = yield events.waiting
        self.assertEqual((kind, detail["tls"]), ("delivered", True))

    @inlineCallbacks
    def test_tlsVerifyWrongName(self):
        """tls = verify and the certificate does not name the host: deferred, nothing sent in the clear."""
        factory, port, ca = yield self.tlsServer(names=("other.example",))
        events = WaitingEvents(count=1)
        spool, scheduler = self.scheduler(
            port, events, host="localhost", limits=Limits(tls="verify"), contexts=TLSContexts(ca)
        )
        self.submit(spool, scheduler, 1)
        ((kind, _, _, detail),) = yield events.waiting
        self.assertEqual((kind, detail["status"]), ("deferred", "4.7.5"))
        self.assertEqual(factory.messages(), [])
        self.assertEqual(len(factory.servers), 1)

    @inlineCallbacks
    def test_tlsRequiredNotOffered(self):
        """tls = required and no STARTTLS on offer: deferred, no MAIL sent."""
        factory, port = yield self.serve(SMTPScript())
        events = WaitingEvents(count=1)
        spool, scheduler = self.scheduler(port, events, limits=Limits(tls="required"))
        self.submit(spool, scheduler, 1)
        ((kind, _, _, detail),) = yield events.waiting
        self.assertEqual((kind, detail["status"]), ("deferred", "4.7.10"))
        self.assertEqual(factory.messages(), [])
        while factory.open:  # the client says QUIT after giving up
            yield _sleep(0.01)


class WorkerPooledDeliveryTests(PooledDeliveryTests):
    """
    The same, with the sessions in a real worker process
    (L{smartrelay.outbound.remote}): a child of this process speaking SMTP
    to the scripted servers here, TLS policies and timeouts included.
    """

    def connector(self, local):
        pool = WorkerPool(reactor, 1)
        pool.start(None, None)
        self.addCleanup(pool.stop)
        connector = WorkerConnector(pool, local)
        self.connectors = getattr(self, "connectors", []) + [connector]
        return connector

    @inlineCallbacks
    def test_sessionsInTheWorker(self):
        """The sessions are the worker's: the relay's connector opened none."""
        factory, port = yield self.serve(SMTPScript(ehlo=[b"250-mx.test", b"250 PIPELINING"]))
        events = WaitingEvents(count=3)
        spool, scheduler = self.scheduler(port, events, limits=Limits(maxConnections=1))
        self.submit(spool, scheduler, 3)
        emitted = yield events.waiting
        self.assertEqual({e[0] for e in emitted}, {"delivered"})
        [connector] = self.connectors
        self.assertEqual(connector.sessions, 1)
        self.assertEqual(len(factory.messages()), 3)
        yield scheduler.stopService()
        self.assertEqual(connector.sessions, 0)
