"""
Tests for L{smartrelay.outbound.remote}: delivery sessions held by worker
processes.  The pool is a real L{WorkerPool} whose "processes" are
L{ChildProtocol}s in this process, joined to it by pickled frames, so that
every job and answer takes the path it takes between processes; the
child's sessions are those of a L{FakeDeliverer}.
"""

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smartrelay.engine.downgrade import Offers
from smartrelay.engine.rewrap import SigningError
from smartrelay.engine.workers import ChildProtocol, WorkerPool
from smartrelay.outbound import remote
from smartrelay.outbound.interfaces import IConnector, IDeliverySession
from smartrelay.outbound.pool import TLSContexts
from smartrelay.outbound.remote import (
    AbortJob,
    RemoteSession,
    SendJob,
    WorkerConnector,
    _Sessions,
)
from smartrelay.outbound.router import EndpointSpec, Hop, MXHostSpec
from smartrelay.outbound.session import AttemptResult, OpenResult, Reply
from smartrelay.outbound.testing import FakeDeliverer


class FakeSpec:
    """
    A hop's spec whose endpoint is never used (the child's connector is a
    L{FakeDeliverer}).
    """

    def endpoint(self, reactor, resolvers):
        return None


class MakeMessage:
    """
    A re-wrap request: a sender, and the message with the context it ran
    with.
    """

    def __init__(self, data):
        self.data = data

    def run(self, *context):
        return "verp@b.example", self.data + b" made with " + repr(context).encode()


class FailSigning:
    def run(self, *context):
        raise SigningError("shop.example", "KeyError: s1")


class ChildTransport:
    """
    The child's stdout: what it writes goes to the pool's worker.
    """

    disconnecting = False

    def __init__(self, process):
        self.process = process

    def write(self, data):
        if self.process.alive:
            self.process.protocol.childDataReceived(1, data)

    def loseConnection(self):
        self.disconnecting = True
        self.process.exit()


class LoopbackProcess:
    """
    A worker process transport whose child is a L{ChildProtocol} here.
    """

    def __init__(self, protocol, child):
        self.protocol = protocol
        self.child = child
        self.alive = True
        self.pid = 4242
        child.makeConnection(ChildTransport(self))

    def write(self, data):
        self.child.dataReceived(data)

    def closeStdin(self):
        self.child.readConnectionLost()

    def signalProcess(self, sig):
        self.die()

    def die(self):
        if self.alive:
            self.alive = False
            self.protocol.processEnded(Failure(ProcessTerminated(None, 9, None)))

    def exit(self):
        if self.alive:
            self.alive = False
            self.protocol.processEnded(Failure(ProcessDone(0)))


class LocalConnector:
    """
    The relay's own connector: its settings, and sessions of a
    L{FakeDeliverer}.
    """

    heloName = "relay.test"
    timeout = 30.0

    def __init__(self, deliverer):
        self.deliverer = deliverer
        self.contexts = TLSContexts()

    def open(self, hop, tlsPolicy):
        return self.deliverer.open(hop, tlsPolicy)


class RemoteTestsMixin:
    def setUp(self):
        self.clock = Clock()
        self.childDeliverer = FakeDeliverer(offers=Offers(eightBitMIME=True))
        self.localDeliverer = FakeDeliverer()
        self.patch(_Sessions, "connector", lambda sessions, job: self.childDeliverer)
        self.processes = []
        self.pool = WorkerPool(self.clock, 1, spawn=self.spawn)
        self.connector = WorkerConnector(self.pool, LocalConnector(self.localDeliverer))
        self.pool.start("signer", "tokens")
        self.hop = Hop(name="mx.example", endpoint=None, spec=FakeSpec())

    def spawn(self, reactor, protocol):
        process = LoopbackProcess(protocol, ChildProtocol(self.clock))
        self.processes.append(process)
        protocol.makeConnection(process)
        return process

    def open(self, hop=None, tlsPolicy="opportunistic"):
        return self.successResultOf(self.connector.open(hop or self.hop, tlsPolicy))

    def session(self):
        opened = self.open()
        self.assertIsInstance(opened.session, RemoteSession)
        return opened.session


