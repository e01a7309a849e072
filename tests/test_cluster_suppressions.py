"""
Tests for suppressions that arrive while the store cannot be reached:
L{smartrelay.events.EventLog.suppress} (the event journal keeps them and
replays them), L{smartrelay.cluster.suppressions.DurableSuppressions} and
the scheduler never delivering to them, on a fake clock.
"""

import os

from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smartrelay.cluster.replica import SuppressionReplica
from smartrelay.cluster.suppressions import DurableSuppressions
from smartrelay.events import Event, EventLog, JournalFull
from smartrelay.journal import EventJournal, decodeEvents, encodeEvents
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    RecordingEvents,
    makeEntry,
)
from smartrelay.store.interfaces import IStore, SuppressionEntry
from smartrelay.store.memory import MemoryStore

T0 = 1_800_000_000.0


def synchronous(f, *args, **kwargs):
    return maybeDeferred(f, *args, **kwargs)


class DownStore(MemoryStore):
    """
    A memory store that fails every call while C{down}; counts the
    suppression adds it took.
    """

    down = False
    adds = 0

    def _maybeDown(self, method, *args, **kwargs):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return method(self, *args, **kwargs)

    def appendEvents(self, events):
        return self._maybeDown(MemoryStore.appendEvents, events)

    def addSuppression(self, entry):
        if not self.down:
            self.adds += 1
        return self._maybeDown(MemoryStore.addSuppression, entry)

    def checkSuppressions(self, addresses, now):
        return self._maybeDown(MemoryStore.checkSuppressions, addresses, now)

    def listSuppressions(self, **kwargs):
        return self._maybeDown(MemoryStore.listSuppressions, **kwargs)


def unsubscribe(address, time=T0):
    return SuppressionEntry(address=address, reason="unsubscribe", time=time)


class Relay:
    """
    The pieces of one node that suppressions go through: the store, the
    event log with its journal, the replica and the store wrapper.
    """

    def __init__(self, testCase, store, directory, clock, maxBytes=1 << 20):
        self.store = store
        self.clock = clock
        self.journal = EventJournal(directory, synchronous, maxBytes=maxBytes)
        self.events = EventLog(store, clock, journal=self.journal)
        testCase.successResultOf(self.events.start(storeStarted=not store.down))
        testCase.addCleanup(self.events.stop)
        self.replica = SuppressionReplica(
            store,
            clock,
            directory + "-replica.jsonl",
            maxStaleness=600,
            pending=self.events.pendingSuppressions,
        )
        self.suppressions = DurableSuppressions(store, self.events, self.replica)


class CodecTests(SynchronousTestCase):
    def test_roundTrip(self):
        """
        Suppression entries and events share the journal's lines and come
        back in their order.
        """
        records = [
            Event(type="accepted", queue_id="q", recipient="a@b.c", time=1.0),
            SuppressionEntry(
                address="A@B.C", reason="complaint", source_event="e1", time=2.0, expires=9.0
            ),
            Event(type="delivered", queue_id="q", recipient="a@b.c", time=3.0),
        ]
        self.assertEqual(decodeEvents(encodeEvents(records)), (records, 0))

    def test_badSuppressionLine(self):
        """
        A suppression line that does not make an entry (a bad address, a
        torn line) is skipped and counted.
        """
        raw = (
            b'{"suppression":{"address":"not an address","reason":"unsubscribe","time":1}}\n'
            b'{"suppression":{"address":"a@b.c","reason":"unsubscr'
        )
        self.assertEqual(decodeEvents(raw), ([], 2))


