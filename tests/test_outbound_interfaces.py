"""
The delivery scheduler's collaborators provide the interfaces of
L{smartrelay.outbound.interfaces}: the relay's own implementations and the
fakes of L{smartrelay.outbound.testing} that the scheduler's tests stand
them in with, so that a fake cannot drift from what it stands in for.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from smartrelay.engine.rewrap import Rewrapper
from smartrelay.events import EventLog
from smartrelay.outbound.interfaces import (
    IConnector,
    IDeliverySession,
    IDeliverySpool,
    IEventSink,
    IRewrapper,
    IRouter,
)
from smartrelay.outbound.pool import Connector
from smartrelay.outbound.remote import RemoteSession, WorkerConnector
from smartrelay.outbound.router import Hop
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.session import SMTPSession
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSession,
    FakeSpool,
    RecordingEvents,
)
from smartrelay.spool import Spool


class RealImplementationTests(SynchronousTestCase):
    """
    The relay's own parts provide what the scheduler asks of them.
    """

    def test_spool(self):
        self.assertTrue(verifyClass(IDeliverySpool, Spool))

    def test_eventLog(self):
        self.assertTrue(verifyClass(IEventSink, EventLog))

    def test_connector(self):
        self.assertTrue(verifyClass(IConnector, Connector))
        self.assertTrue(verifyObject(IConnector, Connector(clock=Clock(), heloName="relay.test", timeout=30.0)))

    def test_session(self):
        self.assertTrue(verifyClass(IDeliverySession, SMTPSession))

    def test_workerSessions(self):
        """The sessions in worker processes, and their connector."""
        self.assertTrue(verifyClass(IConnector, WorkerConnector))
        self.assertTrue(verifyClass(IDeliverySession, RemoteSession))

    def test_rewrapper(self):
        self.assertTrue(verifyClass(IRewrapper, Rewrapper))


class FakeTests(SynchronousTestCase):
    """
    The fakes of L{smartrelay.outbound.testing} provide the same interfaces.
    """

    def test_spool(self):
        self.assertTrue(verifyObject(IDeliverySpool, FakeSpool()))

    def test_events(self):
        self.assertTrue(verifyObject(IEventSink, RecordingEvents()))

    def test_router(self):
        self.assertTrue(verifyObject(IRouter, FakeRouter()))

    def test_connector(self):
        self.assertTrue(verifyObject(IConnector, FakeDeliverer()))

    def test_session(self):
        deliverer = FakeDeliverer()
        session = self.successResultOf(deliverer.open(Hop("mx.example.com", None), "opportunistic"))
        self.assertIsInstance(session.session, FakeSession)
        self.assertTrue(verifyObject(IDeliverySession, session.session))


class SchedulerTests(SynchronousTestCase):
    """
    The scheduler runs on any providers of the interfaces.
    """

    def test_fakes(self):
        """
        A scheduler made with the fakes is made (its parts are wired) and
        starts and stops with nothing queued.
        """
        scheduler = DeliveryScheduler(
            spool=FakeSpool(),
            router=FakeRouter(),
            connector=FakeDeliverer(),
            events=RecordingEvents(),
            clock=Clock(),
            retry=Delays((60,)),
            maxAge=3600.0,
            maxConnections=1,
        )
        scheduler.startService()
        self.assertEqual(scheduler.queued(), 0)
        self.assertIsNone(self.successResultOf(scheduler.stopService()))
