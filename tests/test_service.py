"""
Tests for L{smartrelay.service}: the whole relay wired on a memory reactor
with synchronous thread pools (what listens where, start-up order, a
message from the SMTP listener to the smarthost, the re-wrap workers), the
one-line errors of building it, and the relay started in-process on the
real reactor (loopback, OS-chosen ports): readiness, recovery, clean stop,
start-up failures.
"""

import os
import pickle
import smtplib
import socket
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.internet.address import IPv4Address
from twisted.test.iosim import ConnectionCompleter, FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartrelay.config import ConfigError, parseConfig
from smartrelay.engine.workers import FrameDecoder, encodeFrame
from smartrelay.ids import ID_STATE_FILE, isQueueID, loadIDState
from smartrelay.outbound.testing import ScriptedSMTPServer, SMTPScript
from smartrelay.service import (
    EVENT_WRITE_INTERVAL,
    IThreadPools,
    StartUpInterrupted,
    ThreadPools,
    TOKEN_KEYS_FILE,
    makeRelayService,
    makeSigner,
)
from smartrelay.smtp.feedback import FeedbackPolicy
from smartrelay.smtp.submission import SubmissionFactory
from smartrelay.store.redis import RedisStore
from tests.redisserver import RedisServer, freePort, sharedRedisServer
from tests.sink import Sink, waitFor


@implementer(IThreadPools)
class SynchronousThreads:
    """
    L{IThreadPools} that runs every call at once on the calling thread, and
    records the pools asked for and whether they were started and stopped.
    With C{hold}, calls wait in C{pending} until L{runNext} runs them, in
    order.
    """

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.names: list = []
        self.started = False
        self.stopped = False
        self.pending: list = []
        self.ran: list = []

    def runner(self, name, threads):
        self.names.append(name)
        return self.run

    def run(self, f, *args, **kwargs):
        if not self.hold:
            self.ran.append(f)
            return maybeDeferred(f, *args, **kwargs)
        d = maybeDeferred(lambda: None)
        d.pause()
        self.pending.append((d, f, args, kwargs))
        return d.addCallback(lambda _: f(*args, **kwargs))

    def runNext(self) -> None:
        d, f, args, kwargs = self.pending.pop(0)
        self.ran.append(f)
        d.unpause()

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True


class Submitter(LineReceiver):
    """
    An SMTP client that sends one message, a command at a time, and
    records every reply line.
    """

    def __init__(self, message: bytes, recipient: bytes = b"reader@example.org") -> None:
        self.message = message
        self.commands = [
            b"EHLO client.test",
            b"MAIL FROM:<app@example.com>",
            b"RCPT TO:<" + recipient + b">",
            b"DATA",
        ]
        self.replies: list = []

    def lineReceived(self, line: bytes) -> None:
        self.replies.append(line)
        if line[3:4] == b"-":
            return
        if line.startswith(b"354"):
            self.transport.write(self.message + b".\r\n")
        elif line.startswith(b"250 2.0.0 OK"):
            self.sendLine(b"QUIT")
        elif self.commands:
            self.sendLine(self.commands.pop(0))


