"""
Tests for L{smartrelay.cluster.throttle}: one L{IThrottles} contract run
against L{LocalThrottles} and a real C{redis-server}, and the
L{ThrottleBoard} of two nodes sharing one back end on a fake clock.
"""

from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartrelay.cluster.throttle import (
    LocalThrottles,
    ThrottleBoard,
    throttleBackend,
)
from smartrelay.outbound.pool import DestinationPolicy
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    RecordingEvents,
    makeEntry,
)
from smartrelay.store.interfaces import IThrottles, ThrottleState
from smartrelay.store.memory import MemoryStore
from smartrelay.store.redis import RedisStore
from tests.redisserver import sharedRedisServer
from tests.test_store_redis import newPrefix

T0 = 1_800_000_000.0


class ThrottleStateTests(SynchronousTestCase):
    """
    L{ThrottleState} recovers as a function of time.
    """

    def test_steps(self):
        """
        The level holds until C{until}, then drops by one every
        C{cooldown} seconds; C{nextStep} names each drop.
        """
        state = ThrottleState(3, T0 + 60, 60.0, "421")
        self.assertEqual(
            [(state.levelAt(T0 + t), state.nextStep(T0 + t)) for t in (0, 59.9, 60, 119, 120, 180)],
            [
                (3, T0 + 60),
                (3, T0 + 60),
                (2, T0 + 120),
                (2, T0 + 120),
                (1, T0 + 180),
                (0, None),
            ],
        )
        self.assertEqual(state.end, T0 + 180)


