"""
End-to-end: the scheduler, the smarthost router and the real ESMTP client
deliver over loopback TCP (STARTTLS included) to an in-process
L{twisted.mail.smtp} server.  Uses the real reactor and an OS-chosen port.
"""

import os

import twisted.test
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import PrivateCertificate
from twisted.mail import smtp
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from smartrelay.outbound.pool import Connector
from smartrelay.outbound.router import SmarthostRouter
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import Delays, FakeSpool, RecordingEvents, makeEntry


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
        # reason: a soft bounce (only unknown users and domains are hard).
        self.assertEqual(
            (bounced[0], bounced[3]["kind"], bounced[3]["reason"]), ("bounced", "soft", "rejected")
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
