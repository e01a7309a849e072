# -*- test-case-name: tests.test_outbound_scheduler,tests.test_cluster_scheduler -*-
"""
Handing jobs to sessions: each destination's queue of jobs waiting for a
session, and the L{Dispatcher} that gives the oldest one to an idle
session or a new one while the limits allow — the destination's
connection limit (a cluster-wide lease slot), its rate (a token from the
store's shared bucket), its throttle, the global C{maxConnections}, and
fairness between destinations (the one with fewer sessions first; an idle
session elsewhere is closed to make room).
"""

import hashlib
import random as _random
from collections import OrderedDict
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.message import SpoolEntry
from smartrelay.outbound.pool import Destination

__all__ = ["Job", "Slot", "Dispatcher", "leaseResource"]


@attrs.define(eq=False)
class Job:
    """
    One transaction waiting for a session: a message, some of its
    recipients, and the hops they route to.
    """

    entry: SpoolEntry
    hops: list
    addresses: list
    requeued: int = 0

    @property
    def hopNames(self) -> set:
        return {hop.name for hop in self.hops}


@attrs.define(eq=False)
class Slot:
    """
    One session's place in its destination's and the global count, and
    its cluster-wide lease.
    """

    dispatcher: "Dispatcher"
    destination: Destination
    released: bool = False
    #: The cluster-wide connection slot (L{smartrelay.cluster.leases.Lease}).
    lease: Any = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.destination.sessions -= 1
            self.dispatcher.active -= 1
            if self.lease is not None:
                self.lease.release()

    @property
    def lost(self) -> bool:
        """
        The session's lease is no longer held in the store: end it.
        """
        return self.lease is not None and self.lease.lost


@attrs.define(eq=False)
class _IdleWorker:
    """
    A session waiting for the next job.
    """

    waiting: Deferred
    session: Any
    slot: Slot
    timer: Any = None

    def wake(self, job: Optional[Job]) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.waiting.called:
            self.waiting.callback(job)


def _fairness(destination: Destination) -> tuple:
    return (destination.sessions, destination.served)


def leaseResource(key: str) -> str:
    """
    The lease resource of the destination C{key}: C{conn:<key>}, the key
    hashed when it is too long for a lease name.
    """
    resource = "conn:" + key
    if len(resource) > 200 or any(c.isspace() or not c.isprintable() for c in resource):
        resource = "conn:sha1:" + hashlib.sha1(key.encode("utf-8")).hexdigest()
    return resource