class ThrottlesContractMixin:
    """
    What every L{IThrottles} does; C{self.throttles} is the one under test.
    """

    def test_providesInterface(self):
        """
        The back end provides L{IThrottles}.
        """
        self.assertTrue(verifyObject(IThrottles, self.throttles))

    async def test_triggerHalves(self):
        """
        A trigger under the level in force goes one level deeper, with a
        new cool-down, and is listed until its level is 0.
        """
        first = await self.throttles.triggerThrottle("dest", 0, "421 slow down", T0, 60)
        self.assertEqual(first, ThrottleState(1, T0 + 60, 60.0, "421 slow down"))
        second = await self.throttles.triggerThrottle("dest", 1, "421 again", T0 + 10, 60)
        self.assertEqual(second, ThrottleState(2, T0 + 70, 60.0, "421 again"))
        self.assertEqual(await self.throttles.throttleStates(T0 + 10), {"dest": second})
        self.assertEqual(await self.throttles.throttleStates(T0 + 129.9), {"dest": second})
        self.assertEqual(await self.throttles.throttleStates(T0 + 130), {})

    async def test_staleTriggerDoesNotHalveAgain(self):
        """
        A reply to a budget another node has already halved (C{seen} below
        the level in force) keeps the level and starts the cool-down again.
        """
        await self.throttles.triggerThrottle("dest", 0, "first", T0, 60)
        again = await self.throttles.triggerThrottle("dest", 0, "second", T0 + 1, 60)
        self.assertEqual(again, ThrottleState(1, T0 + 61, 60.0, "second"))

    async def test_triggerAfterRecoveryStep(self):
        """
        A trigger counts from the level in force at its time: two levels,
        one step recovered, then a trigger seen at that level is two again.
        """
        await self.throttles.triggerThrottle("dest", 0, "a", T0, 10)
        await self.throttles.triggerThrottle("dest", 1, "b", T0, 10)
        state = await self.throttles.triggerThrottle("dest", 1, "c", T0 + 15, 10)
        self.assertEqual(state, ThrottleState(2, T0 + 25, 10.0, "c"))

    async def test_deepestLevel(self):
        """
        The level stops at 4 (1/16).
        """
        for _ in range(6):
            state = await self.throttles.triggerThrottle("dest", 4, "x", T0, 30)
        self.assertEqual(state.level, 4)

    async def test_destinationsApart(self):
        """
        Each destination has its own state.
        """
        await self.throttles.triggerThrottle("provider:google", 0, "g", T0, 30)
        await self.throttles.triggerThrottle("bücher.example", 1, "b", T0, 60)
        self.assertEqual(
            await self.throttles.throttleStates(T0 + 31),
            {"bücher.example": ThrottleState(2, T0 + 60, 60.0, "b")},
        )

    async def test_longReasonCut(self):
        """
        The reason keeps its first 300 characters.
        """
        state = await self.throttles.triggerThrottle("dest", 0, "x" * 1000, T0, 30)
        self.assertEqual(state.reason, "x" * 300)

    # -- replaying a trigger kept during an outage -------------------------

    async def test_replayIntoNothing(self):
        """
        A replayed state the store does not have is written as it is, and
        listed until its level is 0.
        """
        state = ThrottleState(2, T0 + 60, 60.0, "421 while down")
        written = await self.throttles.replayThrottle("dest", state, T0 + 10)
        self.assertEqual(written, state)
        self.assertEqual(await self.throttles.throttleStates(T0 + 10), {"dest": state})
        self.assertEqual(await self.throttles.throttleStates(T0 + 119.9), {"dest": state})
        self.assertEqual(await self.throttles.throttleStates(T0 + 120), {})

    async def test_replayOverNeverExtends(self):
        """
        A replayed state that is over (or would be over before the stored
        one, and is not deeper) changes nothing; the store's state is not
        started again as a trigger would start it.
        """
        stored = await self.throttles.triggerThrottle("dest", 1, "later", T0 + 30, 60)
        old = ThrottleState(1, T0 + 60, 60.0, "earlier")
        self.assertEqual(await self.throttles.replayThrottle("dest", old, T0 + 40), stored)
        over = ThrottleState(1, T0 + 10, 60.0, "over")
        self.assertIsNone(await self.throttles.replayThrottle("other", over, T0 + 40))
        self.assertEqual(await self.throttles.throttleStates(T0 + 40), {"dest": stored})

    async def test_replayDeeperWins(self):
        """
        A replayed state deeper and longer than the stored one replaces
        it, with its own times.
        """
        await self.throttles.triggerThrottle("dest", 0, "cluster", T0, 60)
        mine = ThrottleState(3, T0 + 70, 60.0, "mine")
        self.assertEqual(await self.throttles.replayThrottle("dest", mine, T0 + 20), mine)

    async def test_replayMergesDepthAndEnd(self):
        """
        Deeper now but over sooner than the stored state: the result has
        the deeper level now and the later end, so it is at least as deep
        as both at every moment and lasts no longer than the longer one.
        """
        # (With one cool-down and states from triggers the level now
        # follows from the end, so one always covers the other; a state
        # whose first step lies more than a cool-down ahead does not.)
        stored = ThrottleState(1, T0 + 300, 60.0, "cluster")
        await self.throttles.replayThrottle("dest", stored, T0 + 100)
        # Replayed: level 2 now (T0 + 110), over at T0 + 180.
        mine = ThrottleState(2, T0 + 120, 60.0, "mine")
        result = await self.throttles.replayThrottle("dest", mine, T0 + 110)
        self.assertEqual(result, ThrottleState(2, T0 + 240, 60.0, "cluster"))
        self.assertAlmostEqual(result.end, stored.end)
        for t in range(110, 320, 5):
            now = T0 + t
            self.assertGreaterEqual(
                result.levelAt(now), max(stored.levelAt(now), mine.levelAt(now)), t
            )
        self.assertEqual(result.levelAt(stored.end), 0)
        self.assertEqual(await self.throttles.throttleStates(T0 + 110), {"dest": result})

    def test_replayBadArguments(self):
        """
        Bad names, states and times fail with L{ValueError}.
        """
        good = ThrottleState(1, T0, 60.0, "r")
        bad = [
            ("", good, T0),
            ("dest", None, T0),
            ("dest", ThrottleState(0, T0, 60.0, "r"), T0),
            ("dest", ThrottleState(5, T0, 60.0, "r"), T0),
            ("dest", ThrottleState(1, T0, 0.0, "r"), T0),
            ("dest", ThrottleState(1, float("nan"), 60.0, "r"), T0),
            ("dest", good, None),
        ]
        for args in bad:
            self.failureResultOf(self.throttles.replayThrottle(*args), ValueError)

    def test_badArguments(self):
        """
        Bad names, levels, reasons, times and cool-downs fail with
        L{ValueError}; nothing is recorded.
        """
        bad = [
            ("", 0, "r", T0, 30),
            ("de st", 0, "r", T0, 30),
            ("dest", -1, "r", T0, 30),
            ("dest", 5, "r", T0, 30),
            ("dest", True, "r", T0, 30),
            ("dest", 0, b"r", T0, 30),
            ("dest", 0, "r", None, 30),
            ("dest", 0, "r", float("nan"), 30),
            ("dest", 0, "r", T0, 0),
        ]
        for args in bad:
            self.failureResultOf(self.throttles.triggerThrottle(*args), ValueError)
        self.failureResultOf(self.throttles.throttleStates(None), ValueError)

        async def nothing():
            self.assertEqual(await self.throttles.throttleStates(T0), {})

        return nothing()