class ProcessMemoryReactor(MemoryReactorClock):
    """
    A memory reactor that records the processes it is asked to spawn; each
    gets a L{StringTransport} and ends (status 0) when its input is closed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None,
                     uid=None, gid=None, usePTY=False, childFDs=None):
        transport = StringTransport()
        transport.closeStdin = lambda: protocol.processEnded(Failure(ProcessDone(0)))
        transport.signalProcess = lambda signal: None
        self.processes.append((executable, list(args), transport))
        protocol.makeConnection(transport)
        return transport


def wiringConfig(dataDir: str, extra: str = "", workers: int = 0):
    return parseConfig(
        "[smartrelay]\ndata_dir = %s\nhostname = relay.test\nnode_id = 2a\n"
        "[smtp]\nlisten = tcp:2525:interface=127.0.0.1\n"
        "[web]\nlisten = tcp:8080:interface=127.0.0.1\n"
        "[tracking]\nbase_url = https://t.example.org\n"
        "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=2599\nrewrap_workers = %d\n%s"
        % (dataDir, workers, extra)
    )


class WiringTests(SynchronousTestCase):
    """
    The whole relay on a L{MemoryReactorClock} with synchronous thread
    pools: what it listens on, in which order, and that the pieces reach
    each other (the Flocker pattern: assert on the reactor, mock nothing).
    """

    def setUp(self):
        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()
        self.threads = SynchronousThreads()

    def makeRelay(self, **kwargs):
        config = wiringConfig(self.dataDir, **kwargs)
        return makeRelayService(config, self.reactor, self.threads)

    def test_threadPools(self):
        """
        The thread pools and the synchronous stand-in provide
        L{IThreadPools}; the real pools are named C{smartrelay-<name>}.
        """
        verifyObject(IThreadPools, SynchronousThreads())
        pools = ThreadPools(self.reactor)
        verifyObject(IThreadPools, pools)
        pools.runner("spool", 4)
        self.assertEqual(
            [(p.name, p.max) for p in pools.pools.values()], [("smartrelay-spool", 4)]
        )

    def test_listeners(self):
        """
        Built, the relay listens on nothing and has started no thread;
        started, it listens for HTTP, feedback and then SMTP on the
        configured endpoints, with the site of its tracking app, the
        feedback policy and its submission factory, and C{whenReady} fires with the SMTP port; stopped, it
        stops the pools and leaves no timer behind.
        """
        relay = self.makeRelay()
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertFalse(self.threads.started)
        relay.startService()
        self.assertTrue(self.threads.started)
        port = self.successResultOf(relay.whenReady())
        [web, feedback, smtp] = self.reactor.tcpServers
        self.assertEqual((web[0], web[3]), (8080, "127.0.0.1"))
        self.assertEqual((feedback[0], feedback[3]), (2526, "127.0.0.1"))
        self.assertIs(feedback[1], relay.feedbackFactory)
        self.assertIsInstance(feedback[1].policy, FeedbackPolicy)
        self.assertIs(feedback[1].policy.inbox, relay.feedbackInbox)
        self.assertIsInstance(web[1], Site)
        self.assertIs(web[1], relay.webSite)
        self.assertEqual((smtp[0], smtp[3]), (2525, "127.0.0.1"))
        self.assertIsInstance(smtp[1], SubmissionFactory)
        self.assertIs(smtp[1].policy.ids, relay.ids)
        self.assertEqual(port.getHost().port, 2525)
        self.assertEqual(
            sorted(self.threads.names), ["delivery-io", "feedback", "journal", "rewrap", "spool", "sqlite"]
        )
        self.successResultOf(relay.stopService())
        self.assertTrue(self.threads.stopped)
        self.assertIsNone(relay.smtpPort)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_feedbackWiring(self):
        """
        The feedback pieces reach each other: the policy hands reports to
        the processor, which shares the store, event log and bounce
        suppressor with the scheduler; at start-up processed reports older
        than the retention are pruned and newer ones kept.
        """
        self.reactor.advance(1700000000)
        done = os.path.join(self.dataDir, "feedback", "done")
        os.makedirs(done)
        now = self.reactor.seconds()
        old = "%013d-%s" % (int((now - 40 * 86400) * 1000), "a" * 12)
        recent = "%013d-%s" % (int((now - 86400) * 1000), "b" * 12)
        for name in (old, recent):
            with open(os.path.join(done, name), "wb") as f:
                f.write(b"X-SmartRelay-Envelope: {}\r\n")
        relay = self.makeRelay()
        policy = relay.feedbackFactory.policy
        self.assertEqual(policy.received, relay.feedbackProcessor.received)
        self.assertIs(relay.feedbackProcessor.store, relay.suppressions)
        self.assertIs(relay.suppressions.store, relay.store)
        self.assertIs(relay.suppressions.events, relay.events)
        self.assertIs(relay.web.store, relay.suppressions)
        self.assertIs(relay.api.queries.store, relay.suppressions)
        self.assertIs(relay.bounceSuppressor.store, relay.suppressions)
        self.assertIs(relay.scheduler.store.events, relay.events)
        self.assertIs(relay.feedbackProcessor.events, relay.events)
        self.assertIs(relay.feedbackProcessor.suppressor, relay.bounceSuppressor)
        self.assertIs(relay.scheduler.bounces, relay.bounceSuppressor)
        self.assertEqual(policy.addresses.bounceDomain, "relay.test")
        self.assertEqual(relay.feedbackFactory.maxMessageSize, 10 * 1024 * 1024)
        relay.startService()
        self.successResultOf(relay.whenReady())
        self.assertEqual(sorted(os.listdir(done)), [recent])
        self.successResultOf(relay.stopService())
        self.assertIsNone(relay.feedbackPort)

    def test_whole(self):
        """
        Every piece is built whole, with what it needs already loaded: the
        re-wrapper and the web endpoints have the token keys (read from
        data_dir), the submission policy has this run's queue ids, the
        re-wrapper has the DKIM signer and the worker pool.
        """
        relay = self.makeRelay(workers=1, extra="")
        self.assertTrue(os.path.exists(os.path.join(self.dataDir, TOKEN_KEYS_FILE)))
        self.assertIs(relay.rewrapper.tokens, relay.tokens)
        self.assertIs(relay.web.tokens, relay.tokens)
        self.assertIs(relay.policy.ids, relay.ids)
        self.assertIs(relay.rewrapper.workers, relay.workers)
        self.assertIs(relay.rewrapper.signer, relay.signer)
        self.assertIs(relay.scheduler.rewrapper, relay.rewrapper)

    def test_accessLog(self):
        """
        C{[web] access_log}: the relay's log by default, nothing for
        C{off}, and for a path an L{AccessLogFile} that the relay starts
        and stops as one of its services.
        """
        import attrs

        from smartrelay.web.accesslog import AccessLogFile

        self.assertEqual(self.makeRelay().webSite.accessLog, "log")
        config = wiringConfig(self.dataDir)
        for value, expected in [("off", None), ("log", "log")]:
            relay = makeRelayService(
                attrs.evolve(config, web=attrs.evolve(config.web, access_log=value)),
                self.reactor, self.threads)
            self.assertEqual(relay.webSite.accessLog, expected)
        path = os.path.join(self.dataDir, "access.log")
        relay = makeRelayService(
            attrs.evolve(config, web=attrs.evolve(config.web, access_log=path)),
            self.reactor, self.threads)
        self.assertIsInstance(relay.webSite.accessLog, AccessLogFile)
        self.assertIs(relay.accessLog, relay.webSite.accessLog)
        self.assertEqual(relay.accessLog.path, path)
        self.assertIn(relay.accessLog, list(relay))

    def test_listensOnlyWhenReady(self):
        """
        Nothing listens before the store is open, this run's id state is
        durable (boot generation 1) and the spool is recovered; the web
        endpoints listen before feedback, and feedback before SMTP.
        """
        self.threads = SynchronousThreads(hold=True)
        relay = self.makeRelay()
        relay.startService()
        ready = relay.whenReady()
        # Until it is ready (the background work that follows, the pruning
        # of processed feedback reports say, aside).
        while not ready.called:
            self.assertEqual(self.reactor.tcpServers, [])
            self.threads.runNext()
        while self.threads.pending:
            self.threads.runNext()
        names = [f.__name__ for f in self.threads.ran]
        self.assertIn("saveIDState", names)
        self.assertIn("_recover", names)
        self.assertLess(names.index("saveIDState"), names.index("_recover"))
        self.assertEqual(self.successResultOf(ready).getHost().port, 2525)
        self.assertEqual([s[0] for s in self.reactor.tcpServers], [8080, 2526, 2525])
        self.assertEqual(loadIDState(os.path.join(self.dataDir, ID_STATE_FILE)).boot, 1)
        self.threads.hold = False
        self.successResultOf(relay.stopService())

    def test_stopDuringStartUp(self):
        """
        Stopped while start-up is still reading the disk, the relay lets
        start-up end but never listens; C{whenReady} fails with
        L{StartUpInterrupted}, and the stop completes once start-up has.
        """
        self.threads = SynchronousThreads(hold=True)
        relay = self.makeRelay()
        relay.startService()
        ready = relay.whenReady()
        self.threads.runNext()
        stopped = relay.stopService()
        while self.threads.pending:
            self.assertNoResult(stopped)
            self.threads.runNext()
        self.failureResultOf(ready, StartUpInterrupted)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertTrue(self.threads.stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_submitAndDeliver(self):
        """
        A message submitted on the SMTP listener is stored, answered 250
        with its queue id, re-wrapped (VERP sender, List-Unsubscribe on the
        tracking base URL) and delivered to the smarthost, and both
        events reach the store.
        """
        smarthost = []
        self.reactor.listenTCP(
            2599,
            Factory.forProtocol(lambda: smarthost.append(ScriptedSMTPServer(SMTPScript())) or smarthost[-1]),
            interface="127.0.0.1",
        )
        relay = self.makeRelay()
        relay.startService()
        self.successResultOf(relay.whenReady())
        # A client on loopback (allowed_clients), through the factory that
        # listens on the SMTP port.
        [factory] = [s[1] for s in self.reactor.tcpServers if s[0] == 2525]
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        server = factory.buildProtocol(peer)
        client = Submitter(b"From: app@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
        connect(
            server,
            FakeTransport(server, True, IPv4Address("TCP", "127.0.0.1", 2525), peer),
            client,
            FakeTransport(client, False, peer, IPv4Address("TCP", "127.0.0.1", 2525)),
            clock=self.reactor,
        ).flush()
        [ok] = [r for r in client.replies if r.startswith(b"250 2.0.0 OK")]
        queueID = ok.split()[-1].decode()
        self.assertTrue(isQueueID(queueID) and queueID.startswith("2A/01-"), queueID)

        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 2599))
        delivery = ConnectionCompleter(self.reactor).succeedOnce()
        for _ in range(10):
            delivery.flush()
        [server] = smarthost
        mail = [c for c in server.commands if c.startswith(b"MAIL FROM:")]
        self.assertRegex(mail[0], rb"^MAIL FROM:<bounce\+[a-z2-7]+@relay\.test>")
        self.assertIn(b"RCPT TO:<reader@example.org>", server.commands)
        self.assertIn(b"X-SmartRelay-ID: " + queueID.encode(), server.message)
        self.assertIn(b"List-Unsubscribe: <https://t.example.org/u/", server.message)
        # Events are written in batches at most every EVENT_WRITE_INTERVAL.
        self.reactor.advance(EVENT_WRITE_INTERVAL)
        events = self.successResultOf(relay.store.eventsForMessage(queueID))
        self.assertEqual([e.type for e in events], ["accepted", "delivered"])

        stopped = relay.stopService()
        for _ in range(10):
            delivery.flush()
        self.successResultOf(stopped)
        self.assertIn(b"QUIT", server.commands)
        self.assertEqual(os.listdir(os.path.join(self.dataDir, "spool")), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_workersStartedWithTheirContext(self):
        """
        The re-wrap workers are spawned when the service starts (never
        while it is only built: twistd forks in between), one per
        C{rewrap_workers}, and each first gets the DKIM signer and the token
        keys on its input; stopping closes their input.
        """
        self.reactor = ProcessMemoryReactor()
        relay = self.makeRelay(workers=2)
        self.assertEqual(self.reactor.processes, [])
        relay.startService()
        self.successResultOf(relay.whenReady())
        self.assertEqual(len(self.reactor.processes), 2)
        context = encodeFrame(pickle.dumps((relay.signer, relay.tokens), pickle.HIGHEST_PROTOCOL))
        for executable, args, transport in self.reactor.processes:
            self.assertEqual(args, [executable, "-m", "smartrelay.engine.workers"])
            self.assertTrue(transport.value().startswith(context))
            # Then the modules of its jobs (the delivery sessions) are
            # imported.
            [(_, preload)] = [
                pickle.loads(payload) for payload in FrameDecoder().feed(transport.value()[len(context):])
            ]
            self.assertIn("smartrelay.outbound.remote", preload.modules)
        self.assertTrue(relay.workers.available)
        self.successResultOf(relay.stopService())
        self.assertFalse(relay.workers.available)


class BuildErrorTests(SynchronousTestCase):
    """
    What building the relay reads, when it is unusable, is one
    L{ConfigError} line naming C{[smartrelay] data_dir}.
    """

    def setUp(self):
        self.dataDir = os.path.abspath(self.mktemp())

    def build(self):
        return makeRelayService(
            wiringConfig(self.dataDir), MemoryReactorClock(), SynchronousThreads()
        )

    def assertOneLine(self, error: ConfigError, *words: str) -> None:
        text = str(error)
        self.assertNotIn("\n", text)
        self.assertIn("[smartrelay] data_dir:", text)
        for word in words:
            self.assertIn(word, text)

    def test_dataDirIsAFile(self):
        """
        A data_dir that cannot be created.
        """
        with open(self.dataDir, "w") as f:
            f.write("not a directory")
        self.assertOneLine(self.assertRaises(ConfigError, self.build), "cannot create")

    def test_damagedTokenKeys(self):
        """
        A token key file that is not hex keys; it is left as it was.
        """
        os.makedirs(self.dataDir)
        path = os.path.join(self.dataDir, TOKEN_KEYS_FILE)
        with open(path, "w") as f:
            f.write("not a key\n")
        self.assertOneLine(self.assertRaises(ConfigError, self.build), path)
        with open(path) as f:
            self.assertEqual(f.read(), "not a key\n")

    def test_damagedIDState(self):
        """
        A damaged queue-id state file; it is never reset.
        """
        os.makedirs(self.dataDir)
        path = os.path.join(self.dataDir, ID_STATE_FILE)
        with open(path, "w") as f:
            f.write("{torn")
        self.assertOneLine(self.assertRaises(ConfigError, self.build), path, "damaged")
        with open(path) as f:
            self.assertEqual(f.read(), "{torn")


class SignerTests(SynchronousTestCase):
    """
    L{makeSigner}: the C{[dkim:DOMAIN]} keys, checked by a self-test
    before the relay is built; anything wrong is one L{ConfigError} line
    naming the section.
    """

    def setUp(self):
        import dkim

        from smartrelay.engine.dkim import generateKey

        self.dkim = dkim
        self.dataDir = os.path.abspath(self.mktemp())
        os.makedirs(self.dataDir)
        self.keyPath = os.path.join(self.dataDir, "shop.key")
        with open(self.keyPath, "wb") as f:
            f.write(generateKey("ed25519-sha256")[0])
        self.config = wiringConfig(
            self.dataDir,
            "[dkim:shop.example]\nselector = s1\nalgorithm = ed25519-sha256\nkey = %s\n"
            % (self.keyPath,),
        )

    def test_noSections(self):
        """Without [dkim:] sections there is no signer."""
        self.assertIsNone(makeSigner(wiringConfig(self.dataDir)))

    def test_signer(self):
        """With a section, the signer signs mail of its domain."""
        signer = makeSigner(self.config)
        self.assertEqual(signer.domainFor(b"From: a@shop.example\r\n\r\nx\r\n"), "shop.example")

    def test_selfTestFails(self):
        """
        A signer whose self-test fails (dkimpy's internals moved) is not
        built: one line naming the section, and the relay is not built
        either.
        """
        def moved(self, *args, **kwargs):
            raise AttributeError("'DKIM' object has no attribute 'signature_fields'")

        self.patch(self.dkim.DomainSigner, "gen_header", moved)
        e = self.assertRaises(ConfigError, makeSigner, self.config)
        self.assertEqual(e.section, "dkim:shop.example")
        self.assertNotIn("\n", str(e))
        self.assertTrue(str(e).startswith(
            "<config>: [dkim:shop.example]: DKIM self-test for shop.example failed: signing "
            "a test message raised AttributeError: 'DKIM' object has no attribute "
            "'signature_fields' (dkimpy "), str(e))
        self.assertRaises(
            ConfigError, makeRelayService, self.config, MemoryReactorClock(), SynchronousThreads()
        )

    def test_keyFileGone(self):
        """A key file that can no longer be read is one line too."""
        os.remove(self.keyPath)
        e = self.assertRaises(ConfigError, makeSigner, self.config)
        self.assertEqual(
            str(e),
            f"<config>: [dkim:shop.example]: cannot read {self.keyPath}: No such file or directory",
        )


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
            "[feedback]\nlisten = tcp:0:interface=127.0.0.1\n"
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
        pools = relay.threads.pools
        self.assertEqual(
            sorted(pools), ["delivery-io", "feedback", "journal", "rewrap", "spool", "sqlite"]
        )
        self.assertTrue(all(pool.joined for pool in pools.values()))
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
            "[feedback]\nlisten = tcp:0:interface=127.0.0.1\n"
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
            "[feedback]\nlisten = tcp:0:interface=127.0.0.1\n"
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
        accepts mail and journals its events; with no local copy of the
        suppression list it holds the recipients (deferred, never delivered
        unchecked) and delivers them on a retry once a Redis server answers,
        moving the journalled events into the store.
        """
        port = freePort()
        relay = self.makeRelay()
        config = parseConfig(
            "[smartrelay]\ndata_dir = %s\nhostname = relay.test\n"
            "store = redis://127.0.0.1:%d/0\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[feedback]\nlisten = tcp:0:interface=127.0.0.1\n"
            "[delivery]\nsmarthost = %s\nretry = 1s*...\nretry_jitter = 0\n"
            % (self.dataDir, port, relay.config.delivery.smarthost)
        )
        relay = makeRelayService(config, reactor)
        relay.startService()
        smtpPort = yield relay.whenReady()
        code, text = yield deferToThread(submitOne, smtpPort.getHost().port)
        self.assertEqual(code, 250)
        queueID = text.split()[-1]
        yield waitFor(reactor, lambda: relay.suppressionReplica.held)
        self.assertTrue(relay.events.degraded)
        self.assertEqual(self.sink.received, [])

        server = RedisServer().start(port=port)
        self.addCleanup(server.stop)
        yield waitFor(reactor, lambda: self.sink.received, timeout=30)
        yield waitFor(reactor, lambda: not relay.events.degraded, timeout=30)
        yield relay.stopService()
        store = RedisStore.fromURL(server.url(), reactor)
        yield store.start()
        self.addCleanup(store.close)
        events = yield store.eventsForMessage(queueID)
        types = [e.type for e in events]
        self.assertEqual(types[0], "accepted")
        self.assertEqual(types[-1], "delivered")
        self.assertEqual(set(types[1:-1]), {"deferred"})

    @inlineCallbacks
    def test_startFailure(self):
        """
        If start-up cannot complete (the spool directory is a file),
        whenReady fails and nothing listens.
        """
        relay = self.makeRelay()
        with open(os.path.join(self.dataDir, "spool"), "w") as f:
            f.write("not a directory")
        relay.startService()
        yield self.assertFailure(relay.whenReady(), OSError)
        self.assertIsNone(relay.smtpPort)
        self.assertIsNone(relay.webPort)
        self.flushLoggedErrors(OSError)
        yield relay.stopService()
