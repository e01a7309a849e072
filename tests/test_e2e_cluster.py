"""
End to end: two installed C{twistd smartrelay} nodes on one real
C{redis-server} keep one connection limit per destination between them
(connection-slot leases), and the slots of a node killed with SIGKILL come
back within the lease TTL.
"""

import os
import smtplib
import threading
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.mail import smtp
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.redisserver import RedisServer
from tests.sink import Received, RelayProcess, Sink, waitFor

LEASE_TTL = 6.0


@implementer(smtp.IMessage)
class _SlowMessage:
    """
    A message the MX answers after C{sink.delay} seconds, or never while
    its recipient's local part starts with C{hang} and the sink hangs.
    """

    def __init__(self, sink, sender, recipient):
        self.sink, self.sender, self.recipient = sink, sender, recipient
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        def store():
            self.sink.received.append(
                Received(self.sender, [self.recipient], b"\r\n".join(self.lines) + b"\r\n")
            )

        if self.recipient.startswith("hang"):
            self.sink.hanging += 1
            return self.sink.released.addCallback(lambda _: store())
        return deferLater(reactor, self.sink.delay, store)

    def connectionLost(self):
        pass


class SlowSink(Sink):
    """
    A L{Sink} whose DATA replies take C{delay} seconds (and never come for
    C{hang*} recipients until L{release}).
    """

    def __init__(self, delay):
        super().__init__()
        self.delay = delay
        self.hanging = 0
        self.released = Deferred()

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        delivery = p.delivery
        original = delivery.validateTo

        def validateTo(user):
            original(user)
            return lambda: _SlowMessage(self, str(user.orig or ""), str(user.dest))

        delivery.validateTo = validateTo
        return p


def submit(port, recipients):
    """
    Submit one message per recipient; the queue ids.
    """
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("app.test")
        for recipient in recipients:
            client.mail("app@example.com")
            client.rcpt(recipient)
            code, text = client.data(b"Subject: t\r\n\r\nhi\r\n")
            assert code == 250, (code, text)
            ids.append(text.decode().split()[-1])
    return ids


class ClusterLimitTests(TestCase):
    """
    Two real nodes, one real Redis, one slow MX limited to 2 connections.
    """

    timeout = 180

    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)

    def startNodes(self, sink):
        port = reactor.listenTCP(0, sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        relays = []
        for node in ("0A", "0B"):
            config = (
                "[smartrelay]\ndata_dir = var\nhostname = node%s.test\nnode_id = %s\n"
                "store = %s\nlease_ttl = %gs\n\n"
                "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=%d\n\n"
                "[domain:limited.test]\nmax_connections = 2\n"
                % (node, node, self.redis.url(0), LEASE_TTL, port.getHost().port)
            )
            relay = RelayProcess(os.path.abspath(self.mktemp()), config)
            self.addCleanup(relay.kill)
            relay.start()
            relays.append(relay)
        return relays

    @inlineCallbacks
    def test_limitHoldsAcrossTwoNodes(self):
        """
        40 messages, half through each node, to one slow MX with
        C{max_connections = 2}: all are delivered and the MX never sees
        more than 2 sessions at once.
        """
        sink = SlowSink(delay=0.25)
        a, b = self.startNodes(sink)
        for relay in (a, b):
            yield relay.waitReady(reactor)
        results = {}

        def send(name, relay):
            results[name] = submit(relay.port, [f"{name}{i}@limited.test" for i in range(20)])

        threads = [threading.Thread(target=send, args=x) for x in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        yield deferToThread(lambda: [t.join(60) for t in threads])
        self.assertEqual(sum(len(ids) for ids in results.values()), 40)
        yield waitFor(reactor, lambda: len(sink.received) >= 40, timeout=90)
        self.assertEqual(sink.peak, 2)
        self.assertEqual(
            sorted(sink.queueIDs()), sorted(results["a"] + results["b"])
        )
        for relay in (a, b):
            yield relay.stop()

    @inlineCallbacks
    def test_killedNodeSlotsComeBack(self):
        """
        Node A holds both slots (its MX sessions hang); node B's message
        waits; after C{kill -9} of A, B delivers within the lease TTL.
        """
        sink = SlowSink(delay=0.05)
        a, b = self.startNodes(sink)
        for relay in (a, b):
            yield relay.waitReady(reactor)
        yield deferToThread(submit, a.port, ["hang1@limited.test", "hang2@limited.test"])
        yield waitFor(reactor, lambda: sink.hanging >= 2, timeout=30)
        yield deferToThread(submit, b.port, ["waits@limited.test"])
        # B cannot get a slot while A lives (renewing every TTL / 3).
        yield deferLater(reactor, LEASE_TTL * 1.2, lambda: None)
        self.assertEqual(sink.received, [])
        self.assertEqual(sink.open, 2)
        a.kill()
        killed = time.monotonic()
        yield waitFor(reactor, lambda: len(sink.received) >= 1, timeout=LEASE_TTL + 10)
        waited = time.monotonic() - killed
        self.assertEqual([r.recipients for r in sink.received], [["waits@limited.test"]])
        # Within the TTL (plus a retry poll and the delivery itself).
        self.assertLess(waited, LEASE_TTL + 2)
        sink.released.callback(None)
        yield b.stop()
