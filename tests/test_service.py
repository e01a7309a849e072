"""
Tests for L{smartrelay.service}: the relay built from a config and started
in-process on the real reactor (loopback, OS-chosen ports): start-up order,
readiness, recovery, clean stop, and start-up failures.
"""

import os
import smtplib
import socket
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smartrelay.config import parseConfig
from smartrelay.ids import isQueueID, loadIDState
from smartrelay.service import makeRelayService
from smartrelay.store.redis import RedisStore
from tests.redisserver import RedisServer, freePort, sharedRedisServer
from tests.sink import Sink, waitFor


def submitOne(port, recipient="ok@example.org"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("app@example.com")
        client.rcpt(recipient)
        code, text = client.data(b"Subject: t\r\n\r\nhello\r\n")
        return code, text.decode()


class RelayServiceTests(TestCase):
    timeout = 60

    def makeRelay(self, extra="", sinkPort=None):
        self.dataDir = os.path.abspath(self.mktemp())
        if sinkPort is None:
            self.sink = Sink()
            port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            sinkPort = port.getHost().port
        config = parseConfig(
            "[smartrelay]\ndata_dir = %s\nhostname = relay.test\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=%d\n%s"
            % (self.dataDir, sinkPort, extra)
        )
        return makeRelayService(config, reactor)

    @inlineCallbacks
    def test_startSubmitDeliverStop(self):
        """
        The relay listens only once it is ready, accepts and delivers a
        message, and stops cleanly (thread pools stopped, store closed).
        """
        relay = self.makeRelay()
        self.assertIsNone(relay.smtpPort)
        relay.startService()
        port = yield relay.whenReady()
        self.assertTrue(relay.pruner.running)
        code, text = yield deferToThread(submitOne, port.getHost().port)
        self.assertEqual(code, 250)
        self.assertTrue(isQueueID(text.split()[-1]))
        yield waitFor(reactor, lambda: self.sink.received)
        yield relay.stopService()
        self.assertTrue(relay.spoolPool.joined)
        self.assertTrue(relay.storePool.joined)
        self.assertEqual(os.listdir(os.path.join(self.dataDir, "spool")), [])
        self.assertEqual(loadIDState(os.path.join(self.dataDir, "queue-ids.json")).boot, 1)
        self.assertFalse(relay.pruner.running)

    @inlineCallbacks
    def test_stopDuringData(self):
        """
        Stopping while a client is in the middle of DATA: the stop waits
        for the message, which is stored, answered 250 and then 421, and
        its accepted event is in the store; an idle client gets 421 at
        once.  Delivery is on hold, so the message waits in the spool.
        """
        relay = self.makeRelay("hold = on\n")
        relay.startService()
        self.addCleanup(lambda: relay.running and relay.stopService())
        port = (yield relay.whenReady()).getHost().port
        busy = yield deferToThread(socket.create_connection, ("127.0.0.1", port), 30)
        idle = yield deferToThread(socket.create_connection, ("127.0.0.1", port), 30)
        self.addCleanup(busy.close)
        self.addCleanup(idle.close)
        busyFile, idleFile = busy.makefile("rb"), idle.makefile("rb")
        for f in (busyFile, idleFile):
            greeting = yield deferToThread(f.readline)
            self.assertTrue(greeting.startswith(b"220 "), greeting)

        def converse(sock, f, *commands):
            for command in commands:
                sock.sendall(command)
                line = f.readline()
                while line[3:4] == b"-":
                    line = f.readline()
            return line

        line = yield deferToThread(
            converse,
            busy,
            busyFile,
            b"EHLO c\r\n",
            b"MAIL FROM:<app@example.com>\r\n",
            b"RCPT TO:<ok@example.org>\r\n",
            b"DATA\r\n",
        )
        self.assertTrue(line.startswith(b"354"), line)
        yield deferToThread(converse, idle, idleFile, b"EHLO c\r\n")
        busy.sendall(b"Subject: t\r\n\r\nhalf of it")
        stopped = relay.stopService()
        self.assertNoResult(stopped)
        idleLine = yield deferToThread(idleFile.readline)
        self.assertTrue(idleLine.startswith(b"421 4.3.2 "), idleLine)
        busy.sendall(b", and the rest\r\n.\r\n")
        ok = yield deferToThread(busyFile.readline)
        bye = yield deferToThread(busyFile.readline)
        self.assertTrue(ok.startswith(b"250 2.0.0 OK "), ok)
        self.assertTrue(bye.startswith(b"421 4.3.2 "), bye)
        yield stopped
        queueID = ok.split()[-1].decode()
        connection = sqlite3.connect(os.path.join(self.dataDir, "smartrelay.sqlite"))
        try:
            types = connection.execute(
                "SELECT type FROM events WHERE queue_id = ?", (queueID,)
            ).fetchall()
        finally:
            connection.close()
        self.assertEqual(types, [("accepted",)])
        self.assertEqual(len(os.listdir(os.path.join(self.dataDir, "spool"))), 1)

    @inlineCallbacks
    def test_recoversQueuedMessages(self):
        """
        Messages accepted while delivery is on hold are delivered by the
        next run, from the spool.
        """
        relay = self.makeRelay("hold = on\n")
        relay.startService()
        port = yield relay.whenReady()
        code, _ = yield deferToThread(submitOne, port.getHost().port)
        self.assertEqual(code, 250)
        yield relay.stopService()
        self.assertEqual(self.sink.received, [])
        self.assertEqual(len(os.listdir(os.path.join(self.dataDir, "spool"))), 1)

        config = parseConfig(
            "[smartrelay]\ndata_dir = %s\nhostname = relay.test\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[delivery]\nsmarthost = %s\n"
            % (self.dataDir, relay.config.delivery.smarthost)
        )
        again = makeRelayService(config, reactor)
        again.startService()
        yield again.whenReady()
        yield waitFor(reactor, lambda: self.sink.received)
        yield again.stopService()
        self.assertEqual(os.listdir(os.path.join(self.dataDir, "spool")), [])

    @inlineCallbacks
    def test_redisStore(self):
        """
        With store = redis://..., the relay's events go to a real Redis
        server.
        """
        server = sharedRedisServer()
        relay = self.makeRelay()
        config = parseConfig(
            "[smartrelay]\ndata_dir = %s\nhostname = relay.test\nstore = %s\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[delivery]\nsmarthost = %s\n"
            % (self.dataDir, server.url(db=3), relay.config.delivery.smarthost)
        )
        relay = makeRelayService(config, reactor)
        relay.startService()
        port = yield relay.whenReady()
        code, text = yield deferToThread(submitOne, port.getHost().port)
        queueID = text.split()[-1]
        yield waitFor(reactor, lambda: self.sink.received)
        yield relay.stopService()
        store = RedisStore.fromURL(server.url(db=3), reactor)
        yield store.start()
        self.addCleanup(store.close)
        events = yield store.eventsForMessage(queueID)
        self.assertEqual([e.type for e in events], ["accepted", "delivered"])

    @inlineCallbacks
    def test_redisDownAtStart(self):
        """
        If the Redis store is unreachable at start, the relay starts anyway,
        accepts mail, journals its events, and moves them into the store
        once a Redis server answers.
        """
        port = freePort()
        relay = self.makeRelay()
        config = parseConfig(
            "[smartrelay]\ndata_dir = %s\nhostname = relay.test\n"
            "store = redis://127.0.0.1:%d/0\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[delivery]\nsmarthost = %s\n"
            % (self.dataDir, port, relay.config.delivery.smarthost)
        )
        relay = makeRelayService(config, reactor)
        relay.startService()
        smtpPort = yield relay.whenReady()
        code, text = yield deferToThread(submitOne, smtpPort.getHost().port)
        self.assertEqual(code, 250)
        queueID = text.split()[-1]
        yield waitFor(reactor, lambda: self.sink.received)
        self.assertTrue(relay.events.degraded)

        server = RedisServer().start(port=port)
        self.addCleanup(server.stop)
        yield waitFor(reactor, lambda: not relay.events.degraded, timeout=30)
        yield relay.stopService()
        store = RedisStore.fromURL(server.url(), reactor)
        yield store.start()
        self.addCleanup(store.close)
        events = yield store.eventsForMessage(queueID)
        self.assertEqual([e.type for e in events], ["accepted", "delivered"])

    @inlineCallbacks
    def test_startFailure(self):
        """
        If start-up cannot complete (data_dir is a file), whenReady fails and
        nothing listens.
        """
        relay = self.makeRelay()
        with open(self.dataDir, "w") as f:
            f.write("not a directory")
        relay.startService()
        yield self.assertFailure(relay.whenReady(), OSError)
        self.assertIsNone(relay.smtpPort)
        self.flushLoggedErrors(OSError)
        yield relay.stopService()