class LocalThrottlesTests(ThrottlesContractMixin, TestCase):
    """
    L{LocalThrottles} fulfils the throttle contract.
    """

    def setUp(self):
        self.throttles = LocalThrottles()


class RedisThrottlesTests(ThrottlesContractMixin, TestCase):
    """
    L{RedisStore}, against a real C{redis-server}, fulfils the throttle
    contract.
    """

    def setUp(self):
        self.server = sharedRedisServer()
        self.throttles = RedisStore.fromURL(self.server.url(0), reactor, prefix=newPrefix())
        self.addCleanup(self.throttles.close)
        return self.throttles.start()

    async def test_keysExpire(self):
        """
        A state's key and the index expire a minute after its level would
        be 0, so Redis forgets a throttle whatever the nodes do.
        """
        await self.throttles.triggerThrottle("dest", 1, "x", T0, 30)
        for key in ("throttle:dest", "throttles"):
            reply = self.server.command("PTTL", self.throttles.prefix + key)
            pttl = int(reply.strip().lstrip(b":"))
            self.assertTrue(60000 + 50000 < pttl <= 60000 + 60000, (key, pttl))


class ThrottleBackendTests(SynchronousTestCase):
    """
    L{throttleBackend} picks the store where it is shared.
    """

    def test_localForMemory(self):
        """
        A store without L{IThrottles} gets a L{LocalThrottles}, not shared.
        """
        backend, shared = throttleBackend(MemoryStore())
        self.assertIsInstance(backend, LocalThrottles)
        self.assertFalse(shared)

    def test_redisIsShared(self):
        """
        The Redis store is its own, shared, back end.
        """
        store = RedisStore.fromURL("redis://127.0.0.1:1/0", Clock())
        self.assertEqual(throttleBackend(store), (store, True))


@implementer(IThrottles)
class FlakyThrottles:
    """
    An L{IThrottles} that cannot be reached while C{down}, else the shared
    L{LocalThrottles} C{local}.
    """

    def __init__(self, local):
        self.local = local
        self.down = False

    def triggerThrottle(self, *args):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return self.local.triggerThrottle(*args)

    def throttleStates(self, now):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return self.local.throttleStates(now)

    def replayThrottle(self, *args):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return self.local.replayThrottle(*args)


