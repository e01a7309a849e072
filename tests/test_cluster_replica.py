"""
Tests for L{smartrelay.cluster.replica.SuppressionReplica} and the
scheduler's use of it while the store cannot be reached, on a fake clock.
"""

import os

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.cluster.replica import SuppressionReplica
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    RecordingEvents,
    makeEntry,
)
from smartrelay.store.interfaces import SuppressionEntry
from smartrelay.store.memory import MemoryStore

T0 = 1_800_000_000.0


class FlakyStore(MemoryStore):
    """
    A memory store that fails every call while C{down}.
    """

    down = False

    def checkSuppressions(self, addresses, now):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return super().checkSuppressions(addresses, now)

    def listSuppressions(self, **kwargs):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return super().listSuppressions(**kwargs)


def suppression(address, time=T0 - 100, expires=None):
    return SuppressionEntry(address=address, reason="unsubscribe", time=time, expires=expires)


class ReplicaTests(SynchronousTestCase):
    """
    The replica copies the list, keeps it on disk, and knows its age.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = FlakyStore()
        self.path = os.path.join(self.mktemp() + "-replica.jsonl")
        self.replica = SuppressionReplica(
            self.store, self.clock, self.path, maxStaleness=600, interval=60
        )

    def test_copiesEveryPage(self):
        """
        A sync copies more entries than one page holds; checks answer from
        the copy, expired entries not counted.
        """
        for i in range(2500):
            self.successResultOf(self.store.addSuppression(suppression(f"u{i}@example.com")))
        self.successResultOf(
            self.store.addSuppression(suppression("old@example.com", expires=T0 - 1))
        )
        self.successResultOf(self.replica.sync())
        found = self.replica.check(["u7@Example.com", "u2499@example.com", "old@example.com", "x@y.z"], T0)
        self.assertEqual(sorted(found), ["u2499@example.com", "u7@Example.com"])
        self.assertEqual(self.replica.synced, T0)

    def test_freshness(self):
        """
        The copy may be used until it is C{maxStaleness} old; none is never
        fresh.
        """
        self.assertFalse(self.replica.fresh(T0))
        self.assertIsNone(self.replica.age(T0))
        self.successResultOf(self.replica.sync())
        self.assertTrue(self.replica.fresh(T0 + 600))
        self.assertFalse(self.replica.fresh(T0 + 600.5))

    def test_failedSyncKeepsOldCopy(self):
        """
        A sync that fails (store down) keeps the copy and its age.
        """
        self.successResultOf(self.store.addSuppression(suppression("a@example.com")))
        self.successResultOf(self.replica.sync())
        self.store.down = True
        self.clock.advance(100)
        self.successResultOf(self.replica.sync())
        self.assertEqual(self.replica.synced, T0)
        self.assertIn("a@example.com", self.replica.check(["a@example.com"], T0 + 100))

    def test_durableAcrossRestart(self):
        """
        A new replica (a restarted node) reads the copy and its age from
        the file.
        """
        self.successResultOf(self.store.addSuppression(suppression("a@example.com")))
        self.successResultOf(self.replica.sync())
        again = SuppressionReplica(FlakyStore(), self.clock, self.path)
        self.successResultOf(again.load())
        self.assertEqual(again.synced, T0)
        self.assertEqual(list(again.check(["a@example.com"], T0)), ["a@example.com"])

    def test_damagedFileIgnored(self):
        """
        A damaged or truncated replica file is ignored (no copy), not an
        error.
        """
        for text in ("", "not json\n", '{"synced": 1, "count": 2}\n{"address": "a@b.c"}\n'):
            with open(self.path, "w") as f:
                f.write(text)
            replica = SuppressionReplica(self.store, self.clock, self.path)
            self.successResultOf(replica.load())
            self.assertIsNone(replica.synced)

    def test_syncsPeriodically(self):
        """
        Running, it syncs at once and every C{interval}.
        """
        self.replica.startService()
        self.addCleanup(self.replica.stopService)
        self.assertEqual(self.replica.synced, T0)
        self.successResultOf(self.store.addSuppression(suppression("late@example.com")))
        self.clock.advance(60)
        self.assertEqual(self.replica.synced, T0 + 60)
        self.assertIn("late@example.com", self.replica.check(["late@example.com"], T0 + 60))

    def loseData(self):
        """
        Empty the store, as a Redis restarted without persistence is.
        """
        for entry in self.successResultOf(MemoryStore.listSuppressions(self.store)).entries:
            self.successResultOf(self.store.removeSuppression(entry.address))

    def test_restoresAfterStoreLostData(self):
        """
        When the store lost its data the copy is kept (and looked up while
        C{restoring}); the next sync, soon after, puts it back into the
        store before copying the list again.
        """
        self.successResultOf(self.store.addSuppression(suppression("a@example.com")))
        self.replica.startService()
        self.addCleanup(self.replica.stopService)
        self.loseData()
        self.clock.advance(10)
        self.replica.storeLostData()
        self.assertTrue(self.replica.restoring)
        self.assertIn("a@example.com", self.replica.lookup(["a@example.com"], T0 + 10))
        self.clock.advance(0)
        self.assertFalse(self.replica.restoring)
        self.assertEqual(self.replica.synced, T0 + 10)
        self.assertIn(
            "a@example.com",
            self.successResultOf(self.store.checkSuppressions(["a@example.com"], T0 + 10)),
        )
        self.assertIn("a@example.com", self.replica.check(["a@example.com"], T0 + 10))

    def test_lossDuringSyncNotCopied(self):
        """
        A sync whose reading of the list was under way when the store
        lost its data does not replace the copy with what it read: it
        puts the copy back and reads again.
        """
        self.successResultOf(self.store.addSuppression(suppression("a@example.com")))
        self.successResultOf(self.replica.sync())
        waiting = []
        listSuppressions = self.store.listSuppressions

        def slowly(**kwargs):
            d = Deferred()
            waiting.append((d, kwargs))
            return d

        self.store.listSuppressions = slowly
        self.replica.sync()
        self.loseData()
        self.replica.storeLostData()
        self.store.listSuppressions = listSuppressions
        [(d, kwargs)] = waiting
        d.callback(self.successResultOf(listSuppressions(**kwargs)))  # the empty list
        self.assertFalse(self.replica.restoring)
        self.assertIn("a@example.com", self.replica.check(["a@example.com"], T0))
        self.assertIn(
            "a@example.com",
            self.successResultOf(self.store.checkSuppressions(["a@example.com"], T0)),
        )

    def test_provisionalEntries(self):
        """
        A provisional entry is part of every check, whatever syncs bring,
        until it is released; it never goes to the store.
        """
        self.replica.holdProvisionally("R1", suppression("held@example.com"))
        self.successResultOf(self.replica.sync())
        self.assertIn("held@example.com", self.replica.check(["held@example.com"], T0))
        self.assertEqual(
            list(self.replica.lookupProvisional(["held@Example.com", "x@y.z"], T0)),
            ["held@Example.com"],
        )
        self.assertEqual(
            self.successResultOf(self.store.checkSuppressions(["held@example.com"], T0)), {}
        )
        self.replica.releaseProvisional("R1")
        self.replica.releaseProvisional("R1")
        self.assertEqual(self.replica.check(["held@example.com"], T0), {})

    def test_remember(self):
        """
        An entry this node adds is in the copy at once; an older one does
        not replace a newer one.
        """
        self.replica.remember(suppression("a@example.com", time=T0))
        self.replica.remember(suppression("a@example.com", time=T0 - 10, expires=T0 - 5))
        self.assertIn("a@example.com", self.replica.check(["a@example.com"], T0))


class SchedulerReplicaTests(SynchronousTestCase):
    """
    While the store cannot be reached the scheduler checks against the
    replica, and holds recipients when it is too old: never delivers blind.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = FlakyStore()
        self.spool = FakeSpool()
        self.events = RecordingEvents()
        self.deliverer = FakeDeliverer()
        self.replica = SuppressionReplica(
            self.store, self.clock, self.mktemp() + "-replica.jsonl", maxStaleness=600
        )
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=FakeRouter(),
            connector=self.deliverer,
            events=self.events,
            clock=self.clock,
            retry=Delays((60, 300, 900)),
            maxAge=86400.0,
            maxConnections=5,
            store=self.store,
            suppress=True,
            replica=self.replica,
        )
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        self.successResultOf(self.store.addSuppression(suppression("gone@example.com")))

    def add(self, queue_id, recipients):
        entry = makeEntry(queue_id, recipients, received=self.clock.seconds())
        self.spool.add(entry, b"message")
        self.scheduler.enqueue(entry)
        return entry

    def test_freshReplicaSuppresses(self):
        """
        With a fresh replica and the store down, the unsubscribed address
        is suppressed and the other one delivered.
        """
        self.successResultOf(self.replica.sync())
        self.store.down = True
        self.clock.advance(300)
        self.add("Q1", ["gone@example.com", "ok@example.com"])
        self.clock.advance(0)
        self.assertEqual([c.recipients for c in self.deliverer.calls], [["ok@example.com"]])
        self.assertEqual(
            [(e[0], e[2]) for e in self.events.emitted], [("suppressed", "gone@example.com")]
        )
        self.assertEqual(self.replica.checkedLocally, 2)

    def test_staleReplicaHolds(self):
        """
        With the replica too old (or missing) nothing is delivered: the
        recipients are deferred and retried; once the store answers again
        they are checked there and delivered or suppressed.
        """
        self.successResultOf(self.replica.sync())
        self.store.down = True
        self.clock.advance(601)
        entry = self.add("Q1", ["gone@example.com", "ok@example.com"])
        self.clock.advance(0)
        self.assertEqual(self.deliverer.calls, [])
        self.assertEqual(
            sorted((e[0], e[2]) for e in self.events.emitted),
            [("deferred", "gone@example.com"), ("deferred", "ok@example.com")],
        )
        self.assertEqual(self.replica.held, 2)
        self.store.down = False
        self.clock.advance(60)
        self.assertEqual([c.recipients for c in self.deliverer.calls], [["ok@example.com"]])
        self.deliverer.calls[0].answer(250, "ok")
        states = {r.address: r.state for r in entry.recipients}
        self.assertEqual(states, {"gone@example.com": "suppressed", "ok@example.com": "delivered"})

    def test_holdingLoggedWhenReplicaGoesStale(self):
        """
        The warning that recipients are held is logged when the replica
        turns too old, even within a minute of the warning that they are
        checked against it: the operator sees that mail stopped.
        """
        self.successResultOf(self.replica.sync())
        self.store.down = True
        with capturedLogs() as captured:
            self.clock.advance(590)
            for queueID, wait in [("Q1", 20), ("Q2", 0), ("Q3", 0)]:
                self.add(queueID, ["ok@example.com"])
                self.clock.advance(0)
                self.clock.advance(wait)
        texts = [formatEvent(e) for e in captured if e.get("log_level") == LogLevel.warn]
        self.assertEqual(
            [("local replica (590s old)" in t, "holding recipients" in t) for t in texts],
            [(True, False), (False, True)],
        )

    def test_noReplicaYetHolds(self):
        """
        A node that never had a copy holds while the store is down.
        """
        self.store.down = True
        self.add("Q1", ["ok@example.com"])
        self.clock.advance(0)
        self.assertEqual(self.deliverer.calls, [])
        self.assertEqual([e[0] for e in self.events.emitted], ["deferred"])