class OpenTests(RemoteTestsMixin, SynchronousTestCase):
    """
    L{WorkerConnector.open}.
    """

    def test_interfaces(self):
        """The connector and its sessions provide what the scheduler needs."""
        self.assertTrue(verifyObject(IConnector, self.connector))
        self.assertTrue(verifyObject(IDeliverySession, self.session()))

    def test_openedInWorker(self):
        """
        The session is opened in the worker, with the TLS policy; the relay
        gets a session with the server's name and offers, ready.
        """
        session = self.session()
        self.assertEqual(self.childDeliverer.opens, [("mx.example", "opportunistic")])
        self.assertEqual(self.localDeliverer.opens, [])
        self.assertEqual(session.remote, "mx.example")
        self.assertEqual(session.offers, Offers(eightBitMIME=True))
        self.assertTrue(session.usable)
        self.assertTrue(session.rewrapsInPlace)
        self.assertEqual(self.connector.sessions, 1)

    def test_refused(self):
        """A hop the worker cannot open gives its reply, as a local open would."""
        self.childDeliverer.refuse["mx.example"] = Reply(421, "4.3.2", "busy")
        opened = self.open()
        self.assertIsNone(opened.session)
        self.assertEqual(opened.reply, Reply(421, "4.3.2", "busy"))
        self.assertTrue(opened.tryNextHop)
        self.assertEqual(self.connector.sessions, 0)

    def test_noSpecLocal(self):
        """A hop without a spec (a router made in code) is opened here."""
        opened = self.open(Hop(name="local.example", endpoint=None))
        self.assertEqual(self.localDeliverer.opens, [("local.example", "opportunistic")])
        self.assertEqual(self.childDeliverer.opens, [])
        self.assertNotIsInstance(opened.session, RemoteSession)

    def test_noWorkerLocal(self):
        """With no worker running (being replaced), sessions are opened here."""
        self.processes[0].die()
        self.open()
        self.assertEqual(self.localDeliverer.opens, [("mx.example", "opportunistic")])

    def test_workerDiesWhileOpening(self):
        """
        The worker dying before the session is open: it is opened here
        instead.
        """
        self.childDeliverer.hang = True
        d = self.connector.open(self.hop, "required")
        self.assertNoResult(d)
        self.processes[0].die()
        opened = self.successResultOf(d)
        self.assertEqual(self.localDeliverer.opens, [("mx.example", "required")])
        self.assertIsNotNone(opened.session)

    def test_cancelledWhileOpening(self):
        """
        The relay no longer waiting (its session loop abandoned): the
        session opening in the worker is dropped when it opens.
        """
        self.childDeliverer.hang = True
        d = self.connector.open(self.hop, "opportunistic")
        d.cancel()
        self.failureResultOf(d)
        [(opening, session)] = self.childDeliverer.opening
        opening.callback(OpenResult(session))
        self.assertFalse(session.connected)
        self.assertEqual(self.connector.sessions, 0)
        self.assertEqual(_Sessions.of(self.processes[0].child).sessions, {})

    def test_cancelledThenRefused(self):
        """A dropped session that then fails to open leaves nothing behind in the worker."""
        self.childDeliverer.hang = True
        d = self.connector.open(self.hop, "opportunistic")
        d.cancel()
        self.failureResultOf(d)
        [(opening, _)] = self.childDeliverer.opening
        opening.callback(OpenResult(None, Reply(421, "4.3.2", "busy")))
        self.assertEqual(_Sessions.of(self.processes[0].child).dropped, set())

    def test_jobBroken(self):
        """An open that breaks in the worker is a local error for the job, logged."""

        class Broken:
            def open(self, hop, tlsPolicy):
                raise ValueError("no good")

        self.patch(_Sessions, "connector", lambda sessions, job: Broken())
        opened = self.open()
        self.assertIsNone(opened.session)
        self.assertEqual((opened.reply.code, opened.reply.status), (451, "4.3.0"))
        self.assertIn("ValueError: no good", opened.reply.text)
        self.assertFalse(opened.tryNextHop)
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.assertEqual(_Sessions.of(self.processes[0].child).opening, set())

    def test_specs(self):
        """The hop specs the routers give are picklable and make endpoints."""
        import pickle

        for spec in (
            EndpointSpec("tcp:host=smarthost.example:port=587:timeout=30"),
            MXHostSpec("mx.example", 25, 30.0, None, (("127.0.0.1", 53),)),
        ):
            copy = pickle.loads(pickle.dumps(spec))
            self.assertEqual(copy, spec)
            resolvers = {}
            self.assertIsNotNone(copy.endpoint(self.clock, resolvers))
        # One resolver per set of name servers, made once.
        spec = MXHostSpec("mx.example", 25, 30.0, None, (("127.0.0.1", 53),))
        spec.endpoint(self.clock, resolvers)
        self.assertEqual(list(resolvers), [(("127.0.0.1", 53),)])


