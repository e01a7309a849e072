"""
Tests for the delivery scheduler with cluster-wide connection slots
(L{smartrelay.cluster.leases.LeaseKeeper}): two scheduler "nodes" on one
fake clock sharing one lease back end, and the single-node scheduler suite
run again with a local lease keeper.
"""

from random import Random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.cluster.leases import LeaseKeeper, LocalLeases
from smartrelay.outbound.pool import DestinationPolicy
from smartrelay.outbound.scheduler import DeliveryScheduler, leaseResource
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    RecordingEvents,
    makeEntry,
)
from tests import test_outbound_scheduler as single
from tests.test_cluster_leases import FixedNodes, UnreachableLeases

START = 1_700_000_000.0


class Node:
    """
    One relay node: a scheduler with its own spool, deliverer and lease
    keeper, sharing the clock and the lease back end.
    """

    def __init__(self, clock, backend, name, maxConnections=10, nodes=None):
        self.clock = clock
        self.spool = FakeSpool()
        self.events = RecordingEvents()
        self.deliverer = FakeDeliverer()
        self.keeper = LeaseKeeper(
            backend, clock, holder=name, shared=True, ttl=30, nodes=nodes
        )
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=FakeRouter(table={"limited.test": ["mx.limited.test"], "other.test": ["mx.other.test"]}),
            connector=self.deliverer,
            events=self.events,
            clock=clock,
            retry=Delays((60, 300, 900)),
            maxAge=3600.0,
            maxConnections=maxConnections,
            policy=DestinationPolicy(domains={"limited.test": {"maxConnections": 2}}),
            leases=self.keeper,
            idleTimeout=30.0,
            leaseIdleTimeout=2.0,
        )
        self.keeper.startService()
        self.scheduler.startService()

    def add(self, queue_id, recipients):
        entry = makeEntry(queue_id, recipients, received=self.clock.seconds())
        self.spool.add(entry, b"message " + queue_id.encode())
        self.scheduler.enqueue(entry)
        return entry

    def open(self, host="mx.limited.test"):
        return [s for s in self.deliverer.connected() if s.hop.name == host]

    def pending(self):
        return self.deliverer.pending()

    def stop(self):
        if self.scheduler.running:
            self.scheduler.stopService()
        if self.keeper.running:
            self.keeper.stopService()


class TwoNodeTests(SynchronousTestCase):
    """
    Two schedulers sharing one lease back end keep one connection limit.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.backend = LocalLeases()
        self.a = Node(self.clock, self.backend, "a")
        self.b = Node(self.clock, self.backend, "b")
        for node in (self.a, self.b):
            self.addCleanup(node.stop)

    def sessions(self):
        return len(self.a.open()) + len(self.b.open())

    def test_limitHoldsAcrossNodes(self):
        """
        With 10 messages on each node for a destination limited to 2, at
        most 2 sessions are open in the cluster at any time, and every
        message is delivered.
        """
        for i in range(10):
            self.a.add(f"A{i}", [f"r{i}@limited.test"])
            self.b.add(f"B{i}", [f"r{i}@limited.test"])
        self.clock.advance(0)
        most = self.sessions()
        for _ in range(200):
            calls = self.a.pending() + self.b.pending()
            if calls:
                calls[0].answer(250, "ok")
            self.clock.advance(0.5)
            most = max(most, self.sessions())
        self.assertEqual(most, 2)
        delivered = [e for n in (self.a, self.b) for e in n.events.emitted if e[0] == "delivered"]
        self.assertEqual(len(delivered), 20)
        self.assertEqual(self.a.scheduler.queued() + self.b.scheduler.queued(), 0)

    def test_idleSessionGivesSlotBack(self):
        """
        A session left idle gives its slot back after C{leaseIdleTimeout},
        not C{idleTimeout}: the other node's mail goes out.
        """
        self.a.add("A0", ["x@limited.test"])
        self.a.add("A1", ["y@limited.test"])
        self.clock.advance(0)
        self.assertEqual(len(self.a.open()), 2)
        for call in self.a.pending():
            call.answer(250, "ok")
        self.b.add("B0", ["z@limited.test"])
        self.clock.advance(0.5)
        self.assertEqual(self.b.pending(), [])
        self.clock.advance(2)
        # B asks again within 1.25 poll intervals (its retries are spread).
        self.clock.advance(1.5)
        self.assertEqual(len(self.b.pending()), 1)

    def test_deadNodeSlotsReturnWithinTTL(self):
        """
        A node that dies holding both slots (no release, no renewal) frees
        them within the lease TTL: the other node delivers again.
        """
        self.a.add("A0", ["x@limited.test"])
        self.a.add("A1", ["y@limited.test"])
        self.clock.advance(0)
        self.assertEqual(len(self.a.pending()), 2)
        # kill -9: its timers stop, its sessions hang, nothing is released.
        self.a.keeper._renewal.stop()
        self.b.add("B0", ["z@limited.test"])
        self.clock.advance(29)
        self.assertEqual(self.b.pending(), [])
        self.clock.advance(1.5)
        self.assertEqual(len(self.b.pending()), 1)

    def test_busyDomainDoesNotStarveOthers(self):
        """
        While a destination's slots are all taken elsewhere, a node still
        delivers to other destinations at once.
        """
        self.a.add("A0", ["x@limited.test"])
        self.a.add("A1", ["y@limited.test"])
        self.clock.advance(0)
        for i in range(3):
            self.b.add(f"B{i}", [f"w{i}@limited.test"])
        self.b.add("C0", ["u@other.test"])
        self.clock.advance(0)
        hosts = [c.hop.name for c in self.b.pending()]
        self.assertEqual(hosts, ["mx.other.test"])
        # The refused destination took no global slot meanwhile.
        self.assertEqual(self.b.scheduler.activeSessions, 1)

    def test_onlyUsableSlotsTaken(self):
        """
        A node asks for one slot per waiting job: one message takes one
        lease, not the destination's whole limit.
        """
        self.a.add("A0", ["x@limited.test"])
        self.clock.advance(0)
        live = self.successResultOf(
            self.backend.liveLeases(leaseResource("limited.test"), self.clock.seconds())
        )
        self.assertEqual(len(live), 1)
        self.a.pending()[0].answer(250, "ok")
        self.clock.advance(2.5)
        live = self.successResultOf(
            self.backend.liveLeases(leaseResource("limited.test"), self.clock.seconds())
        )
        self.assertEqual(live, [])


class OutageTests(SynchronousTestCase):
    """
    A node that cannot reach the lease store takes 1/N of each limit.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.backend = UnreachableLeases()
        self.node = Node(self.clock, self.backend, "a", nodes=FixedNodes(2))
        self.addCleanup(self.node.stop)

    def test_halfTheLimitWhileDown(self):
        """
        With the store down and two live nodes, one session (2 / 2) is
        opened to the destination limited to 2; mail still goes out.
        """
        self.backend.down = True
        for i in range(4):
            self.node.add(f"A{i}", [f"r{i}@limited.test"])
        self.clock.advance(0)
        self.assertEqual(len(self.node.pending()), 1)
        self.assertEqual(self.node.keeper.state()["held_locally"], 1)
        for _ in range(20):
            for call in self.node.pending():
                call.answer(250, "ok")
            self.clock.advance(0.5)
            self.assertLessEqual(len(self.node.open()), 1)
        self.assertEqual(self.node.scheduler.queued(), 0)
        self.flushLoggedErrors()


