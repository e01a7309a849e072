"""
Connection-slot leases: a connection limit that holds across every node
sharing the store.

Before the delivery scheduler opens a session to a destination it takes a
lease on the destination's key (C{"limited.test"}, C{"provider:google"},
C{"relay:..."}) through a L{LeaseKeeper}; the lease is given back when the
session ends.  The keeper renews every lease it holds each C{ttl / 3}
seconds, so a lease lives as long as its node does: the slots of a node
that died (C{kill -9}, a lost network) come back within C{ttl} seconds.

The atomic part is the store's (L{ILeases}): one Lua script per operation
on Redis (L{smartrelay.store.redis}), L{LocalLeases} in this process for
the SQLite and memory stores, which serve one node.  Both pass the one
contract suite in C{tests/test_cluster_leases.py}.

When the store cannot be reached a node does not stop delivering, and does
not deliver without limit either: it grants itself at most C{limit / N}
sessions per destination (at least one), C{N} being the live nodes the
registry (L{smartrelay.cluster.nodes}) last saw, and says so in the log and
in C{/metrics}.

A new session on a rate-limited destination needs a slot and a rate token:
L{LeaseKeeper.acquireWithToken} takes both in one call to the store (one
Lua script on Redis, L{ILeases.acquireLeaseAndTokens}; the token from the
same bucket as the store's C{takeTokens}), both or neither, and while the
store cannot be reached grants C{limit / N} slots and tokens from a bucket
of its own at C{rate / N}.
"""

import os
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.store.interfaces import (
    ILeases,
    LeaseGrant,
    SlotAndTokenGrant,
    checkLeaseAndTokenArguments,
    checkLeaseArguments,
    checkLeaseName,
    checkLeasePairs,
    checkTime,
    takeFromBucket,
)

__all__ = ["LocalLeases", "Lease", "Acquired", "LeaseKeeper", "leaseBackend"]

#: The default lease lifetime: a dead node's slots are back this soon.
DEFAULT_TTL = 30.0

#: How long a node refused a slot waits at most before asking again (a live
#: holder gives its slot back without telling the others).
POLL_INTERVAL = 0.5


def _now(now: Any) -> float:
    now = checkTime("now", now)
    if now is None:
        raise ValueError("now must be POSIX seconds, not None")
    return now


