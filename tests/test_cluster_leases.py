"""
Tests for L{smartrelay.cluster.leases} and L{smartrelay.cluster.nodes}:
one L{ILeases} contract run against L{LocalLeases} (its own buckets, a
L{MemoryStore}'s, a L{SQLiteStore}'s in its thread) and a real
C{redis-server}, and the L{LeaseKeeper} and L{NodeRegistry} on a fake
clock.
"""

from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartrelay.cluster.leases import (
    LeaseKeeper,
    LocalLeases,
    leaseBackend,
)
from smartrelay.cluster.nodes import NODES, NodeRegistry
from smartrelay.store.interfaces import ILeases, LeaseGrant, SlotAndTokenGrant
from smartrelay.store.memory import MemoryStore
from smartrelay.store.redis import RedisStore
from smartrelay.store.sqlite import SQLiteStore
from tests.redisserver import sharedRedisServer
from tests.test_store_redis import newPrefix

T0 = 1_800_000_000.0


class LeasesContractMixin:
    """
    What every L{ILeases} does; C{self.leases} is the one under test.
    Every test returns a Deferred (the Redis one answers later).
    """

    def test_providesInterface(self):
        """
        The back end provides L{ILeases}.
        """
        self.assertTrue(verifyObject(ILeases, self.leases))

    async def test_grantsUpToTheLimit(self):
        """
        Leases are granted while fewer than C{limit} are live, then refused
        with the wait until the earliest expiry.
        """
        a = await self.leases.acquireLease("dest", "a", 2, T0, 30)
        b = await self.leases.acquireLease("dest", "b", 2, T0 + 1, 30)
        c = await self.leases.acquireLease("dest", "c", 2, T0 + 2, 30)
        self.assertEqual(a, LeaseGrant(True, 1, 0.0))
        self.assertEqual(b, LeaseGrant(True, 2, 0.0))
        self.assertEqual((c.granted, c.held), (False, 2))
        self.assertAlmostEqual(c.retry_after, 28.0)
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 2), ["a", "b"])

    async def test_resourcesAreApart(self):
        """
        A full resource does not limit another one.
        """
        await self.leases.acquireLease("one", "a", 1, T0, 30)
        other = await self.leases.acquireLease("two", "b", 1, T0, 30)
        self.assertTrue(other.granted)

    async def test_expiredLeasesFreeTheirSlots(self):
        """
        A lease not renewed is dead at C{now + ttl}: its slot can be taken.
        """
        await self.leases.acquireLease("dest", "dead", 1, T0, 30)
        early = await self.leases.acquireLease("dest", "new", 1, T0 + 29.9, 30)
        late = await self.leases.acquireLease("dest", "new", 1, T0 + 30, 30)
        self.assertFalse(early.granted)
        self.assertTrue(late.granted)
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 30), ["new"])

    async def test_renewKeepsALeaseAlive(self):
        """
        A renewed lease lives C{ttl} seconds from the renewal.
        """
        await self.leases.acquireLease("dest", "a", 1, T0, 30)
        lost = await self.leases.renewLeases([("dest", "a")], T0 + 20, 30)
        self.assertEqual(lost, [])
        refused = await self.leases.acquireLease("dest", "b", 1, T0 + 45, 30)
        self.assertFalse(refused.granted)
        self.assertAlmostEqual(refused.retry_after, 5.0)
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 49), ["a"])
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 50), [])

    async def test_renewReportsLostLeases(self):
        """
        Renewing leases that expired or were released reports them, in the
        order given, and does not bring them back.
        """
        await self.leases.acquireLease("d1", "a", 5, T0, 10)
        await self.leases.acquireLease("d2", "b", 5, T0 + 5, 10)
        await self.leases.acquireLease("d2", "c", 5, T0 + 5, 10)
        await self.leases.releaseLease("d2", "c")
        lost = await self.leases.renewLeases(
            [("d2", "c"), ("d1", "a"), ("d2", "b"), ("d3", "never")], T0 + 12, 10
        )
        self.assertEqual(lost, [("d2", "c"), ("d1", "a"), ("d3", "never")])
        self.assertEqual(await self.leases.liveLeases("d1", T0 + 12), [])
        self.assertEqual(await self.leases.liveLeases("d2", T0 + 12), ["b"])

    async def test_renewNothing(self):
        """
        Renewing an empty list loses nothing.
        """
        self.assertEqual(await self.leases.renewLeases([], T0, 30), [])

    async def test_releaseFreesTheSlot(self):
        """
        A released lease's slot is free at once; releasing twice, or a
        lease never held, changes nothing.
        """
        await self.leases.acquireLease("dest", "a", 1, T0, 30)
        await self.leases.releaseLease("dest", "a")
        await self.leases.releaseLease("dest", "a")
        await self.leases.releaseLease("dest", "nobody")
        again = await self.leases.acquireLease("dest", "b", 1, T0 + 1, 30)
        self.assertTrue(again.granted)

    async def test_acquireHeldLeaseRenewsIt(self):
        """
        Taking a lease already held renews it, even at the limit.
        """
        await self.leases.acquireLease("dest", "a", 1, T0, 30)
        grant = await self.leases.acquireLease("dest", "a", 1, T0 + 20, 30)
        self.assertEqual(grant, LeaseGrant(True, 1, 0.0))
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 40), ["a"])

    async def test_lowerLimitRefusesNewOnly(self):
        """
        A limit lower than the leases held (a throttled destination) keeps
        them but grants no new one until enough are gone.
        """
        for name in "abc":
            await self.leases.acquireLease("dest", name, 3, T0, 30)
        refused = await self.leases.acquireLease("dest", "d", 2, T0, 30)
        self.assertFalse(refused.granted)
        await self.leases.releaseLease("dest", "a")
        still = await self.leases.acquireLease("dest", "d", 2, T0, 30)
        self.assertFalse(still.granted)
        await self.leases.releaseLease("dest", "b")
        self.assertTrue((await self.leases.acquireLease("dest", "d", 2, T0, 30)).granted)

    async def test_fractionalTimes(self):
        """
        Times and TTLs keep their fractions.
        """
        await self.leases.acquireLease("dest", "a", 1, T0 + 0.25, 0.5)
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 0.74), ["a"])
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 0.75), [])

    async def test_unicodeNames(self):
        """
        Resource and lease names are text: an IDN destination works.
        """
        grant = await self.leases.acquireLease("bücher.example", "nöde/1", 1, T0, 30)
        self.assertTrue(grant.granted)
        self.assertEqual(await self.leases.liveLeases("bücher.example", T0), ["nöde/1"])

    # -- a lease and a token together (acquireLeaseAndTokens) ----------------

    def both(self, lease, now, limit=1, ttl=30, rate=1.0, burst=2.0, resource="dest", key="rate:dest"):
        return self.leases.acquireLeaseAndTokens(
            resource, lease, limit, now, ttl, key, rate, burst
        )

    def tokens(self, now, rate=1.0, burst=2.0, key="rate:dest"):
        """
        Take the whole burst of C{key} at C{now}: allowed only if the
        bucket is full.
        """
        return self.tokenStore.takeTokens(key, rate, burst, now, burst)

    async def test_bothGranted(self):
        """
        A free slot and a token: both are taken in one call; the lease is
        live and the bucket one token lighter (the same bucket as
        C{takeTokens}).
        """
        grant = await self.both("a", T0, limit=2)
        self.assertEqual(grant, SlotAndTokenGrant(True, None, 1, 0.0, 1.0))
        self.assertEqual(await self.leases.liveLeases("dest", T0), ["a"])
        second = await self.both("b", T0, limit=2)
        self.assertEqual(second, SlotAndTokenGrant(True, None, 2, 0.0, 0.0))
        taken = await self.tokenStore.takeTokens("rate:dest", 1.0, 2.0, T0)
        self.assertFalse(taken.allowed)
        self.assertAlmostEqual(taken.retry_after, 1.0)

    async def test_slotFullTakesNoToken(self):
        """
        With every slot held by others the answer says the slot is missing,
        with the wait until the earliest lease expires, and no token is
        taken.
        """
        await self.leases.acquireLease("dest", "other", 1, T0, 30)
        grant = await self.both("a", T0 + 10)
        self.assertEqual((grant.granted, grant.missing, grant.held), (False, "slot", 1))
        self.assertAlmostEqual(grant.retry_after, 20.0)
        self.assertIsNone(grant.remaining)
        full = await self.tokens(T0 + 10)
        self.assertTrue(full.allowed, full)
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 10), ["other"])

    async def test_noTokenTakesNoSlot(self):
        """
        An empty bucket: the answer says the token is missing and when the
        bucket holds one, and no lease is taken.
        """
        await self.tokenStore.takeTokens("rate:dest", 1.0, 2.0, T0, 2)
        grant = await self.both("a", T0 + 0.25, limit=3)
        self.assertEqual((grant.granted, grant.missing, grant.held), (False, "token", 0))
        self.assertAlmostEqual(grant.retry_after, 0.75)
        self.assertAlmostEqual(grant.remaining, 0.25)
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 0.25), [])
        later = await self.both("a", T0 + 1, limit=3)
        self.assertTrue(later.granted)
        self.assertAlmostEqual(later.remaining, 0.0)

    async def test_bothRefusedIsSlot(self):
        """
        No slot and no token: the slot is what is reported missing (the
        bucket is not looked at).
        """
        await self.leases.acquireLease("dest", "other", 1, T0, 30)
        await self.tokenStore.takeTokens("rate:dest", 1.0, 2.0, T0, 2)
        grant = await self.both("a", T0)
        self.assertEqual(grant.missing, "slot")

    async def test_bothLeaseExpires(self):
        """
        A lease taken with a token lives C{ttl} seconds unless renewed,
        like any other, and can be renewed and released.
        """
        await self.both("a", T0, ttl=10)
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 9.9), ["a"])
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 10), [])
        again = await self.both("b", T0 + 10, ttl=10)
        self.assertTrue(again.granted)
        self.assertEqual(await self.leases.renewLeases([("dest", "b")], T0 + 15, 10), [])
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 24), ["b"])
        await self.leases.releaseLease("dest", "b")
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 16), [])

    async def test_bothHeldLeaseRenews(self):
        """
        Taking a lease already held (at the limit) with a token renews it
        and takes the token.
        """
        await self.both("a", T0, ttl=10)
        grant = await self.both("a", T0 + 5, ttl=10)
        self.assertEqual(grant, SlotAndTokenGrant(True, None, 1, 0.0, 1.0))
        self.assertEqual(await self.leases.liveLeases("dest", T0 + 14), ["a"])

    def test_bothBadArguments(self):
        """
        Bad lease or bucket arguments fail with L{ValueError}; nothing is
        taken.
        """
        bad = [
            ("", "a", 1, T0, 30, "k", 1.0, 1.0, 1),
            ("dest", "a", 0, T0, 30, "k", 1.0, 1.0, 1),
            ("dest", "a", 1, T0, 0, "k", 1.0, 1.0, 1),
            ("dest", "a", 1, None, 30, "k", 1.0, 1.0, 1),
            ("dest", "a", 1, T0, 30, "", 1.0, 1.0, 1),
            ("dest", "a", 1, T0, 30, "k", 0, 1.0, 1),
            ("dest", "a", 1, T0, 30, "k", 1.0, 1.0, 2),
        ]
        for args in bad:
            self.failureResultOf(self.leases.acquireLeaseAndTokens(*args), ValueError)

        async def nothingTaken():
            self.assertEqual(await self.leases.liveLeases("dest", T0), [])

        return nothingTaken()

    def test_badArguments(self):
        """
        Bad names, limits, times and TTLs fail with L{ValueError}; nothing
        is taken.
        """
        bad = [
            ("", "a", 1, T0, 30),
            ("dest", "", 1, T0, 30),
            ("de st", "a", 1, T0, 30),
            ("dest", "a\n", 1, T0, 30),
            ("x" * 201, "a", 1, T0, 30),
            (None, "a", 1, T0, 30),
            ("dest", "a", 0, T0, 30),
            ("dest", "a", 1.5, T0, 30),
            ("dest", "a", True, T0, 30),
            ("dest", "a", 1, float("nan"), 30),
            ("dest", "a", 1, None, 30),
            ("dest", "a", 1, "now", 30),
            ("dest", "a", 1, T0, 0),
            ("dest", "a", 1, T0, -1),
            ("dest", "a", 1, T0, float("inf")),
        ]
        for args in bad:
            self.failureResultOf(self.leases.acquireLease(*args), ValueError)
        self.failureResultOf(self.leases.renewLeases([("dest", "")], T0, 30), ValueError)
        self.failureResultOf(self.leases.renewLeases([("dest", "a")], T0, 0), ValueError)
        self.failureResultOf(self.leases.releaseLease("", "a"), ValueError)
        self.failureResultOf(self.leases.liveLeases("dest", None), ValueError)

        async def nothingTaken():
            self.assertEqual(await self.leases.liveLeases("dest", T0), [])

        return nothingTaken()


