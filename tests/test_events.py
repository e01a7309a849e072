"""
Tests for L{smartrelay.events}: the event model and the batching EventLog.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.events import Event, EventLog, newEventID, rfc3339


class EventTests(SynchronousTestCase):
    def test_publicShape(self):
        """
        asDict is the DESIGN 1.7 JSON shape with an RFC 3339 UTC time.
        """
        event = Event(
            type="delivered", queue_id="79/BC-12331-5C348706", recipient="a@b.c",
            time=1546946310.25, tag="t", metadata={"k": "v"}, detail={"code": 250}, id="x",
        )
        self.assertEqual(
            event.asDict(),
            {
                "id": "x", "time": "2019-01-08T11:18:30.250Z", "type": "delivered",
                "queue_id": "79/BC-12331-5C348706", "recipient": "a@b.c", "tag": "t",
                "metadata": {"k": "v"}, "detail": {"code": 250},
            },
        )

    def test_unknownType(self):
        """
        Only the event types of the contract exist.
        """
        self.assertRaises(ValueError, Event, type="exploded", queue_id=None, recipient=None, time=0)

    def test_ids(self):
        """
        Event ids are unique, 32 hex digits.
        """
        ids = {newEventID() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        self.assertTrue(all(len(i) == 32 and int(i, 16) >= 0 for i in ids))

    def test_rfc3339(self):
        """
        Times are UTC with milliseconds.
        """
        self.assertEqual(rfc3339(0), "1970-01-01T00:00:00.000Z")


class SlowStore:
    def __init__(self):
        self.writes = []

    def appendEvents(self, events):
        d = Deferred()
        self.writes.append((list(events), d))
        return d


class EventLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = SlowStore()
        self.log = EventLog(self.store, self.clock, maxBatch=3)

    def emit(self, n):
        for i in range(n):
            self.log.emit("accepted", "Q%d" % i, "r@example.com")

    def test_batchPerTurn(self):
        """
        Events emitted in one reactor turn go to the store in one write,
        stamped with the clock.
        """
        self.clock.advance(50)
        self.emit(2)
        self.assertEqual(self.store.writes, [])
        self.clock.advance(0)
        [(events, _)] = self.store.writes
        self.assertEqual([e.queue_id for e in events], ["Q0", "Q1"])
        self.assertEqual({e.time for e in events}, {50.0})

    def test_minInterval(self):
        """
        With C{minInterval}, a write starts no sooner than that after the
        last one started: what comes meanwhile waits and goes in one batch,
        and C{flushed} waits for it.
        """
        log = EventLog(self.store, self.clock, maxInFlight=1, minInterval=0.05)
        self.clock.advance(10)
        log.emit("accepted", "Q0", "r@example.com")
        self.clock.advance(0)
        self.assertEqual(len(self.store.writes), 1)
        self.store.writes[0][1].callback(None)
        for i in range(1, 4):
            log.emit("accepted", f"Q{i}", "r@example.com")
            self.clock.advance(0.01)
        flushed = log.flushed()
        self.assertEqual(len(self.store.writes), 1)
        self.clock.advance(0.03)
        self.assertEqual([e.queue_id for e in self.store.writes[1][0]], ["Q1", "Q2", "Q3"])
        self.assertNoResult(flushed)
        self.store.writes[1][1].callback(None)
        self.successResultOf(flushed)
        # Quiet for longer than the interval: the next event goes at once.
        self.clock.advance(1)
        log.emit("accepted", "Q4", "r@example.com")
        self.clock.advance(0)
        self.assertEqual(len(self.store.writes), 3)

    def test_inFlightLimit(self):
        """
        At most maxInFlight writes are outstanding; the rest waits, in order.
        """
        self.emit(10)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual([len(e) for e, _ in self.store.writes], [3, 3])
        self.store.writes[0][1].callback(None)
        self.clock.advance(0)
        self.assertEqual([len(e) for e, _ in self.store.writes], [3, 3, 3])
        self.assertEqual(self.store.writes[2][0][0].queue_id, "Q6")

    def test_flushed(self):
        """
        flushed() fires once everything emitted so far is written.
        """
        self.emit(2)
        d = self.log.flushed()
        self.clock.advance(0)
        self.assertNoResult(d)
        self.store.writes[0][1].callback(None)
        self.successResultOf(d)
        self.successResultOf(self.log.flushed())