def _leased(case):
    """
    A copy of a single-node scheduler test case whose scheduler takes every
    connection slot from a local (SQLite / memory store) lease keeper.
    """

    class Leased(case):
        def schedulerOptions(self) -> dict:
            keeper = LeaseKeeper(LocalLeases(), self.clock, holder="n", shared=False)
            keeper.startService()
            self.addCleanup(keeper.stopService)
            return dict(super().schedulerOptions(), leases=keeper)

    Leased.__name__ = "Leased" + case.__name__
    Leased.__qualname__ = Leased.__name__
    Leased.__doc__ = f"{case.__doc__.strip()} (with a local lease keeper)"
    return Leased


LeasedOutcomeTests = _leased(single.OutcomeTests)
LeasedRoutingTests = _leased(single.RoutingTests)
LeasedTimingTests = _leased(single.TimingTests)
LeasedConcurrencyTests = _leased(single.ConcurrencyTests)
LeasedRecordTests = _leased(single.RecordTests)
LeasedStopTests = _leased(single.StopTests)
LeasedHoldTests = _leased(single.HoldTests)
LeasedQueueControlTests = _leased(single.QueueControlTests)


class RateFallbackTests(SynchronousTestCase):
    """
    With the store unreachable, a node of N paces every rate at 1/N of it.
    """

    def test_shareOfRate(self):
        """
        One of four live nodes, a rate of 4/s: with the store down this
        node delivers one message a second, never more.
        """
        from twisted.internet.defer import fail

        from smartrelay.outbound.pool import Limits
        from smartrelay.outbound.session import AttemptResult, Reply

        class DownStore:
            def takeTokens(self, *args):
                return fail(ConnectionRefusedError("connection refused"))

        clock = Clock()
        clock.advance(START)
        # The one store (its leases and its buckets) cannot be reached.
        backend = UnreachableLeases()
        backend.down = True
        keeper = LeaseKeeper(backend, clock, shared=True, nodes=FixedNodes(4))
        self.assertEqual(keeper.fallbackRate(4.0), 1.0)
        events = RecordingEvents()
        deliverer = FakeDeliverer(
            auto=lambda call: AttemptResult(
                call.hop.name, False, {a: Reply(250, None, "ok") for a in call.recipients}
            )
        )
        spool = FakeSpool()
        scheduler = DeliveryScheduler(
            spool=spool,
            router=FakeRouter(table={"a.example": ["mx.a.example"]}),
            connector=deliverer,
            events=events,
            clock=clock,
            retry=Delays((60,)),
            maxAge=3600.0,
            maxConnections=10,
            policy=DestinationPolicy(defaults=Limits(maxConnections=5, rate=4.0, burst=4)),
            store=DownStore(),
            leases=keeper,
            idleTimeout=30.0,
        )
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        for i in range(10):
            entry = makeEntry(f"Q{i}", [f"r{i}@a.example"], received=clock.seconds())
            spool.add(entry, b"message")
            scheduler.enqueue(entry)
        delivered = []
        for second in range(5):
            clock.advance(0 if second == 0 else 1)
            delivered.append(len(events.ofType("delivered")))
        self.assertEqual(delivered, [1, 2, 3, 4, 5])
        self.assertTrue(scheduler.ratesLocal)