@attrs.define(eq=False)
class Dispatcher:
    """
    The destinations and the sessions they may have.

    @ivar leases: the L{LeaseKeeper <smartrelay.cluster.leases.LeaseKeeper>}
        every new session takes its slot from (this node's own slots on a
        store of one node; the cluster's on Redis).
    @ivar tokens: C{takeTokens(key, rate, burst, now)} (the store) for the
        rate of a session already open.
    @ivar parking: the L{Parking <smartrelay.outbound.parking.Parking>} of
        suspended destinations: what comes for one is parked.
    @ivar throttleFor: C{throttleFor(key)}: the throttle of a new
        destination.
    @ivar startSession: C{startSession(destination, job, slot)}: run a new
        session for C{job} (L{smartrelay.outbound.sessions.SessionLoop}).
    @ivar settleJob: C{settleJob(job, verdict)}: give a job its outcome
        without a session (a dead destination).
    @ivar parkJob: C{parkJob(destination, job)}: park a job at a suspended
        destination.
    @ivar releaseJob: C{releaseJob(job)}: a job is given up before a
        session took it (its recipients are no longer busy).
    @ivar idleTimeout: seconds an idle session stays open.
    @ivar leaseIdleTimeout: at most that for a session holding a slot the
        cluster shares, so that a slot is not kept from other nodes.
    """

    clock: Any
    maxConnections: int
    leases: Any
    parking: Any
    throttleFor: Callable[[str], Any]
    settleJob: Callable
    parkJob: Callable
    releaseJob: Callable
    running: Callable[[], bool]
    tokens: Any = None
    idleTimeout: float = 30.0
    leaseIdleTimeout: float = 2.0
    random: Any = attrs.field(factory=_random.Random)
    startSession: Callable = None

    destinations: dict = attrs.field(factory=dict, init=False)
    #: Sessions open or being opened, in all.
    active: int = attrs.field(default=0, init=False)
    #: Whether the last rate token could not be taken from the store (rates
    #: are then paced locally, at this node's share).
    ratesLocal: bool = attrs.field(default=False, init=False)
    _waiting: OrderedDict = attrs.field(factory=OrderedDict, init=False)
    _pumping: bool = attrs.field(default=False, init=False)
    _pumpAgain: bool = attrs.field(default=False, init=False)
    _served: int = attrs.field(default=0, init=False)

    log = Logger()

    # -- destinations and their queues ---------------------------------------

    def destination(self, key: str, limits: Any) -> Destination:
        """
        The destination C{key}, made with C{limits} the first time.
        """
        destination = self.destinations.get(key)
        if destination is None:
            destination = Destination(key=key, limits=limits, throttle=self.throttleFor(key))
            self.destinations[key] = destination
        return destination

    def queue(self, destination: Destination, job: Job, first: bool = False) -> None:
        """
        C{job} waits for a session of C{destination} (at the front if
        C{first}: it was turned away and goes again).
        """
        if first:
            destination.queue.appendleft(job)
        else:
            destination.queue.append(job)
        self._waiting[destination.key] = destination

    def takeBack(self, entry: SpoolEntry) -> None:
        """
        The jobs of C{entry} waiting for a session are given up.
        """
        for destination in self.destinations.values():
            if any(job.entry is entry for job in destination.queue):
                kept = [job for job in destination.queue if job.entry is not entry]
                for job in destination.queue:
                    if job.entry is entry:
                        self.releaseJob(job)
                destination.queue.clear()
                destination.queue.extend(kept)

    def stop(self) -> None:
        """
        Give up every waiting job, cancel the timers, close idle sessions.
        """
        for destination in self.destinations.values():
            while destination.queue:
                self.releaseJob(destination.queue.popleft())
            for timer in (destination.tokenTimer, destination.recoveryTimer, destination.leaseTimer):
                if timer is not None and timer.active():
                    timer.cancel()
            for idle in list(destination.idle):
                idle.wake(None)
            destination.idle.clear()
        self._waiting.clear()

    # -- handing jobs to sessions ----------------------------------------------

    def pump(self) -> None:
        """
        Hand waiting jobs to idle sessions or new ones, one job per
        destination per round, while limits allow.
        """
        if self._pumping:
            self._pumpAgain = True
            return
        self._pumping = True
        try:
            again = True
            while again and self.running():
                again = self._pumpAgain = False
                # Destinations with fewer sessions first: when slots are
                # scarce, one without any gets the next free one.
                waiting = sorted(self._waiting.values(), key=_fairness)
                for destination in waiting:
                    if self._handOut(destination):
                        again = True
                    if not destination.queue:
                        self._waiting.pop(destination.key, None)
                again = again or self._pumpAgain
        finally:
            self._pumping = False

    def _handOut(self, destination: Destination) -> bool:
        """
        Give the destination's oldest job to a session if its limits allow.
        """
        if not destination.queue:
            return False
        suspension = self.parking.get(destination.key)
        if suspension is not None:
            if not suspension.probing:
                while destination.queue:
                    self.parkJob(destination, destination.queue.popleft())
                return False
            if destination.sessions:
                return False  # one probe connection at a time
        if destination.deadUntil > self.clock.seconds():
            verdict = destination.deadVerdict
            while destination.queue:
                self.settleJob(destination.queue.popleft(), verdict)
            return False
        if destination.idle:
            idle = destination.idle.pop()
        elif (
            destination.sessions < destination.maxConnections
            # While none is open, one at a time: a destination that
            # refuses is found out by one connection (and parked), and a
            # new one is not sent max_connections handshakes at once.
            and (destination.established or not destination.sessions)
            and not self._waitingForLease(destination)
            and (self.active < self.maxConnections or self._closeIdleSession(destination))
        ):
            # A new session needs a slot first (and, with a rate, a token in
            # the same call to the store); asked for only now that a job
            # and a local slot are ready for it.
            self._acquireSlot(
                destination, withToken=destination.rate is not None and destination.tokens <= 0
            )
            return False
        else:
            return False
        if destination.rate is not None:
            if destination.tokens <= 0:
                destination.idle.append(idle)
                self._fetchToken(destination)
                return False
            destination.tokens -= 1
        idle.wake(self._take(destination))
        return True

    def _take(self, destination: Destination) -> Job:
        job = destination.queue.popleft()
        destination.lastUsed = self.clock.seconds()
        self._served += 1
        destination.served = self._served
        return job

    def _closeIdleSession(self, needing: Destination) -> bool:
        """
        Close the idle session that has waited longest at another
        destination, to free a global slot.
        """
        candidates = [d for d in self.destinations.values() if d is not needing and d.idle]
        if not candidates:
            return False
        victim = min(candidates, key=lambda d: d.lastUsed)
        victim.idle.pop(0).wake(None)
        return self.active < self.maxConnections

    def yieldSlot(self, destination: Destination) -> bool:
        """
        Whether a session of C{destination} should close after its
        transaction so that a destination without any session gets the
        slot.
        """
        if self.active < self.maxConnections:
            return False
        return any(
            d is not destination and d.sessions == 0 and d.queue for d in self._waiting.values()
        )

    def nextJob(self, destination: Destination, session: Any, slot: Slot) -> Deferred:
        """
        Wait (at most C{idleTimeout}) for the next job of C{destination};
        fires with L{None} on timeout, when the session closes, or when
        its slot is wanted elsewhere.
        """
        idle = _IdleWorker(Deferred(), session, slot)

        def expire() -> None:
            if idle in destination.idle:
                destination.idle.remove(idle)
            idle.wake(None)

        timeout = self.idleTimeout
        if slot.lease is not None and self.leases.shared:
            # An idle session must not sit on a slot another node could use.
            timeout = min(timeout, self.leaseIdleTimeout)
        idle.timer = self.clock.callLater(timeout, expire)
        session.closed.addCallback(lambda _: expire())
        destination.idle.append(idle)
        self.pump()
        return idle.waiting

    # -- rate tokens -------------------------------------------------------------

    def _fetchToken(self, destination: Destination) -> None:
        """
        Take one token from the destination's shared bucket for a session
        already open; pump again when there is one (at once, or when the
        bucket refills).
        """
        if destination.fetchingToken or (
            destination.tokenTimer is not None and destination.tokenTimer.active()
        ):
            return
        destination.fetchingToken = True
        rate = destination.rate

        def later(delay: float) -> None:
            destination.tokenTimer = self.clock.callLater(max(delay, 0.001), self.pump)

        def taken(result: Any) -> None:
            destination.fetchingToken = False
            self._ratesShared()
            if result.allowed:
                destination.tokens += 1
                self.pump()
            else:
                later(result.retry_after)

        def failed(failure: Failure) -> None:
            # The store is unreachable: pace locally at this node's share
            # of the rate (1/N of it for N live nodes, from the bucket the
            # lease keeper takes from with a slot too), rather than stop
            # delivering or run unlimited.
            destination.fetchingToken = False
            result = self.leases.takeLocalTokens(f"rate:{destination.key}", rate, destination.burst)
            self._ratesLocal(destination, failure.getErrorMessage() or failure.type.__name__)
            if result.allowed:
                destination.tokens += 1
                self.pump()
            else:
                later(result.retry_after)

        d = maybeDeferred(
            self.tokens.takeTokens,
            f"rate:{destination.key}",
            rate,
            destination.burst,
            self.clock.seconds(),
        )
        d.addCallbacks(taken, failed)

    def _ratesLocal(self, destination: Destination, why: str) -> None:
        if not self.ratesLocal:
            self.ratesLocal = True
            rate = destination.rate
            self.log.warn(
                "could not take a rate token for {destination} ({why}); every "
                "rate limit is paced on this node at 1/{nodes} of its rate "
                "until the store answers",
                destination=destination.key,
                why=why,
                nodes=round(rate / self.leases.fallbackRate(rate)),
            )

    def _ratesShared(self) -> None:
        if self.ratesLocal:
            self.ratesLocal = False
            self.log.info("the store answers again: rate limits are cluster-wide again")

    # -- connection slots (leases) -------------------------------------------

    def _waitingForLease(self, destination: Destination) -> bool:
        timer = destination.leaseTimer
        return destination.acquiring or (timer is not None and timer.active())

    def _acquireSlot(self, destination: Destination, withToken: bool) -> None:
        """
        Ask the lease keeper for a slot on C{destination} (and, if
        C{withToken}, a rate token with it, in the same call to the store);
        the session counts as being opened meanwhile.  Granted: the oldest
        job gets a new session with it.  Refused (no slot, or no token):
        ask again when the keeper says, and leave the other destinations
        to the pump meanwhile.
        """
        destination.acquiring = True
        destination.sessions += 1
        self.active += 1
        resource = leaseResource(destination.key)
        if withToken:
            d = self.leases.acquireWithToken(
                resource,
                destination.maxConnections,
                f"rate:{destination.key}",
                destination.rate,
                destination.burst,
            )
        else:
            if destination.rate is not None:
                # A token held already: this session spends it.
                destination.tokens -= 1
            d = self.leases.acquire(resource, destination.maxConnections)

        def undo(tokenTaken: bool) -> None:
            # A token taken for this session (with the slot, or before it)
            # is kept for the next one.
            destination.acquiring = False
            destination.sessions -= 1
            self.active -= 1
            if destination.rate is not None and tokenTaken:
                destination.tokens += 1

        def acquired(result: Any) -> None:
            lease = result.lease
            if lease is None:
                undo(not withToken)
                if self.running():
                    # Spread a little, so that the nodes waiting for the
                    # same slot or token do not ask in lockstep (the first
                    # to ask winning every time).
                    delay = result.retryAfter * (1 + 0.25 * self.random.random())
                    destination.leaseTimer = self.clock.callLater(delay, self.pump)
                return
            if not self.running() or not destination.queue:
                undo(True)
                lease.release()
                self.pump()
                return
            destination.acquiring = False
            if withToken:
                # Its token came with the slot: from the store's bucket, or
                # (the store unreachable) from this node's share.
                if lease.shared:
                    self._ratesShared()
                else:
                    self._ratesLocal(destination, "the store cannot be reached")
            self.startSession(destination, self._take(destination), Slot(self, destination, lease=lease))
            self.pump()

        def failed(failure: Failure) -> None:
            undo(not withToken)
            self.log.failure(
                "could not take a connection slot for {destination}",
                failure,
                destination=destination.key,
            )
            if self.running():
                destination.leaseTimer = self.clock.callLater(1.0, self.pump)

        d.addCallbacks(acquired, failed)

    def state(self) -> list:
        """
        The state of every destination seen (queue, sessions, limits,
        throttle) with its parking, for the API, the UI and C{/metrics}.
        """
        return [{**d.state(), **self.parking.state(d.key)} for d in self.destinations.values()]