class SendTests(RemoteTestsMixin, SynchronousTestCase):
    """
    L{RemoteSession.send} and the session's end.
    """

    def test_send(self):
        """
        A transaction runs in the worker; its result comes back; the
        session is busy meanwhile.
        """
        session = self.session()
        d = session.send("bounce@b.example", ["x@a.example"], b"message")
        self.assertFalse(session.usable)
        [call] = self.childDeliverer.calls
        self.assertEqual((call.sender, call.recipients, call.data),
                         ("bounce@b.example", ["x@a.example"], b"message"))
        call.answer(250, "ok", "2.0.0")
        result = self.successResultOf(d)
        self.assertEqual(result.results, {"x@a.example": Reply(250, "2.0.0", "ok")})
        self.assertTrue(session.usable)

    def test_rewrapInWorker(self):
        """
        A re-wrap request (sender L{None}) is run in the worker, with its
        context, and the sender and message it makes are sent.
        """
        session = self.session()
        session.send(None, ["x@a.example"], MakeMessage(b"stored"))
        [call] = self.childDeliverer.calls
        self.assertEqual(call.sender, "verp@b.example")
        self.assertEqual(call.data, b"stored made with ('signer', 'tokens')")

    def test_signingError(self):
        """
        A signing error in the worker fails the send with that error;
        nothing is sent and the session stays usable.
        """
        session = self.session()
        failure = self.failureResultOf(session.send(None, ["x@a.example"], FailSigning()))
        self.assertIsInstance(failure.value, SigningError)
        self.assertEqual(failure.value.domain, "shop.example")
        self.assertEqual(self.childDeliverer.calls, [])
        self.assertTrue(session.usable)

    def test_notUsable(self):
        """A busy session refuses another transaction, as a local one does."""
        session = self.session()
        session.send("", ["x@a.example"], b"one")
        self.assertRaises(RuntimeError, session.send, "", ["y@a.example"], b"two")

    def test_closedByServer(self):
        """
        The server closing the session (a 421): the worker tells the relay,
        whose session is closed and no longer usable.
        """
        session = self.session()
        d = session.send("", ["x@a.example"], b"message")
        [call] = self.childDeliverer.calls
        call.answer(421, "bye", "4.3.2")
        self.assertEqual(self.successResultOf(d).results["x@a.example"].code, 421)
        self.successResultOf(session.closed)
        self.assertFalse(session.usable)
        self.assertEqual(self.connector.sessions, 0)

    def test_closedMeanwhile(self):
        """
        A transaction for a session the worker no longer has (closed, the
        notice on its way) is answered as unanswered: nothing attempted.
        """
        child = self.processes[0].child
        result = SendJob(99, "", ["x@a.example"], b"m").runAsync(child)
        self.assertIsInstance(result, AttemptResult)
        self.assertTrue(result.unanswered)
        self.assertEqual(result.results["x@a.example"].code, 451)

    def test_quit(self):
        """QUIT is said in the worker; the session is closed once it is."""
        session = self.session()
        [child] = self.childDeliverer.sessions
        self.successResultOf(session.quit())
        self.assertEqual(self.childDeliverer.quits, [child])
        self.assertFalse(session.usable)
        self.assertEqual(self.connector.sessions, 0)
        # Again: nothing more is sent.
        self.successResultOf(session.quit())
        self.assertEqual(self.childDeliverer.quits, [child])

    def test_abort(self):
        """
        An abort drops the session in the worker: a transaction in flight
        gets its temporary reply.
        """
        session = self.session()
        d = session.send("", ["x@a.example"], b"message")
        session.abort()
        self.assertEqual(self.successResultOf(d).results["x@a.example"].code, 451)
        self.successResultOf(session.closed)
        self.assertEqual(self.connector.sessions, 0)

    def test_workerDies(self):
        """
        The worker dying closes its sessions; a transaction in flight gets
        "connection lost" for every recipient (deferred and tried again
        like any lost connection).
        """
        session = self.session()
        other = self.session()
        d = session.send("", ["x@a.example", "y@a.example"], b"message")
        self.processes[0].die()
        result = self.successResultOf(d)
        self.assertEqual(
            {(r.code, r.status) for r in result.results.values()}, {(451, "4.4.2")}
        )
        self.assertEqual(sorted(result.results), ["x@a.example", "y@a.example"])
        self.assertIn("lost", result.results["x@a.example"].text)
        self.successResultOf(session.closed)
        self.successResultOf(other.closed)
        self.assertEqual(self.connector.sessions, 0)
        # Quitting a session of a dead worker ends at once.
        self.successResultOf(other.quit())

    def test_stopQuitsSessions(self):
        """
        The relay stopping its workers: each says QUIT on its sessions and
        exits once they are closed.
        """
        session = self.session()
        [child] = self.childDeliverer.sessions
        stopped = self.pool.stop()
        self.assertEqual(self.childDeliverer.quits, [child])
        self.successResultOf(stopped)
        self.successResultOf(session.closed)


class NoticeTests(RemoteTestsMixin, SynchronousTestCase):
    """
    The notices a worker sends.
    """

    def test_log(self):
        """A worker's log event is logged by the relay, at its level, naming the worker."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.processes[0].child.notify("log", ("warn", "TLS with mx.example failed"))
        [event] = [e for e in events if e.get("text") == "TLS with mx.example failed"]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["number"], 0)

    def test_unknownKind(self):
        """A notice of a kind nobody registered for is logged, not fatal."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.processes[0].child.notify("what", 1)
        self.assertTrue([e for e in events if e.get("kind") == "what"])
        self.assertTrue(self.pool.available)

    def test_closedUnknown(self):
        """A closed notice for a session the relay does not know changes nothing."""
        session = self.session()
        self.processes[0].child.notify(remote.CLOSED, 12345)
        self.assertTrue(session.usable)

    def test_abortUnknown(self):
        """An abort of a session the worker does not have is answered, and leaves nothing behind."""
        d = self.pool.runOn(self.pool.pick(), AbortJob(777))
        self.assertIsNone(self.successResultOf(d))
        sessions = _Sessions.of(self.processes[0].child)
        self.assertEqual((sessions.opening, sessions.dropped), (set(), set()))