class _OwnBuckets:
    """
    The buckets of a L{LocalLeases} without a store, seen as C{takeTokens}.
    """

    def __init__(self, leases):
        self.leases = leases

    def takeTokens(self, key, rate, burst, now, count=1):
        from smartrelay.store.interfaces import takeFromBucket

        state, result = takeFromBucket(self.leases._buckets.get(key), rate, burst, now, count)
        self.leases._buckets[key] = state
        return succeed(result)


class LocalLeasesTests(LeasesContractMixin, TestCase):
    """
    L{LocalLeases} with its own buckets fulfils the lease contract.
    """

    def setUp(self):
        self.leases = LocalLeases()
        self.tokenStore = _OwnBuckets(self.leases)


class LocalLeasesMemoryTests(LeasesContractMixin, TestCase):
    """
    L{LocalLeases} over a L{MemoryStore}'s buckets (what L{leaseBackend}
    gives the memory store) fulfils the lease contract.
    """

    def setUp(self):
        self.tokenStore = MemoryStore()
        self.leases = leaseBackend(self.tokenStore)[0]


class LocalLeasesSQLiteTests(LeasesContractMixin, TestCase):
    """
    L{LocalLeases} over a L{SQLiteStore}'s buckets, in its own thread (the
    tokens answer later), fulfils the lease contract.
    """

    def setUp(self):
        self.tokenStore, _ = SQLiteStore.inThreadPool(self.mktemp(), reactor)
        self.addCleanup(self.tokenStore.close)
        self.leases = leaseBackend(self.tokenStore)[0]
        return self.tokenStore.start()

    async def test_slotHeldWhileTheTokenIsAsked(self):
        """
        While the store is asked for the token the slot is held: a second
        caller at the limit is refused, and gets it once the first one's
        token is refused.
        """
        await self.tokenStore.takeTokens("rate:dest", 1.0, 2.0, T0, 2)
        first = self.both("a", T0)
        second = self.both("b", T0)
        self.assertEqual(self.successResultOf(second).missing, "slot")
        self.assertEqual((await first).missing, "token")
        self.assertEqual(await self.leases.liveLeases("dest", T0), [])