@implementer(ILeases)
@attrs.define
class LocalLeases:
    """
    L{ILeases} in this process: the leases of one node (the SQLite and
    memory stores).  Every Deferred has fired when it is returned, except
    C{acquireLeaseAndTokens} over a store whose C{takeTokens} answers
    later (SQLite's writer thread).

    @ivar tokens: what C{acquireLeaseAndTokens} takes tokens from: the
        store (C{takeTokens}, the buckets the scheduler's other tokens come
        from), or L{None} for buckets kept here.
    """

    tokens: Any = None
    _leases: dict = attrs.field(factory=dict, init=False)
    _buckets: dict = attrs.field(factory=dict, init=False)

    def _live(self, resource: str, now: float) -> dict:
        held = self._leases.get(resource, {})
        for name in [n for n, expiry in held.items() if expiry <= now]:
            del held[name]
        return held

    def acquireLease(self, resource, lease, limit, now, ttl) -> Deferred:
        return maybeDeferred(self._acquire, resource, lease, limit, now, ttl)

    def _acquire(self, resource, lease, limit, now, ttl) -> LeaseGrant:
        resource, lease, limit, now, ttl = checkLeaseArguments(resource, lease, limit, now, ttl)
        held = self._live(resource, now)
        if lease in held or len(held) < limit:
            held[lease] = now + ttl
            self._leases[resource] = held
            return LeaseGrant(True, len(held), 0.0)
        return LeaseGrant(False, len(held), min(held.values()) - now)

    def acquireLeaseAndTokens(
        self, resource, lease, limit, now, ttl, key, rate, burst, count=1
    ) -> Deferred:
        try:
            resource, lease, limit, now, ttl, key, rate, burst, count = (
                checkLeaseAndTokenArguments(
                    resource, lease, limit, now, ttl, key, rate, burst, count
                )
            )
        except ValueError:
            return fail()
        held = self._live(resource, now)
        if lease not in held and len(held) >= limit:
            return succeed(
                SlotAndTokenGrant(False, "slot", len(held), min(held.values()) - now, None)
            )
        if self.tokens is None:
            state, result = takeFromBucket(self._buckets.get(key), rate, burst, now, count)
            if not result.allowed:
                return succeed(
                    SlotAndTokenGrant(False, "token", len(held), result.retry_after, result.remaining)
                )
            self._buckets[key] = state
            held[lease] = now + ttl
            self._leases[resource] = held
            return succeed(SlotAndTokenGrant(True, None, len(held), 0.0, result.remaining))
        # The bucket is the store's and may answer later: hold the slot
        # meanwhile (nobody else gets it), give it back if no token.
        previous = held.get(lease)
        reserved = held[lease] = now + ttl
        self._leases[resource] = held

        def undo() -> None:
            current = self._leases.get(resource)
            if current is None or current.get(lease) != reserved:
                return
            if previous is None:
                del current[lease]
                if not current:
                    del self._leases[resource]
            else:
                current[lease] = previous

        def answered(result) -> SlotAndTokenGrant:
            if not result.allowed:
                undo()
                return SlotAndTokenGrant(
                    False,
                    "token",
                    len(self._live(resource, now)),
                    result.retry_after,
                    result.remaining,
                )
            return SlotAndTokenGrant(
                True, None, len(self._live(resource, now)), 0.0, result.remaining
            )

        def failed(failure):
            undo()
            return failure

        d = maybeDeferred(self.tokens.takeTokens, key, rate, burst, now, count)
        return d.addCallbacks(answered, failed)

    def renewLeases(self, leases, now, ttl) -> Deferred:
        return maybeDeferred(self._renew, leases, now, ttl)

    def _renew(self, leases, now, ttl) -> list:
        pairs = checkLeasePairs(leases)
        now = _now(now)
        checkLeaseArguments("r", "l", 1, now, ttl)
        lost = []
        for resource, lease in pairs:
            held = self._live(resource, now)
            if lease in held:
                held[lease] = now + float(ttl)
            else:
                lost.append((resource, lease))
        return lost

    def releaseLease(self, resource, lease) -> Deferred:
        return maybeDeferred(self._release, resource, lease)

    def _release(self, resource, lease) -> None:
        checkLeaseName("resource", resource)
        checkLeaseName("lease", lease)
        held = self._leases.get(resource)
        if held is not None:
            held.pop(lease, None)
            if not held:
                del self._leases[resource]

    def liveLeases(self, resource, now) -> Deferred:
        return maybeDeferred(self._liveLeases, resource, now)

    def _liveLeases(self, resource, now) -> list:
        checkLeaseName("resource", resource)
        return sorted(self._live(resource, _now(now)))


def leaseBackend(store: Any) -> Any:
    """
    The L{ILeases} for C{store}: the store itself where it provides it (the
    Redis store, shared by the nodes), else a L{LocalLeases} that takes the
    tokens of C{acquireLeaseAndTokens} from C{store}'s buckets.

    @return: C{(backend, shared)}.
    """
    if ILeases.providedBy(store):
        return store, True
    return LocalLeases(tokens=store), False


@attrs.define(eq=False)
class Lease:
    """
    One connection slot held by this node.

    @ivar resource: the destination key.
    @ivar name: the lease's unique name in the store.
    @ivar shared: held in the store (L{False}: granted locally while the
        store could not be reached, as a share of the limit).
    @ivar renewed: when it was last taken or renewed (clock seconds).
    @ivar lost: it is no longer held in the store (expired while the store
        could not be reached, or never there): the session using it should
        end after its transaction.
    """

    keeper: "LeaseKeeper" = attrs.field(repr=False)
    resource: str
    name: str
    shared: bool
    renewed: float
    lost: bool = False
    released: bool = False

    def release(self) -> None:
        """
        Give the slot back (once; later calls do nothing).
        """
        if not self.released:
            self.released = True
            self.keeper._released(self)