class EventLogSuppressTests(SynchronousTestCase):
    """
    L{EventLog.suppress}: into the store, or the journal while it fails.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = DownStore()
        self.directory = self.mktemp()
        self.relay = Relay(self, self.store, self.directory, self.clock)
        self.events = self.relay.events

    def stored(self, address):
        return self.successResultOf(self.store.checkSuppressions([address], T0 + 10**6))

    def test_healthy(self):
        """
        With the store up the entry goes to the store; nothing is pending.
        """
        self.assertIs(self.successResultOf(self.events.suppress(unsubscribe("a@b.c"))), True)
        self.assertIn("a@b.c", self.stored("a@b.c"))
        self.assertEqual(self.events.pendingSuppressions, {})
        self.assertFalse(self.events.degraded)

    def test_storeDownThenBack(self):
        """
        With the store down the entry is journaled (durably, on disk) and
        pending; once the store is back the replay puts it there, once, and
        it is no longer pending.
        """
        self.store.down = True
        entry = unsubscribe("a@b.c")
        self.assertIs(self.successResultOf(self.events.suppress(entry)), False)
        self.assertEqual(self.events.pendingSuppressions, {"a@b.c": entry})
        self.assertTrue(self.events.degraded)
        self.assertEqual(self.successResultOf(self.relay.journal.suppressions()), [entry])
        self.clock.advance(1)
        self.assertEqual(self.events.pendingSuppressions, {"a@b.c": entry})
        self.store.down = False
        self.clock.advance(2)
        self.assertEqual(self.stored("a@b.c"), {"a@b.c": entry})
        self.assertEqual(self.store.adds, 1)
        self.assertEqual(self.events.pendingSuppressions, {})
        self.assertFalse(self.events.degraded)
        self.assertEqual(os.listdir(self.directory), [])

    def test_inOrderWithEvents(self):
        """
        Events and suppressions journaled together are replayed in their
        order.
        """
        self.store.down = True
        self.events.emit("accepted", "Q1", "a@b.c")
        self.clock.advance(0)
        self.successResultOf(self.events.suppress(unsubscribe("a@b.c")))
        self.events.emit("unsubscribed", "Q1", "a@b.c")
        self.clock.advance(0)
        order = []
        appendEvents, addSuppression = self.store.appendEvents, self.store.addSuppression
        self.store.appendEvents = lambda events: (
            order.extend(e.type for e in events) or appendEvents(events)
        )
        self.store.addSuppression = lambda entry: (
            order.append(entry.address) or addSuppression(entry)
        )
        self.store.down = False
        self.clock.advance(1)
        self.assertEqual(order, ["accepted", "a@b.c", "unsubscribed"])
        self.flushLoggedErrors(ConnectionRefusedError)

    def test_pendingAfterRestart(self):
        """
        A node restarted during the outage knows the journaled entries
        before anything is delivered; they reach the store when it is back.
        """
        self.store.down = True
        entry = unsubscribe("a@b.c")
        self.successResultOf(self.events.suppress(entry))
        self.events.stop()
        again = Relay(self, self.store, self.directory, self.clock)
        self.assertEqual(again.events.pendingSuppressions, {"a@b.c": entry})
        self.assertIn("a@b.c", again.replica.check(["a@b.c"], T0))
        self.store.down = False
        self.clock.advance(5)
        self.assertEqual(self.stored("a@b.c"), {"a@b.c": entry})
        self.assertEqual(again.events.pendingSuppressions, {})

    def test_crashDuringReplay(self):
        """
        A replay cut short after the store took the entry (the segment not
        yet removed) is done again by the next run: the store still has
        one entry, the same one.
        """
        self.store.down = True
        entry = unsubscribe("a@b.c")
        self.successResultOf(self.events.suppress(entry))
        self.events.stop()
        self.store.down = False
        # The "crashed" run's store write.
        self.successResultOf(self.store.addSuppression(entry))
        again = Relay(self, self.store, self.directory, self.clock)
        self.clock.advance(0)
        self.assertEqual(self.store.adds, 2)
        page = self.successResultOf(self.store.listSuppressions())
        self.assertEqual(page.entries, [entry])
        self.assertEqual(again.events.pendingSuppressions, {})
        self.assertEqual(os.listdir(self.directory), [])

    def test_newerEntryStaysPending(self):
        """
        Replaying an older entry for an address does not drop a newer one
        still waiting in a later segment.
        """
        self.store.down = True
        old, new = unsubscribe("a@b.c", T0), unsubscribe("a@b.c", T0 + 1)
        self.successResultOf(self.events.suppress(old))
        self.events._pendingSuppression(new)
        self.store.down = False
        self.clock.advance(1)
        self.assertEqual(self.events.pendingSuppressions, {"a@b.c": new})

    def test_journalFull(self):
        """
        With the store down and no room in the journal, suppress fails
        with L{JournalFull} (the caller answers with an error); the entry
        is still checked against on this node.
        """
        full = Relay(self, DownStore(), self.mktemp(), self.clock, maxBytes=10)
        full.store.down = True
        failure = self.failureResultOf(full.suppressions.addSuppression(unsubscribe("a@b.c")))
        failure.trap(JournalFull)
        self.assertIn("journal is full", str(failure.value))
        self.assertIn("a@b.c", full.events.pendingSuppressions)

    def test_withoutJournal(self):
        """
        Without a journal a store failure is the caller's.
        """
        store = DownStore()
        store.down = True
        events = EventLog(store, self.clock)
        self.failureResultOf(events.suppress(unsubscribe("a@b.c")), ConnectionRefusedError)
        store.down = False
        self.assertIs(self.successResultOf(events.suppress(unsubscribe("a@b.c"))), True)


class DurableSuppressionsTests(SynchronousTestCase):
    """
    The store wrapper the relay's producers and scheduler call.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = DownStore()
        self.relay = Relay(self, self.store, self.mktemp(), self.clock)
        self.suppressions = self.relay.suppressions

    def test_interface(self):
        """
        It is an L{IStore}; what it does not change goes to the store.
        """
        verifyObject(IStore, self.suppressions)
        self.successResultOf(self.suppressions.addSuppression(unsubscribe("a@b.c")))
        page = self.successResultOf(self.suppressions.listSuppressions())
        self.assertEqual([e.address for e in page.entries], ["a@b.c"])
        self.assertIs(self.suppressions.takeTokens.__self__, self.suppressions)

    def test_addedDuringOutage(self):
        """
        An entry added while the store is down succeeds, is in the replica
        at once and is part of every check once the store answers, until
        the journal is replayed.
        """
        self.successResultOf(self.relay.replica.sync())
        self.store.down = True
        self.assertIsNone(self.successResultOf(
            self.suppressions.addSuppression(unsubscribe("Late@Example.com"))
        ))
        self.assertIn("Late@example.com", self.relay.replica.check(["Late@example.com"], T0))
        self.failureResultOf(
            self.suppressions.checkSuppressions(["Late@example.com"], T0),
            ConnectionRefusedError,
        )
        # Back, but not replayed yet (the next replay is due in 1s); a sync
        # that does not bring the entry leaves it in the replica.
        self.store.down = False
        self.successResultOf(self.relay.replica.sync())
        self.assertIn("Late@example.com", self.relay.replica.check(["Late@example.com"], T0))
        found = self.successResultOf(
            self.suppressions.checkSuppressions(["Late@example.com", "x@y.z"], T0)
        )
        self.assertEqual(list(found), ["Late@example.com"])
        self.assertEqual(self.successResultOf(self.store.checkSuppressions(["Late@example.com"], T0)), {})
        self.clock.advance(1)
        self.assertIn(
            "Late@example.com",
            self.successResultOf(self.store.checkSuppressions(["Late@example.com"], T0)),
        )

    def test_replicaMergedWhileRestoring(self):
        """
        While the replica puts its copy back into a store that lost its
        data, the copy's entries are part of every check; not after.
        """
        self.successResultOf(self.suppressions.addSuppression(unsubscribe("a@b.c")))
        self.successResultOf(self.relay.replica.sync())
        self.successResultOf(self.store.removeSuppression("a@b.c"))  # the loss
        self.relay.replica.storeLostData()
        found = self.successResultOf(self.suppressions.checkSuppressions(["a@B.c", "x@y.z"], T0))
        self.assertEqual(list(found), ["a@B.c"])
        self.successResultOf(self.relay.replica.sync())
        self.assertFalse(self.relay.replica.restoring)
        self.successResultOf(self.store.removeSuppression("a@b.c"))  # removed on purpose
        self.assertEqual(
            self.successResultOf(self.suppressions.checkSuppressions(["a@b.c"], T0)), {}
        )

    def test_provisionalMerged(self):
        """
        An unsubscribe held provisionally (by mail, not attributed yet) is
        part of the answer of a wrapper that asks for them (the
        scheduler's) until released; not of the others (the feedback
        processor's must see the list as it is, or it would think the
        address already unsubscribed and record nothing).
        """
        scheduler = DurableSuppressions(
            self.store, self.relay.events, self.relay.replica, provisional=True
        )
        self.relay.replica.holdProvisionally("R1", unsubscribe("a@b.c"))
        found = self.successResultOf(scheduler.checkSuppressions(["a@b.c"], T0))
        self.assertEqual(list(found), ["a@b.c"])
        self.assertEqual(
            self.successResultOf(self.suppressions.checkSuppressions(["a@b.c"], T0)), {}
        )
        self.relay.replica.releaseProvisional("R1")
        self.assertEqual(self.successResultOf(scheduler.checkSuppressions(["a@b.c"], T0)), {})

    def test_expiredPendingIgnored(self):
        """
        A pending entry that has expired does not suppress.
        """
        self.store.down = True
        entry = SuppressionEntry(address="a@b.c", reason="bounce", time=T0, expires=T0 + 5)
        self.successResultOf(self.suppressions.addSuppression(entry))
        self.store.down = False
        self.assertEqual(
            self.successResultOf(self.suppressions.checkSuppressions(["a@b.c"], T0 + 5)), {}
        )