class RedisLeasesTests(LeasesContractMixin, TestCase):
    """
    L{RedisStore}, against a real C{redis-server}, fulfils the lease
    contract.
    """

    def setUp(self):
        self.server = sharedRedisServer()
        self.leases = RedisStore.fromURL(self.server.url(0), reactor, prefix=newPrefix())
        self.tokenStore = self.leases
        self.addCleanup(self.leases.close)
        return self.leases.start()

    async def test_keysExpire(self):
        """
        A lease set gets a Redis TTL a minute past its longest lease, so
        Redis forgets sets nobody uses.
        """
        await self.leases.acquireLease("dest", "a", 1, T0, 30)
        reply = self.server.command("PTTL", self.leases.prefix + "lease:dest")
        pttl = int(reply.strip().lstrip(b":"))
        self.assertTrue(60000 < pttl <= 90000, pttl)


class LeaseBackendTests(SynchronousTestCase):
    """
    L{leaseBackend} picks the store where it is shared.
    """

    def test_localForMemory(self):
        """
        A store without L{ILeases} gets a L{LocalLeases}, not shared.
        """
        backend, shared = leaseBackend(MemoryStore())
        self.assertIsInstance(backend, LocalLeases)
        self.assertFalse(shared)

    def test_redisIsShared(self):
        """
        The Redis store is its own, shared, back end.
        """
        store = RedisStore.fromURL("redis://127.0.0.1:1/0", Clock())
        self.assertEqual(leaseBackend(store), (store, True))