class TwoNodesTests(SynchronousTestCase):
    """
    Two L{ThrottleBoard}s on one back end and one fake clock: node A is
    told to slow down, node B follows, and they recover together.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        shared = LocalThrottles()
        self.backendA = FlakyThrottles(shared)
        self.backendB = FlakyThrottles(shared)
        self.a = ThrottleBoard(self.backendA, self.clock, cooldown=60.0, shared=True)
        self.b = ThrottleBoard(self.backendB, self.clock, cooldown=60.0, shared=True)
        self.changes = []
        self.ta = self.a.throttle("provider:google")
        self.tb = self.b.throttle(
            "provider:google", lambda: self.changes.append(self.clock.seconds())
        )
        self.a.startService()
        self.b.startService()
        self.addCleanup(self.a.stopService)
        self.addCleanup(self.b.stopService)

    def test_otherNodeFollowsWithinARefresh(self):
        """
        A's trigger halves B's budget at B's next read (within a second),
        with A's reason and cool-down, and tells B's listener once; the
        recovery is not told.
        """
        self.assertTrue(self.ta.trigger("421 4.7.0 try again later"))
        self.assertEqual((self.ta.factor, self.tb.factor), (0.5, 1.0))
        self.clock.advance(1.0)
        self.assertEqual(self.tb.factor, 0.5)
        self.assertEqual(self.tb.until, T0 + 60)
        self.assertEqual(self.tb.lastReason, "421 4.7.0 try again later")
        self.assertEqual(self.changes, [T0 + 1])
        self.clock.advance(1.0)
        self.assertEqual(self.changes, [T0 + 1])
        # Recovery is a matter of time: the reads that see it tell nobody.
        for _ in range(70):
            self.clock.advance(1.0)
        self.assertEqual((self.tb.factor, self.changes), (1.0, [T0 + 1]))

    def test_sharedRecoveryWithoutDoubleSteps(self):
        """
        Both nodes recover in the same steps at the same moments, however
        many times each notes a recovery.
        """
        self.ta.trigger("421")
        self.ta.trigger("421")
        self.clock.advance(1.0)
        seen = []
        for _ in range(200):
            self.clock.advance(1.0)
            self.ta.recover()
            self.tb.recover()
            self.ta.recover()
            seen.append((self.ta.factor, self.tb.factor))
        # seen[i] is at T0 + 2 + i; the steps are due at T0 + 60 and + 120.
        self.assertEqual(seen[0], (0.25, 0.25))
        self.assertEqual(seen[57], (0.25, 0.25))
        self.assertEqual(seen[58], (0.5, 0.5))
        self.assertEqual(seen[117], (0.5, 0.5))
        self.assertEqual(seen[118], (1.0, 1.0))
        self.assertTrue(all(fa == fb for fa, fb in seen))
        self.assertFalse(self.tb.throttled)

    def test_replyToAnOldBudgetDoesNotHalveAgain(self):
        """
        B, not yet told of A's throttle, gets a 421 too: the cluster keeps
        one halving (both replies answered the same budget), and B's own
        trigger applies on B at once.
        """
        self.ta.trigger("421 from A")
        self.tb.trigger("421 from B")
        self.assertEqual(self.tb.factor, 0.5)
        self.clock.advance(1.0)
        self.assertEqual((self.ta.factor, self.tb.factor), (0.5, 0.5))

    def test_newNodeGetsTheStateOfDestinationsItHasNotUsed(self):
        """
        A destination B has not sent to yet starts with the cluster's
        throttle as last read.
        """
        self.a.throttle("example.org").trigger("421")
        self.clock.advance(1.0)
        self.assertEqual(self.b.throttle("example.org").factor, 0.5)

    def test_unreachableStoreKeepsLocalThrottle(self):
        """
        While the store cannot be reached a node's own trigger applies on
        it (never less polite than alone), the cluster's last known state
        keeps recovering on its schedule, and the node says so once.
        """
        self.ta.trigger("421")
        self.clock.advance(1.0)
        self.backendB.down = True
        self.tb.trigger("421 during the outage")
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertFalse(self.b.reachable)
        self.assertEqual(self.tb.factor, 0.25)
        self.assertEqual(self.ta.factor, 0.5)
        self.clock.advance(120.0)
        self.assertEqual(self.tb.factor, 1.0)
        self.backendB.down = False
        self.clock.advance(1.0)
        self.assertTrue(self.b.reachable)

    def test_outageTriggerReachesTheOtherNode(self):
        """
        A trigger on B while the store is down is kept; once the store
        answers (B's next read) it is written, and A backs off too, until
        the moment B's own throttle ends: not a cool-down counted from the
        replay.  B says so in the log.
        """
        self.backendB.down = True
        self.clock.advance(10.0)
        self.tb.trigger("421 during the outage")
        self.tb.trigger("421 again")
        self.assertEqual(self.tb.factor, 0.25)
        self.assertEqual(set(self.b.unwritten()), {"provider:google"})
        self.assertEqual(self.b.state()["unwritten"], 1)
        self.clock.advance(20.0)
        self.assertEqual(self.ta.factor, 1.0)
        self.backendB.down = False
        self.clock.advance(1.0)
        self.assertEqual(self.b.unwritten(), {})
        self.clock.advance(1.0)
        self.assertEqual(self.ta.factor, 0.25)
        # B's own: level 2 until T0 + 70, over at T0 + 130.
        self.assertEqual(self.ta.until, T0 + 70)
        self.clock.advance(T0 + 129.5 - self.clock.seconds())
        self.assertEqual(self.ta.factor, 0.5)
        self.clock.advance(0.5)
        self.assertEqual(self.ta.factor, 1.0)

    def test_outageTriggerOverIsDropped(self):
        """
        A kept trigger whose throttle is over before the store answers is
        not written.
        """
        self.backendB.down = True
        self.tb.trigger("421")
        self.clock.advance(61.0)
        self.backendB.down = False
        self.clock.advance(1.0)
        self.assertEqual(self.b.unwritten(), {})
        self.assertEqual(self.successResultOf(self.backendA.throttleStates(T0 + 62)), {})

    def test_outageReplayDoesNotShortenTheCluster(self):
        """
        A's trigger, written after B's outage trigger and lasting longer,
        is not cut short by B's replay.
        """
        self.backendB.down = True
        self.tb.trigger("421 B")
        self.clock.advance(30.0)
        self.ta.trigger("421 A")
        self.ta.trigger("421 A")
        self.backendB.down = False
        self.clock.advance(1.0)
        states = self.successResultOf(self.backendA.throttleStates(self.clock.seconds()))
        self.assertEqual(states["provider:google"], ThrottleState(2, T0 + 90, 60.0, "421 A"))

    def test_writtenTriggerCoversKeptOnes(self):
        """
        A trigger written from the node after one that was kept covers it:
        the kept one is not written again.
        """
        self.backendB.down = True
        self.tb.trigger("kept")
        self.backendB.down = False
        self.clock.advance(0.5)
        self.tb.trigger("written")
        self.assertEqual(self.b.unwritten(), {})

    def test_storeDeeperThanLocal(self):
        """
        When the cluster's state is deeper than a node's own trigger, the
        node applies the cluster's.
        """
        self.ta.trigger("a")
        self.ta.trigger("a")
        self.ta.trigger("a")
        self.tb.trigger("b")
        self.assertEqual(self.tb.factor, 1 / 8)
        self.assertEqual(self.changes, [T0])

    def test_stopReading(self):
        """
        A stopped board reads no more.
        """
        self.b.stopService()
        self.ta.trigger("421")
        self.clock.advance(5.0)
        self.assertEqual(self.tb.factor, 1.0)


class OneNodeTests(SynchronousTestCase):
    """
    A board over L{LocalThrottles} (SQLite, memory) behaves as the
    per-destination throttle always did.
    """

    def setUp(self):
        self.clock = Clock()
        self.board = ThrottleBoard(LocalThrottles(), self.clock, cooldown=30.0)
        self.board.startService()
        self.throttle = self.board.throttle("dest")

    def test_halvesAndRecovers(self):
        """
        Each trigger halves down to 1/16; each cool-down doubles back.
        """
        factors = []
        for _ in range(5):
            self.throttle.trigger("421")
            factors.append(self.throttle.factor)
        self.assertEqual(factors, [0.5, 0.25, 0.125, 0.0625, 0.0625])
        self.assertEqual(self.throttle.until, 30.0)
        self.assertFalse(self.throttle.recover())
        steps = []
        for _ in range(4):
            self.clock.advance(30.0)
            steps.append((self.throttle.recover(), self.throttle.factor))
        self.assertEqual(steps, [(True, 0.125), (True, 0.25), (True, 0.5), (True, 1.0)])
        self.assertIsNone(self.throttle.until)
        self.assertIsNone(self.throttle.lastReason)

    def test_noTimers(self):
        """
        Alone, the board reads nothing periodically.
        """
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SchedulerNode:
    """
    A delivery scheduler whose throttles are kept on C{backend} with the
    other nodes' (its own spool, deliverer and board; a shared clock).
    """

    def __init__(self, clock, backend):
        self.clock = clock
        self.spool = FakeSpool()
        self.events = RecordingEvents()
        self.deliverer = FakeDeliverer()
        self.board = ThrottleBoard(backend, clock, cooldown=60.0, shared=True)
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=FakeRouter(table={"limited.test": ["mx.limited.test"]}),
            connector=self.deliverer,
            events=self.events,
            clock=clock,
            retry=Delays((60, 300, 900)),
            maxAge=3600.0,
            maxConnections=20,
            policy=DestinationPolicy(domains={"limited.test": {"maxConnections": 4}}),
            throttleCooldown=60.0,
            throttles=self.board,
        )
        self.board.startService()
        self.scheduler.startService()

    def add(self, queue_id, recipients):
        entry = makeEntry(queue_id, recipients, received=self.clock.seconds())
        self.spool.add(entry, b"message " + queue_id.encode())
        self.scheduler.enqueue(entry)
        return entry

    def limit(self):
        [state] = [d for d in self.scheduler.destinations() if d["destination"] == "limited.test"]
        return state["max_connections"], state["throttle_factor"]

    def stop(self):
        self.scheduler.stopService()
        self.board.stopService()


class SchedulerTests(SynchronousTestCase):
    """
    Two delivery schedulers sharing their throttles: a 421 on node A slows
    node B down, and both recover together.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        backend = LocalThrottles()
        self.a = SchedulerNode(self.clock, backend)
        self.b = SchedulerNode(self.clock, backend)
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)

    def test_421OnANodeSlowsTheOther(self):
        """
        After a 421 on A, B opens at most half the destination's sessions
        within a second, and both have the whole limit back one cool-down
        later, at the same moment.
        """
        self.b.add("B0", ["first@limited.test"])
        self.clock.advance(0)
        self.b.deliverer.pending()[0].answer(250, "ok")
        self.assertEqual(self.b.limit(), (4, 1.0))
        self.a.add("A0", ["x@limited.test"])
        self.clock.advance(0)
        self.a.deliverer.pending()[0].answer(421, "try again later", "4.7.0")
        self.assertEqual(self.a.limit(), (2, 0.5))
        self.clock.advance(1.0)
        self.assertEqual(self.b.limit(), (2, 0.5))
        for i in range(10):
            self.b.add(f"B{i + 1}", [f"r{i}@limited.test"])
        self.clock.advance(0)
        self.assertEqual(len(self.b.deliverer.pending()), 2)
        self.clock.advance(58.0)
        self.assertEqual((self.a.limit(), self.b.limit()), ((2, 0.5), (2, 0.5)))
        self.clock.advance(1.0)
        self.assertEqual((self.a.limit(), self.b.limit()), ((4, 1.0), (4, 1.0)))
        # B's recovery pumped its queue: the whole limit is in use.
        self.assertEqual(len(self.b.deliverer.pending()), 4)