class SchedulerTests(SynchronousTestCase):
    """
    The scheduler, given the wrapper, never delivers to an address
    unsubscribed during the outage: not while the store is down, not in
    the gap between its return and the replay.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = DownStore()
        self.relay = Relay(self, self.store, self.mktemp(), self.clock)
        self.spool = FakeSpool()
        self.events = RecordingEvents()
        self.deliverer = FakeDeliverer()
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=FakeRouter(),
            connector=self.deliverer,
            events=self.events,
            clock=self.clock,
            retry=Delays((60, 300, 900)),
            maxAge=86400.0,
            maxConnections=5,
            store=self.relay.suppressions,
            suppress=True,
            replica=self.relay.replica,
        )
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        self.successResultOf(self.relay.replica.sync())

    def add(self, queue_id, recipients):
        entry = makeEntry(queue_id, recipients, received=self.clock.seconds())
        self.spool.add(entry, b"message")
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        return entry

    def delivered(self):
        return [c.recipients for c in self.deliverer.calls]

    def test_neverDeliveredToOutageUnsubscribe(self):
        """
        Unsubscribed while the store is down: suppressed from the replica;
        after the store is back and before the replay: suppressed by the
        pending entry; after the replay: by the store.
        """
        self.store.down = True
        self.successResultOf(self.relay.suppressions.addSuppression(unsubscribe("gone@b.c")))
        self.add("Q1", ["gone@b.c", "ok@b.c"])
        self.store.down = False
        self.add("Q2", ["gone@b.c"])
        self.assertIn("gone@b.c", self.relay.events.pendingSuppressions)
        self.clock.advance(5)
        self.assertEqual(self.relay.events.pendingSuppressions, {})
        self.add("Q3", ["gone@b.c"])
        self.assertEqual(self.delivered(), [["ok@b.c"]])
        suppressed = [e[1] for e in self.events.emitted if e[0] == "suppressed"]
        self.assertEqual(suppressed, ["Q1", "Q2", "Q3"])