@implementer(ILeases)
class UnreachableLeases:
    """
    An L{ILeases} whose store cannot be reached (while C{down}), else a
    L{LocalLeases}.
    """

    def __init__(self):
        self.local = LocalLeases()
        self.down = False
        self.calls = 0

    def _call(self, name, *args):
        self.calls += 1
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return getattr(self.local, name)(*args)

    def acquireLease(self, resource, lease, limit, now, ttl):
        return self._call("acquireLease", resource, lease, limit, now, ttl)

    def renewLeases(self, leases, now, ttl):
        return self._call("renewLeases", leases, now, ttl)

    def acquireLeaseAndTokens(self, resource, lease, limit, now, ttl, key, rate, burst, count=1):
        return self._call(
            "acquireLeaseAndTokens", resource, lease, limit, now, ttl, key, rate, burst, count
        )

    def releaseLease(self, resource, lease):
        return self._call("releaseLease", resource, lease)

    def liveLeases(self, resource, now):
        return self._call("liveLeases", resource, now)


class FixedNodes:
    """
    A node registry that always counts C{n}.
    """

    def __init__(self, n):
        self.n = n

    def count(self):
        return self.n


class LeaseKeeperTests(SynchronousTestCase):
    """
    L{LeaseKeeper} on a fake clock.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.backend = UnreachableLeases()
        self.keeper = LeaseKeeper(
            self.backend, self.clock, holder="n1", shared=True, ttl=30, nodes=FixedNodes(2)
        )
        self.keeper.startService()
        self.addCleanup(self.keeper.stopService)

    def acquire(self, resource="dest", limit=2):
        return self.successResultOf(self.keeper.acquire(resource, limit))

    def test_fakeProvidesInterface(self):
        """
        The test's unreachable back end provides L{ILeases}.
        """
        self.assertTrue(verifyObject(ILeases, self.backend))

    def test_acquireAndRelease(self):
        """
        Slots are granted up to the limit, refused after with a short wait,
        and free again once released.
        """
        a, b, c = self.acquire(), self.acquire(), self.acquire()
        self.assertTrue(a.lease.shared and b.lease.shared)
        self.assertIsNone(c.lease)
        self.assertTrue(0 < c.retryAfter <= self.keeper.pollInterval)
        self.assertEqual(self.keeper.heldBy("dest"), 2)
        a.lease.release()
        a.lease.release()
        self.assertEqual(self.keeper.heldBy("dest"), 1)
        self.assertIsNotNone(self.acquire().lease)

    def test_renewedWhileHeld(self):
        """
        A held lease is renewed each C{ttl / 3}: it outlives its first TTL
        in the store.
        """
        lease = self.acquire().lease
        for _ in range(10):
            self.clock.advance(10)
        self.assertFalse(lease.lost)
        live = self.successResultOf(self.backend.local.liveLeases("dest", self.clock.seconds()))
        self.assertEqual(live, [lease.name])

    def test_deadHolderSlotsReturn(self):
        """
        The leases of a keeper that stops renewing (its node died) free
        their slots within the TTL for another keeper.
        """
        other = LeaseKeeper(self.backend, self.clock, holder="n2", shared=True, ttl=30)
        self.acquire(), self.acquire()
        self.keeper.stopService()
        self.assertIsNone(self.successResultOf(other.acquire("dest", 2)).lease)
        self.clock.advance(29)
        self.assertIsNone(self.successResultOf(other.acquire("dest", 2)).lease)
        self.clock.advance(1)
        self.assertIsNotNone(self.successResultOf(other.acquire("dest", 2)).lease)

    def test_fallbackShareWhileUnreachable(self):
        """
        While the store cannot be reached a node grants itself C{limit / N}
        slots per destination (at least one), never more, and says so.
        """
        self.backend.down = True
        first = self.acquire(limit=4)
        second = self.acquire(limit=4)
        third = self.acquire(limit=4)
        self.assertFalse(first.lease.shared)
        self.assertIsNotNone(second.lease)
        self.assertIsNone(third.lease)
        self.assertFalse(self.keeper.reachable)
        self.assertEqual(self.keeper.state()["held_locally"], 2)
        self.assertIsNotNone(self.acquire(resource="one", limit=1).lease)
        self.assertIsNone(self.acquire(resource="one", limit=1).lease)
        warnings = [e for e in self.flushLoggedErrors()]
        self.assertEqual(warnings, [])

    def test_leaseLostAfterTTLUnrenewed(self):
        """
        A shared lease not renewed for a whole TTL (the store down) is
        marked lost: the store may have given its slot to another node.
        """
        lease = self.acquire().lease
        self.backend.down = True
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertFalse(lease.lost)
        self.clock.advance(10)
        self.assertTrue(lease.lost)

    def test_localGrantsEndWhenStoreReturns(self):
        """
        Slots granted while the store was down are marked lost at the first
        renewal that reaches it again, and the node is reachable again.
        """
        self.backend.down = True
        lease = self.acquire().lease
        self.backend.down = False
        self.clock.advance(10)
        self.assertTrue(lease.lost)
        self.assertTrue(self.keeper.reachable)
        lease.release()
        self.assertEqual(self.keeper.state()["held"], 0)

    def test_reachableAgainWithoutLeases(self):
        """
        A node that holds no slot says the store answers again at its next
        renewal time (C{/metrics} smartrelay_store_unreachable back to 0),
        without waiting for a session to need a slot.
        """
        self.backend.down = True
        self.acquire().lease.release()
        self.assertFalse(self.keeper.reachable)
        self.clock.advance(10)
        self.assertFalse(self.keeper.reachable)
        self.backend.down = False
        self.clock.advance(10)
        self.assertTrue(self.keeper.reachable)

    def test_releaseWhileDownIsHarmless(self):
        """
        Releasing while the store is down forgets the lease locally (it
        expires in the store by itself).
        """
        lease = self.acquire().lease
        self.backend.down = True
        lease.release()
        self.assertEqual(self.keeper.heldBy("dest"), 0)

    def test_fallbackLimit(self):
        """
        The share is the limit divided by the live nodes, rounded down, at
        least one.
        """
        self.assertEqual(self.keeper.fallbackLimit(10), 5)
        self.assertEqual(self.keeper.fallbackLimit(3), 1)
        self.assertEqual(self.keeper.fallbackLimit(1), 1)
        alone = LeaseKeeper(self.backend, self.clock)
        self.assertEqual(alone.fallbackLimit(10), 10)

    def test_badArgumentsFail(self):
        """
        A bad limit is a L{ValueError}, not a fallback grant.
        """
        self.failureResultOf(self.keeper.acquire("dest", 0), ValueError)
        self.failureResultOf(
            self.keeper.acquireWithToken("dest", 0, "rate:dest", 1.0, 1.0), ValueError
        )
        self.failureResultOf(
            self.keeper.acquireWithToken("dest", 1, "rate:dest", -1.0, 1.0), ValueError
        )
        self.backend.down = True
        self.failureResultOf(
            self.keeper.acquireWithToken("dest", 0, "rate:dest", 1.0, 1.0), ValueError
        )

    def withToken(self, resource="dest", limit=2, rate=1.0, burst=2.0):
        return self.successResultOf(
            self.keeper.acquireWithToken(resource, limit, "rate:" + resource, rate, burst)
        )

    def test_withTokenGranted(self):
        """
        C{acquireWithToken} gives a shared lease, renewed and released like
        the others, and takes the token from the store's bucket.
        """
        a = self.withToken()
        self.assertTrue(a.lease.shared)
        self.assertIsNone(a.missing)
        self.assertEqual(self.keeper.heldBy("dest"), 1)
        for _ in range(4):
            self.clock.advance(10)
        self.assertFalse(a.lease.lost)
        a.lease.release()
        self.assertEqual(self.keeper.heldBy("dest"), 0)
        self.assertEqual(self.successResultOf(self.backend.local.liveLeases("dest", T0 + 40)), [])
        bucket = self.backend.local._buckets["rate:dest"]
        self.assertEqual(bucket, (1.0, T0))

    def test_withTokenRefused(self):
        """
        No slot: missing C{"slot"}, asked again within the poll interval.
        No token: missing C{"token"}, asked again when the bucket holds one;
        neither refusal leaves a lease held.
        """
        self.withToken(limit=1)
        slot = self.withToken(limit=1)
        self.assertEqual(slot.missing, "slot")
        self.assertIsNone(slot.lease)
        self.assertTrue(0 < slot.retryAfter <= self.keeper.pollInterval)
        self.withToken(resource="r", limit=5, rate=0.5, burst=1.0)
        token = self.withToken(resource="r", limit=5, rate=0.5, burst=1.0)
        self.assertEqual(token.missing, "token")
        self.assertAlmostEqual(token.retryAfter, 2.0)
        self.assertEqual(self.keeper.heldBy("r"), 1)

    def test_withTokenFallback(self):
        """
        While the store cannot be reached C{acquireWithToken} grants local
        slots up to C{limit / N} and tokens at C{rate / N} (a bucket of
        C{burst / N}, at least one), both or neither, and says the store
        answers again on the next call that reaches it.
        """
        self.backend.down = True
        first = self.withToken(limit=4, rate=2.0, burst=2.0)
        self.assertFalse(first.lease.shared)
        self.assertFalse(self.keeper.reachable)
        # N = 2: a bucket of one token refilling at one a second.
        noToken = self.withToken(limit=4, rate=2.0, burst=2.0)
        self.assertEqual(noToken.missing, "token")
        self.assertAlmostEqual(noToken.retryAfter, 1.0)
        self.assertEqual(self.keeper.heldBy("dest"), 1)
        self.clock.advance(1)
        second = self.withToken(limit=4, rate=2.0, burst=2.0)
        self.assertIsNotNone(second.lease)
        self.clock.advance(5)
        noSlot = self.withToken(limit=4, rate=2.0, burst=2.0)
        self.assertEqual(noSlot.missing, "slot")
        # The refused slot took no token: one is there after the release.
        second.lease.release()
        self.assertIsNotNone(self.withToken(limit=4, rate=2.0, burst=2.0).lease)
        self.assertEqual(self.keeper.fallbackGrants, 3)
        self.backend.down = False
        shared = self.withToken(resource="other", limit=4, rate=2.0, burst=2.0)
        self.assertTrue(shared.lease.shared)
        self.assertTrue(self.keeper.reachable)


class NodeRegistryTests(SynchronousTestCase):
    """
    L{NodeRegistry} on a fake clock.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.backend = UnreachableLeases()

    def registry(self, name):
        registry = NodeRegistry(self.backend, self.clock, name, ttl=30)
        registry.startService()
        return registry

    def test_countsLiveNodes(self):
        """
        Nodes that heartbeat are counted; one that stops is gone within the
        TTL; one that stops cleanly leaves at once.
        """
        a, b, c = self.registry("a"), self.registry("b"), self.registry("c")
        self.clock.advance(10)
        self.assertEqual([r.count() for r in (a, b, c)], [3, 3, 3])
        self.successResultOf(c.stopService())
        b._beat.stop()
        self.clock.advance(10)
        self.assertEqual(a.count(), 2)
        self.clock.advance(20)
        self.assertEqual(a.count(), 1)
        self.successResultOf(a.stopService())
        self.assertEqual(
            self.successResultOf(self.backend.local.liveLeases(NODES, self.clock.seconds())), []
        )

    def test_keepsLastCountWhileDown(self):
        """
        While the store cannot be reached the last count stays.
        """
        a, b = self.registry("a"), self.registry("b")
        self.clock.advance(10)
        self.backend.down = True
        self.clock.advance(60)
        self.assertEqual(a.count(), 2)
        self.assertEqual(a.seen, T0 + 10)
        self.backend.down = False
        a.stopService(), b.stopService()

    def test_atLeastOne(self):
        """
        Before the first heartbeat answers the count is one.
        """
        self.backend.down = True
        registry = self.registry("a")
        self.assertEqual(registry.count(), 1)
        registry.stopService()
