"""
Tests for L{smartrelay.journal} and the degraded mode of
L{smartrelay.events.EventLog}: when the store fails, events go to a bounded
on-disk journal and are replayed, in order, when it is back.
"""

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.events import Event, EventLog
from smartrelay.journal import EventJournal, decodeEvents, encodeEvents
from smartrelay.store.memory import MemoryStore


def synchronous(f, *args, **kwargs):
    return maybeDeferred(f, *args, **kwargs)


class FlakyStore(MemoryStore):
    """
    A memory store whose writes fail while C{down} is set.
    """

    down = False

    def appendEvents(self, events):
        if self.down:
            return fail(ConnectionError("store unreachable"))
        return MemoryStore.appendEvents(self, events)


class CodecTests(SynchronousTestCase):
    @given(
        st.lists(
            st.builds(
                Event,
                type=st.sampled_from(["accepted", "delivered", "bounced"]),
                queue_id=st.one_of(st.none(), st.text(max_size=20)),
                recipient=st.one_of(st.none(), st.text(max_size=30)),
                time=st.floats(0, 4e9),
                tag=st.one_of(st.none(), st.text(max_size=10)),
                metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3),
                detail=st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
            ),
            max_size=10,
        )
    )
    def test_roundTrip(self, events):
        """
        Any events survive the journal's encoding exactly (ids and times
        included).
        """
        decoded, skipped = decodeEvents(encodeEvents(events))
        self.assertEqual((decoded, skipped), (events, 0))

    def test_tornLine(self):
        """
        A torn last line is skipped and counted.
        """
        event = Event(type="accepted", queue_id="q", recipient="a@b.c", time=1.0)
        raw = encodeEvents([event]) + b'{"id": "x", "ti'
        self.assertEqual(decodeEvents(raw), ([event], 1))


class DegradedTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FlakyStore()
        self.directory = self.mktemp()
        self.journal = EventJournal(self.directory, synchronous)
        self.log = EventLog(self.store, self.clock, journal=self.journal)
        self.successResultOf(self.log.start())

    def emit(self, n, start=0):
        for i in range(start, start + n):
            self.log.emit("accepted", "Q%d" % i, "r%d@example.com" % i)
        self.clock.advance(0)

    def stored(self):
        return [e.queue_id for e in self.successResultOf(self.store.queryEvents(limit=1000)).events]

    def test_healthy(self):
        """
        With the store up nothing touches the journal.
        """
        self.emit(3)
        self.assertEqual(self.stored(), ["Q0", "Q1", "Q2"])
        self.assertFalse(self.log.degraded)
        self.assertEqual(os.listdir(self.directory), [])

    def test_storeDownThenBack(self):
        """
        Events that the store refuses are journaled, later events too, and
        all are replayed in order once the store is back.
        """
        self.store.down = True
        self.emit(2)
        self.emit(2, start=2)
        self.assertTrue(self.log.degraded)
        self.assertEqual(self.stored(), [])
        self.assertGreater(self.journal.size, 0)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.store.down = False
        self.clock.advance(1)
        self.assertEqual(self.stored(), ["Q0", "Q1", "Q2", "Q3"])
        self.assertFalse(self.log.degraded)
        self.assertEqual(os.listdir(self.directory), [])
        self.assertEqual(self.journal.size, 0)
        self.emit(1, start=4)
        self.assertEqual(self.stored()[-1], "Q4")

    def test_replayBacksOff(self):
        """
        While the store stays down, replays are retried with growing delays
        and nothing is lost.
        """
        self.store.down = True
        self.emit(1)
        self.flushLoggedErrors(ConnectionError)
        for delay in (1, 1, 2, 5):
            self.clock.advance(delay)
        self.assertTrue(self.log.degraded)
        self.assertEqual(self.log._replayFailures, 4)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), self.clock.seconds() + 10)
        self.store.down = False
        self.clock.advance(10)
        self.assertEqual(self.stored(), ["Q0"])

    def test_journalFull(self):
        """
        Past the journal's limit, events are logged as lost, never written
        half; the relay keeps running.
        """
        self.journal.maxBytes = 200
        self.store.down = True
        self.emit(1)
        self.emit(5, start=1)
        self.flushLoggedErrors(ConnectionError)
        self.store.down = False
        self.clock.advance(1)
        self.assertEqual(self.stored(), ["Q0"])

    def test_replayedAfterRestart(self):
        """
        Events left in the journal by an earlier run are replayed on start.
        """
        self.store.down = True
        self.emit(3)
        self.flushLoggedErrors(ConnectionError)
        self.log.stop()

        store = FlakyStore()
        journal = EventJournal(self.directory, synchronous)
        log = EventLog(store, self.clock, journal=journal)
        self.successResultOf(log.start())
        self.assertTrue(log.degraded)
        self.clock.advance(0)
        events = self.successResultOf(store.queryEvents(limit=10)).events
        self.assertEqual([e.queue_id for e in events], ["Q0", "Q1", "Q2"])
        self.assertFalse(log.degraded)

    def test_stopCancelsReplay(self):
        """
        stop() leaves no timer behind; the journal keeps the events.
        """
        self.store.down = True
        self.emit(1)
        self.flushLoggedErrors(ConnectionError)
        self.log.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(os.listdir(self.directory)), 1)

    def test_storeNotStarted(self):
        """
        When the store could not be started, events are journaled and each
        replay first starts the store; once it starts, the journal drains.
        """
        starts = []

        def start():
            starts.append(1)
            if self.store.down:
                return fail(ConnectionError("still unreachable"))
            return MemoryStore.start(self.store)

        self.store.start = start
        log = EventLog(self.store, self.clock, journal=EventJournal(self.mktemp(), synchronous))
        self.store.down = True
        self.successResultOf(log.start(storeStarted=False))
        self.assertTrue(log.degraded)
        log.emit("accepted", "Q0", "a@b.c")
        self.clock.advance(1)
        self.assertEqual(len(starts), 1)
        self.store.down = False
        self.clock.advance(1)
        self.assertEqual(len(starts), 2)
        self.assertFalse(log.degraded)
        events = self.successResultOf(self.store.queryEvents(limit=10)).events
        self.assertEqual([e.queue_id for e in events], ["Q0"])

    def test_withoutJournal(self):
        """
        Without a journal a failed write is logged as lost.
        """
        log = EventLog(self.store, self.clock)
        self.store.down = True
        log.emit("accepted", "Q", "a@b.c")
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertFalse(log.degraded)