class CountingStore:
    """
    A store's token buckets (a L{MemoryStore}'s), counting the calls.
    """

    def __init__(self):
        from smartrelay.store.memory import MemoryStore

        self.store = MemoryStore()
        self.takes = 0

    def takeTokens(self, *args):
        self.takes += 1
        return self.store.takeTokens(*args)


class CountingLeases(LocalLeases):
    """
    L{LocalLeases} counting the calls that take a slot.
    """

    def __init__(self, tokens):
        super().__init__(tokens=tokens)
        self.acquires = self.combined = 0

    def acquireLease(self, *args):
        self.acquires += 1
        return super().acquireLease(*args)

    def acquireLeaseAndTokens(self, *args):
        self.combined += 1
        return super().acquireLeaseAndTokens(*args)


class SlotAndTokenTests(SynchronousTestCase):
    """
    A destination with a rate and a cluster-wide connection limit: a new
    session takes its slot and its token in one call to the store
    (L{LeaseKeeper.acquireWithToken}); a session already open takes
    tokens alone.
    """

    def setUp(self):
        from smartrelay.outbound.pool import Limits
        from smartrelay.outbound.session import AttemptResult, Reply

        self.clock = Clock()
        self.clock.advance(START)
        self.tokens = CountingStore()
        self.backend = CountingLeases(self.tokens)
        self.nodes = []
        for name in ("a", "b"):
            keeper = LeaseKeeper(self.backend, self.clock, holder=name, shared=True, ttl=30)
            events = RecordingEvents()
            spool = FakeSpool()
            deliverer = FakeDeliverer(
                auto=lambda call: AttemptResult(
                    call.hop.name, False, {a: Reply(250, None, "ok") for a in call.recipients}
                )
            )
            scheduler = DeliveryScheduler(
                spool=spool,
                router=FakeRouter(table={"a.example": ["mx.a.example"]}),
                connector=deliverer,
                events=events,
                clock=self.clock,
                retry=Delays((60,)),
                maxAge=3600.0,
                maxConnections=10,
                policy=DestinationPolicy(
                    defaults=Limits(maxConnections=1, rate=2.0, burst=2, messagesPerConnection=1)
                ),
                store=self.tokens,
                leases=keeper,
                idleTimeout=30.0,
                random=Random(len(self.nodes)),
            )
            keeper.startService()
            scheduler.startService()
            self.addCleanup(keeper.stopService)
            self.addCleanup(scheduler.stopService)
            self.nodes.append((scheduler, spool, events))

    def add(self, node, count):
        scheduler, spool, _ = self.nodes[node]
        for i in range(count):
            entry = makeEntry(f"N{node}Q{i}", [f"r{i}@a.example"], received=self.clock.seconds())
            spool.add(entry, b"message")
            scheduler.enqueue(entry)

    def delivered(self):
        return sum(len(events.ofType("delivered")) for _, _, events in self.nodes)

    def test_oneCallPerNewSession(self):
        """
        One message, one new session: one call to the store takes the
        slot and the token, and no separate token is asked for.
        """
        self.add(0, 1)
        self.clock.advance(0)
        self.assertEqual(self.delivered(), 1)
        self.assertEqual((self.backend.combined, self.backend.acquires, self.tokens.takes), (1, 0, 1))

    def test_rateHoldsAcrossNodes(self):
        """
        Both nodes with 10 messages for a destination of 2 a second
        (burst 2), one session per message: the cluster delivers at the
        rate, and a refused token or slot waits (no busy loop of calls).
        """
        self.add(0, 10)
        self.add(1, 10)
        seen = []
        for _ in range(5):
            self.clock.advance(1)
            seen.append(self.delivered())
        # Never more than the burst plus 2 a second, and close to the rate.
        for second, count in enumerate(seen, 1):
            self.assertLessEqual(count, 2 + 2 * second)
        self.assertGreaterEqual(seen[-1], 8)
        # Both nodes had their turns.
        self.assertTrue(all(events.ofType("delivered") for _, _, events in self.nodes))
        self.assertLess(self.backend.combined, 100)