@attrs.frozen
class Acquired:
    """
    What L{LeaseKeeper.acquire} came to.

    @ivar lease: the L{Lease}, or L{None} when refused.
    @ivar retryAfter: when refused, seconds to wait before asking again.
    @ivar missing: when refused, what was: C{"slot"} (every slot taken)
        or C{"token"} (L{LeaseKeeper.acquireWithToken}: the rate bucket was
        empty; C{retryAfter} is then when it holds a token again).
    """

    lease: Optional[Lease]
    retryAfter: float = 0.0
    missing: Optional[str] = None


@attrs.define(eq=False, slots=False, repr=False)
class LeaseKeeper(Service):
    """
    Takes, renews and gives back this node's connection-slot leases.

    @ivar backend: an L{ILeases}.
    @ivar clock: an L{IReactorTime}.
    @ivar holder: this node's part of every lease name (unique per run).
    @ivar shared: whether C{backend} is shared with other nodes (Redis).
    @ivar ttl: seconds a lease lives without renewal.
    @ivar nodes: the live-node registry (C{count()}), for the share of a
        limit a node takes while the store cannot be reached; L{None}
        counts this node alone.
    @ivar pollInterval: the longest wait before asking again for a slot
        that was refused.
    """

    backend: Any
    clock: Any
    holder: str = attrs.field(factory=lambda: os.urandom(6).hex())
    shared: bool = False
    ttl: float = DEFAULT_TTL
    nodes: Any = None
    pollInterval: float = POLL_INTERVAL
    _held: dict = attrs.field(factory=dict, init=False)
    _serial: int = attrs.field(default=0, init=False)
    _renewal: Any = attrs.field(default=None, init=False)
    _renewing: bool = attrs.field(default=False, init=False)
    #: Whether the last call to the store succeeded.
    reachable: bool = attrs.field(default=True, init=False)
    #: Slots granted locally because the store could not be reached.
    fallbackGrants: int = attrs.field(default=0, init=False)
    #: The rate buckets of C{acquireWithToken} while the store cannot be
    #: reached (C{rate / N} each).
    _localBuckets: dict = attrs.field(factory=dict, init=False)

    log = Logger()

    def __repr__(self) -> str:
        return f"<LeaseKeeper holder={self.holder} held={len(self._held)}>"

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        if not self.shared:
            # One node: nobody else could take a slot whose lease expired,
            # and the scheduler's own counts bound its sessions anyway.
            return
        self._renewal = LoopingCall(self.renew)
        self._renewal.clock = self.clock
        self._renewal.start(self.ttl / 3, now=False).addErrback(
            lambda f: self.log.failure("lease renewal stopped", f)
        )

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self._renewal = None
        return None

    # -- taking and giving back ----------------------------------------------

    def heldBy(self, resource: str) -> int:
        """
        The leases on C{resource} this node holds (shared or not).
        """
        return sum(1 for lease in self._held.values() if lease.resource == resource)

    def nodeCount(self) -> int:
        """
        N: the live nodes the registry last saw (1 without one).
        """
        return 1 if self.nodes is None else max(1, self.nodes.count())

    def fallbackLimit(self, limit: int) -> int:
        """
        This node's share of C{limit} while the store cannot be reached:
        C{limit / N} for N live nodes, rounded down, at least 1.
        """
        return max(1, limit // self.nodeCount())

    def fallbackRate(self, rate: float) -> float:
        """
        This node's share of a cluster-wide C{rate} (messages a second)
        while the store cannot be reached: C{rate / N}.
        """
        return rate / self.nodeCount()

    def takeLocalTokens(self, key: str, rate: float, burst: float, count: float = 1) -> Any:
        """
        Take C{count} tokens from this node's own bucket C{key}, filled at
        its share of the cluster-wide C{rate} (L{fallbackRate}, up to
        C{burst / N}, at least C{count}): a rate limit while the store
        cannot be reached.  The same bucket serves L{acquireWithToken}'s
        fallback, so a destination is paced once however its tokens are
        asked for.

        @rtype: L{TokenResult <smartrelay.store.interfaces.TokenResult>}
        """
        n = self.nodeCount()
        state, result = takeFromBucket(
            self._localBuckets.get(key), rate / n, max(float(count), burst / n),
            self.clock.seconds(), count,
        )
        if result.allowed:
            self._localBuckets[key] = state
        return result

    def acquire(self, resource: str, limit: int) -> Deferred:
        """
        Take a slot on C{resource}, of which at most C{limit} may be held
        at once in the cluster.

        @rtype: L{Deferred} firing with an L{Acquired}; it fails only for
            bad arguments.
        """
        return Deferred.fromCoroutine(self._acquire(resource, limit))

    async def _acquire(self, resource: str, limit: int) -> Acquired:
        self._serial += 1
        name = f"{self.holder}/{self._serial}"
        now = self.clock.seconds()
        try:
            grant = await maybeDeferred(
                self.backend.acquireLease, resource, name, limit, now, self.ttl
            )
        except ValueError:
            raise
        except Exception:
            self._unreachable(Failure())
            if self.heldBy(resource) < self.fallbackLimit(limit):
                self.fallbackGrants += 1
                lease = Lease(self, resource, name, shared=False, renewed=now)
                self._held[name] = lease
                return Acquired(lease)
            return Acquired(None, self.pollInterval, "slot")
        self._reachable()
        if not grant.granted:
            return Acquired(
                None, max(0.01, min(grant.retry_after, self.pollInterval)), "slot"
            )
        lease = Lease(self, resource, name, shared=True, renewed=now)
        self._held[name] = lease
        return Acquired(lease)

    def acquireWithToken(
        self, resource: str, limit: int, key: str, rate: float, burst: float, count: float = 1
    ) -> Deferred:
        """
        Take a slot on C{resource} (as L{acquire}) and C{count} tokens from
        the rate bucket C{key} (C{rate} a second, up to C{burst}; the
        store's C{takeTokens} buckets) together, in one call to the store
        (one Lua script on Redis): both or neither.

        While the store cannot be reached: a slot from this node's share
        C{limit / N} (L{fallbackLimit}) and a token from a bucket kept here
        at C{rate / N} (L{fallbackRate}, up to C{burst / N}, at least
        C{count}), again both or neither.

        @rtype: L{Deferred} firing with an L{Acquired}: the lease, whose
            token is taken; or refused with C{missing} (C{"slot"}: ask
            again after C{retryAfter}, at most L{pollInterval}; C{"token"}:
            the bucket holds one again in C{retryAfter} seconds).  It
            fails only for bad arguments (L{ValueError}).
        """
        self._serial += 1
        name = f"{self.holder}/{self._serial}"
        now = self.clock.seconds()
        try:
            d = self.backend.acquireLeaseAndTokens(
                resource, name, limit, now, self.ttl, key, rate, burst, count
            )
        except Exception:
            d = fail()

        def answered(grant: SlotAndTokenGrant) -> Acquired:
            if not self.reachable:
                self._reachable()
            if grant.granted:
                lease = Lease(self, resource, name, True, now)
                self._held[name] = lease
                return Acquired(lease)
            if grant.missing == "slot":
                return Acquired(
                    None, max(0.01, min(grant.retry_after, self.pollInterval)), "slot"
                )
            return Acquired(None, max(0.001, grant.retry_after), "token")

        def failed(failure: Failure) -> Any:
            if failure.check(ValueError):
                return failure
            try:
                checkLeaseAndTokenArguments(
                    resource, name, limit, now, self.ttl, key, rate, burst, count
                )
            except ValueError:
                return Failure()
            self._unreachable(failure)
            if self.heldBy(resource) >= self.fallbackLimit(limit):
                return Acquired(None, self.pollInterval, "slot")
            result = self.takeLocalTokens(key, rate, burst, count)
            if not result.allowed:
                return Acquired(None, max(0.001, result.retry_after), "token")
            self.fallbackGrants += 1
            lease = Lease(self, resource, name, False, now)
            self._held[name] = lease
            return Acquired(lease)

        return d.addCallbacks(answered, failed)

    def _released(self, lease: Lease) -> None:
        self._held.pop(lease.name, None)
        if not lease.shared or lease.lost:
            return
        d = maybeDeferred(self.backend.releaseLease, lease.resource, lease.name)

        def failed(failure: Failure) -> None:
            # It expires by itself within the TTL.
            self._unreachable(failure)

        d.addCallbacks(lambda _: self._reachable(), failed)

    # -- renewal --------------------------------------------------------------

    def renew(self) -> Deferred:
        """
        Renew every shared lease held (the keeper does it each C{ttl / 3}).
        Leases the store no longer holds, and those not renewed for C{ttl}
        seconds while the store could not be reached, are marked lost.
        """
        return Deferred.fromCoroutine(self._renew())

    async def _renew(self) -> None:
        if self._renewing:
            return
        leases = [l for l in self._held.values() if l.shared and not l.lost]
        # Granted while the store was down: never in the store, so they end
        # with their sessions once it answers again.
        local = [l for l in self._held.values() if not l.shared and not l.lost]
        if not leases and not (local and self.shared):
            if self.shared and not self.reachable:
                # Nothing to renew: ask the store anyway, so that the node
                # says it answers again before a session needs a slot.
                await self._probe()
            return
        now = self.clock.seconds()
        self._renewing = True
        try:
            lost = await maybeDeferred(
                self.backend.renewLeases,
                [(l.resource, l.name) for l in leases],
                now,
                self.ttl,
            )
        except Exception:
            self._unreachable(Failure())
            for lease in leases:
                if self.clock.seconds() - lease.renewed >= self.ttl:
                    self._lose(lease, "not renewed for its whole TTL")
            return
        finally:
            self._renewing = False
        self._reachable()
        lostNames = {name for (_, name) in lost}
        for lease in leases:
            if lease.name in lostNames:
                self._lose(lease, "expired in the store")
            else:
                lease.renewed = now
        for lease in local:
            self._lose(lease, "granted while the store was unreachable")

    async def _probe(self) -> None:
        try:
            await maybeDeferred(self.backend.liveLeases, "probe", self.clock.seconds())
        except Exception:
            return
        self._reachable()

    def _lose(self, lease: Lease, why: str) -> None:
        if not lease.lost:
            lease.lost = True
            self.log.warn(
                "connection slot {name} for {resource} lost ({why}); its session "
                "ends after the current message",
                name=lease.name,
                resource=lease.resource,
                why=why,
            )

    # -- reachability -----------------------------------------------------------

    def _unreachable(self, failure: Failure) -> None:
        if self.reachable:
            self.reachable = False
            nodes = self.nodeCount()
            self.log.warn(
                "cannot reach the store for connection slots ({why}); each "
                "destination gets 1/{nodes} of its connection limit on this node "
                "(and 1/{nodes} of its rate for the slots taken with a token) "
                "until it answers",
                why=failure.getErrorMessage() or failure.type.__name__,
                nodes=nodes,
            )

    def _reachable(self) -> None:
        if not self.reachable:
            self.reachable = True
            self.log.info("the store answers again: connection slots are cluster-wide again")

    def state(self) -> dict:
        """
        For C{/metrics}: leases held, reachability, the node count in use.
        """
        return {
            "shared": self.shared,
            "reachable": self.reachable,
            "held": len(self._held),
            "held_locally": sum(1 for l in self._held.values() if not l.shared),
            "fallback_grants": self.fallbackGrants,
            "nodes": self.nodeCount(),
        }
