"""
The delivery scheduler: decides when each spooled recipient is tried,
routes it, queues it at its destination, hands it to a pooled connection
within the destination's limits, and turns replies into durable state
changes and events.

Life of a recipient::

    enqueue ─▶ timer at next_attempt ─▶ route(domain) ─▶ destination queue
      ─▶ (connection limit, rate token) ─▶ pooled session: MAIL/RCPT/DATA
      ─▶ outcome ─▶ spool.record(...) ─▶ events.emit(...) ─▶ next retry

Destinations (L{smartrelay.outbound.pool}) are domains, or providers
grouping domains by their MX host names.  Each has a connection limit, an
optional rate limit (tokens from the store's shared buckets, so the limit
holds across relay nodes), and an adaptive throttle.  A session is reused
for up to C{messagesPerConnection} transactions and kept open
C{idleTimeout} seconds with no work; the global C{maxConnections} bounds
all sessions together, and an idle session is closed when another
destination needs its slot.

Outcomes: 2xx → C{delivered}; 5xx → C{bounced} (kind and reason from the
reply); 4xx or network trouble → C{deferred} with the next attempt from the
retry schedule (plus jitter), or C{expired} once the message would be older
than C{maxAge}.  A state change is always recorded in the spool before its
event is emitted; a failed record is logged and retried, never dropped.
"""

import hashlib
import random as _random
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    maybeDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.deferreds import whenAllDone
from smartrelay.engine.rewrap import RewrapError
from smartrelay.events import rfc3339
from smartrelay.feedback.reasons import bounceKind, classifyReply
from smartrelay.logs import MessageLog
from smartrelay.message import Recipient, SpoolEntry
from smartrelay.outbound.parking import Parking
from smartrelay.outbound.pool import Destination, DestinationPolicy, Throttle
from smartrelay.outbound.router import NoRoute
from smartrelay.outbound.session import Reply
from smartrelay.outbound.transport import transportFor

__all__ = ["DeliveryScheduler", "DeliveryInProgress"]

#: Longest wait between two tries of a failed C{spool.record}.
MAX_RECORD_RETRY_DELAY = 300.0

#: After no session could be opened to a destination (and none is open),
#: mail for it is deferred without trying for this many seconds.
DEAD_DESTINATION_TIME = 60.0


@attrs.frozen
class _Verdict:
    """
    The reply one recipient got, and where from.
    """

    reply: Reply
    remote: Optional[str]
    tls: bool = False
    reason: Optional[str] = None
    throttle: Optional[dict] = None
    suppressed: bool = False
    #: From a transport (L{TransportOutcome}): the event type instead of
    #: the state's own (C{""}: none), and detail added to it.
    event: Optional[str] = None
    eventDetail: dict = attrs.field(factory=dict)


@attrs.define(eq=False)
class _Job:
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
class _Slot:
    """
    One session's place in its destination's and the global count.
    """

    scheduler: Any
    destination: Destination
    released: bool = False
    #: The cluster-wide connection slot (L{smartrelay.cluster.leases.Lease})
    #: the session holds, or L{None} without a lease keeper.
    lease: Any = None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.destination.sessions -= 1
            self.scheduler._active -= 1
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
    A worker whose session waits for the next job.
    """

    waiting: Deferred
    session: Any
    slot: _Slot
    timer: Any = None

    def wake(self, job: Optional["_Job"]) -> None:
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


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define(eq=False, slots=False, repr=False)
class DeliveryScheduler(Service):
    """
    Schedules and runs deliveries of spooled messages.

    @ivar spool: C{readMessage(entry) -> Deferred[bytes]} and
        C{record(entry, changes) -> Deferred[None]}.
    @ivar router: an L{IRouter}.
    @ivar connector: C{open(hop, tlsPolicy) -> Deferred[OpenResult]}, e.g.
        a L{smartrelay.outbound.pool.Connector}.
    @ivar events: C{emit(type, queue_id, recipient, detail=...)}.
    @ivar clock: an L{IReactorTime}.
    @ivar retry: C{delay(attempts) -> seconds}, C{attempts} counting the
        attempt that just failed (1 after the first failure), e.g.
        L{smartrelay.config.RetrySchedule}.
    @ivar maxAge: seconds after C{entry.received} at which a recipient that
        still fails temporarily expires.
    @ivar maxConnections: sessions open (or opening) at once, in all.
    @ivar policy: a L{DestinationPolicy}: destination keys and limits.
    @ivar store: C{takeTokens(key, rate, burst, now)} for rate limits
        (an L{IStore}); needed when a destination has a rate.
    @ivar throttlePatterns: compiled regular expressions; a temporary
        reply whose text matches one (or any C{421}) throttles its
        destination.
    @ivar throttleCooldown: seconds a throttle lasts before each step of
        recovery.
    @ivar idleTimeout: seconds an idle session stays open.
    @ivar jitter: retry delays are stretched by up to this fraction, at
        random, so that deferred mail does not come back in a crowd.
    @ivar shutdownTimeout: how long L{stopService} waits for transactions
        in flight before aborting them.
    @ivar recordRetryDelay: first delay before retrying a failed
        C{spool.record} (doubling up to L{MAX_RECORD_RETRY_DELAY}).
    @ivar maxRecipientsPerAttempt: RCPTs per transaction (RFC 5321 4.5.3.1.8).
    @ivar hold: accept and queue, but start no deliveries until
        L{release} (or an explicit L{retryNow}).
    @ivar rewrapper: see below; L{None}: messages go out as stored.
    @ivar suppress: recipients on the store's suppression list are not
        delivered: they get the final state C{suppressed} and a
        C{suppressed} event with the list entry's reason.
    """

    spool: Any
    router: Any
    connector: Any
    events: Any
    clock: Any
    retry: Any
    maxAge: float
    maxConnections: int = attrs.field(validator=attrs.validators.ge(1))
    policy: DestinationPolicy = attrs.field(factory=DestinationPolicy)
    store: Any = None
    throttlePatterns: tuple = ()
    throttleCooldown: float = 300.0
    idleTimeout: float = 30.0
    jitter: float = 0.0
    random: Any = attrs.field(factory=_random.Random)
    shutdownTimeout: float = 30.0
    recordRetryDelay: float = 10.0
    maxRecipientsPerAttempt: int = 100
    hold: bool = False
    #: C{rewrap(entry, index, data, offers) -> Deferred[(sender, Prepared)]}
    #: turning the stored message into the one for recipient number
    #: C{index}, made for a server offering C{offers} (see
    #: L{smartrelay.engine.rewrap}), or L{None} to send it as stored.  With
    #: a rewrapper every recipient gets a transaction of its own.
    rewrapper: Any = None
    #: Check due recipients against the store's suppression list.
    suppress: bool = False
    #: Told of every C{bounced} event (C{bounced(event) -> Deferred}): the
    #: L{BounceSuppressor <smartrelay.feedback.suppression.BounceSuppressor>}
    #: that puts hard (and escalated soft) bounces on the suppression
    #: list, or L{None}.
    bounces: Any = None
    #: Writes one line per outcome (L{smartrelay.logs.MessageLog}).
    messageLog: MessageLog = attrs.field(factory=MessageLog)
    #: Transports (L{smartrelay.outbound.transport.DeliveryTransport}) that
    #: deliver the recipients of the domains they claim instead of an MX
    #: (the SMS gateway).
    transports: tuple = ()
    #: Takes a connection slot for every new session
    #: (L{smartrelay.cluster.leases.LeaseKeeper}): the destinations'
    #: connection limits hold across the nodes sharing the store.  L{None}:
    #: this node's own counts only.
    leases: Any = None
    #: Seconds an idle session holding a cluster-wide slot stays open (at
    #: most C{idleTimeout}), so that a slot is not kept from other nodes.
    leaseIdleTimeout: float = 2.0
    #: The local suppression replica
    #: (L{smartrelay.cluster.replica.SuppressionReplica}) checked while
    #: the store cannot be; a recipient is held when it is too old.  L{None}:
    #: deliver unchecked then (tools and tests only).
    replica: Any = None
    #: The destinations' throttles kept with the other nodes sharing the
    #: store (L{smartrelay.cluster.throttle.ThrottleBoard}: C{throttle(key,
    #: onChange)}).  L{None}: a L{Throttle} of this node's own each.
    throttles: Any = None

    _entries: dict = attrs.field(factory=dict, init=False)
    _timers: dict = attrs.field(factory=dict, init=False)
    _busy: set = attrs.field(factory=set, init=False)
    _destinations: dict = attrs.field(factory=dict, init=False)
    _waiting: OrderedDict = attrs.field(factory=OrderedDict, init=False)
    _active: int = attrs.field(default=0, init=False)
    _pumping: bool = attrs.field(default=False, init=False)
    _pumpAgain: bool = attrs.field(default=False, init=False)
    _served: int = attrs.field(default=0, init=False)
    _suppressionWarned: float = attrs.field(default=float("-inf"), init=False)
    _suppressionHeld: bool = attrs.field(default=False, init=False)
    #: Whether the last rate token could not be taken from the store (rates
    #: are then paced locally, at this node's share).
    ratesLocal: bool = attrs.field(default=False, init=False)
    _sessions: set = attrs.field(factory=set, init=False)
    _workers: set = attrs.field(factory=set, init=False)
    _inFlight: set = attrs.field(factory=set, init=False)
    _recordRetries: set = attrs.field(factory=set, init=False)
    #: The detail of each waiting recipient's last C{deferred} event, by
    #: (queue id, address), for the queue API (not kept across restarts).
    _deferrals: dict = attrs.field(factory=dict, init=False)
    #: Destinations that cannot be connected to, and the recipients
    #: parked there until their retry (L{smartrelay.outbound.parking}).
    _parking: Parking = attrs.field(
        default=attrs.Factory(lambda self: self._makeParking(), takes_self=True), init=False
    )

    log = Logger()

    def _makeParking(self) -> Parking:
        return Parking(
            clock=self.clock,
            retry=self.retry,
            maxAge=self.maxAge,
            record=self._recordParked,
            expire=self._expireParked,
            release=self._unpark,
            opening=lambda key: key in self._destinations
            and self._destinations[key].sessions > 0,
            jitter=self.jitter,
            random=self.random,
        )

    def __repr__(self) -> str:
        return (
            f"<DeliveryScheduler queued={len(self._entries)} "
            f"sessions={self._active} destinations={len(self._destinations)}>"
        )

    # -- public API ----------------------------------------------------------

    def enqueue(self, entry: SpoolEntry) -> None:
        """
        Take charge of C{entry}: its non-final recipients are tried at their
        C{next_attempt} (soon, if that is in the past; never synchronously).
        Enqueueing a queue id twice keeps the first entry object.
        """
        known = self._entries.get(entry.queue_id)
        if known is None:
            if entry.done:
                return
            self._entries[entry.queue_id] = known = entry
        if self.running and not self.hold:
            # Recipients at a domain whose destination is suspended wait
            # there, with no timer and no attempt of their own.
            self._parking.admit(known, self._idle(known), self.clock.seconds())
            self._reschedule(known)

    def release(self) -> None:
        """
        End a hold (C{[delivery] hold}): schedule everything queued.
        """
        self.hold = False
        if self.running:
            for entry in list(self._entries.values()):
                self._reschedule(entry)

    def retryNow(self, queue_id: str) -> bool:
        """
        Attempt every waiting recipient of C{queue_id} now.

        @return: C{False} if the message is unknown, finished, or all its
            recipients are already being attempted.
        """
        if not self.running or queue_id not in self._entries:
            return False
        self._cancelTimer(queue_id)
        # Parked recipients are tried too: their destination is probed now.
        self._parking.probeNow(self._parking.forget(queue_id))
        return self._wake(queue_id, force=True)

    def retryDomain(self, domain: str) -> int:
        """
        Attempt every waiting recipient at C{domain} now.

        @return: the number of messages with recipients woken.
        """
        if not self.running:
            return 0
        domain = domain.lower().rstrip(".")
        woken = 0
        for queue_id, entry in list(self._entries.items()):
            self._parking.probeNow(self._parking.forget(queue_id, domain))
            if any(_domain(r.address) == domain for r in self._idle(entry)):
                self._cancelTimer(queue_id)
                woken += self._wake(queue_id, force=True, domain=domain)
        return woken

    def queued(self) -> int:
        """
        The number of messages with recipients still to deliver.
        """
        return len(self._entries)

    @property
    def pendingEntries(self) -> Iterable[SpoolEntry]:
        """
        The messages with recipients still to deliver, in no order: a live
        view of the scheduler's own entries, to be read (on the reactor
        thread) and never changed; C{/metrics} sums it by domain.
        """
        return self._entries.values()

    def destinations(self) -> list:
        """
        The state of every destination seen (queue, sessions, limits,
        throttle), for the API, the UI and C{/metrics}.
        """
        return [
            {**d.state(), **self._parking.state(d.key)} for d in self._destinations.values()
        ]

    # -- queue inspection and control (the HTTP API) --------------------------

    def queuedMessages(self) -> list:
        """
        The messages with recipients still to deliver, oldest first: the
        scheduler's own L{SpoolEntry} objects, to be read, never changed.
        """
        return sorted(self._entries.values(), key=lambda e: (e.received, e.queue_id))

    def queuedMessage(self, queue_id: str) -> Optional[SpoolEntry]:
        """
        The queued message C{queue_id} (to be read only), or L{None}.
        """
        return self._entries.get(queue_id)

    def attempting(self, queue_id: str) -> set:
        """
        The recipients of C{queue_id} being attempted right now (routed,
        waiting for a session, or in a transaction).
        """
        return {address for (q, address) in self._busy if q == queue_id}

    def lastDeferral(self, queue_id: str, address: str) -> Optional[dict]:
        """
        The C{detail} of the last C{deferred} event of a waiting recipient
        in this run, or L{None}.  A parked recipient's is made from its
        destination's suspension (it is shared, not kept per recipient).
        """
        parked = self._parking.lastDeferral(queue_id, address)
        if parked is not None:
            return parked
        return self._deferrals.get((queue_id, address))

    def delete(self, queue_id: str, reason: str = "deleted") -> Deferred:
        """
        Give up on every waiting recipient of C{queue_id}: none of them is
        attempted again; each gets the final state C{expired} (in the spool
        first) and an C{expired} event whose detail C{reason} is C{reason}.
        Jobs still waiting for a session are taken back first.

        @return: a L{Deferred} firing with the addresses given up, once the
            spool has recorded them.
        @raise KeyError: C{queue_id} is not queued.
        @raise DeliveryInProgress: some recipients are being attempted right
            now (in a transaction); nothing was changed.
        """
        entry = self._entries.get(queue_id)
        if entry is None:
            raise KeyError(queue_id)
        for destination in self._destinations.values():
            if any(job.entry is entry for job in destination.queue):
                kept = [job for job in destination.queue if job.entry is not entry]
                for job in destination.queue:
                    if job.entry is entry:
                        self._release(job)
                destination.queue.clear()
                destination.queue.extend(kept)
        busy = sorted(self.attempting(queue_id))
        if busy:
            raise DeliveryInProgress(queue_id, busy)
        self._parking.forget(queue_id)
        self._cancelTimer(queue_id)
        now = self.clock.seconds()
        changes, events = [], []
        for recipient in entry.pending():
            self._busy.add((queue_id, recipient.address))
            changes.append(
                Recipient(
                    address=recipient.address,
                    state="expired",
                    attempts=recipient.attempts,
                    next_attempt=recipient.next_attempt,
                )
            )
            detail = {
                "reason": reason,
                "diagnostic": "deleted from the queue by the operator",
                "attempts": recipient.attempts,
            }
            line = {
                "delay": now - entry.received,
                "reply": "deleted from the queue by the operator",
                "attempts": recipient.attempts,
            }
            events.append(("expired", recipient.address, detail, line))
        addresses = [change.address for change in changes]
        if not changes:
            return succeed([])
        d = self._record(entry, changes, events)
        self._track(d)
        return d.addCallback(lambda _: addresses)

    def startService(self) -> None:
        Service.startService(self)
        if self.hold:
            self.log.info("delivery is on hold: messages are accepted and queued only")
            return
        for entry in list(self._entries.values()):
            self._reschedule(entry)

    def stopService(self) -> Deferred:
        """
        Stop starting transactions, cancel timers, close idle sessions, and
        wait (at most C{shutdownTimeout} seconds) for transactions in flight
        and their spool records.  What is left stays in the spool for the
        next start.
        """
        Service.stopService(self)
        for queue_id in list(self._timers):
            self._cancelTimer(queue_id)
        self._parking.stop()
        for destination in self._destinations.values():
            while destination.queue:
                self._release(destination.queue.popleft())
            for timer in (destination.tokenTimer, destination.recoveryTimer, destination.leaseTimer):
                if timer is not None and timer.active():
                    timer.cancel()
            for idle in list(destination.idle):
                idle.wake(None)
            destination.idle.clear()
        self._waiting.clear()
        for call in list(self._recordRetries):
            if call.active():
                call.reset(0)
        pending = self._workers | self._inFlight
        if not pending:
            return succeed(None)
        self.log.info(
            "waiting up to {timeout}s for {count} deliveries in progress",
            timeout=self.shutdownTimeout,
            count=len(self._workers),
        )
        done: Deferred = Deferred()

        def giveUp() -> None:
            self.log.warn(
                "{count} deliveries still in progress after {timeout}s; "
                "abandoning them (their recipients stay in the spool)",
                count=len(self._workers),
                timeout=self.shutdownTimeout,
            )
            for worker in list(self._workers):
                worker.cancel()
            for session in list(self._sessions):
                session.abort()
            if not done.called:
                done.callback(None)

        timer = self.clock.callLater(self.shutdownTimeout, giveUp)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        # An attempt that ends while we wait starts its spool record (and,
        # after it, its events) only then: wait for those too.
        whenAllDone(lambda: self._workers | self._inFlight).addCallback(finished)
        return done

    # -- timers --------------------------------------------------------------

    def _cancelTimer(self, queue_id: str) -> None:
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _idle(self, entry: SpoolEntry) -> list:
        queue_id, busy, parked = entry.queue_id, self._busy, self._parking
        return [
            r for r in entry.pending()
            if (queue_id, r.address) not in busy and (queue_id, r.address) not in parked
        ]

    def _reschedule(self, entry: SpoolEntry) -> None:
        """
        (Re)arm the entry's timer for its earliest waiting recipient.
        """
        self._cancelTimer(entry.queue_id)
        idle = self._idle(entry)
        if not idle or not self.running:
            return
        delay = max(0.0, min(r.next_attempt for r in idle) - self.clock.seconds())
        self._timers[entry.queue_id] = self.clock.callLater(
            delay, self._wake, entry.queue_id
        )

    def _wake(self, queue_id: str, force: bool = False, domain: Optional[str] = None) -> bool:
        """
        Start attempts for the recipients of C{queue_id} that are due (all
        waiting ones if C{force}; only those at C{domain} if given).
        """
        self._timers.pop(queue_id, None)
        entry = self._entries.get(queue_id)
        if entry is None or not self.running:
            return False
        now = self.clock.seconds()
        due = [
            r
            for r in self._idle(entry)
            if (force or r.next_attempt <= now)
            and (domain is None or _domain(r.address) == domain)
        ]
        for recipient in due:
            self._busy.add((queue_id, recipient.address))
        self._reschedule(entry)
        if due:
            self._track(self._dispatch(entry, [r.address for r in due]))
        return bool(due)

    # -- routing and destinations --------------------------------------------

    def _dispatch(self, entry: SpoolEntry, addresses: list) -> Deferred:
        """
        Check C{addresses} against the suppression list (if asked to), then
        route the others and queue them.
        """
        if not self.suppress or self.store is None:
            return self._route(entry, addresses)
        d = maybeDeferred(self.store.checkSuppressions, addresses, self.clock.seconds())

        def checked(suppressed: dict) -> Any:
            if suppressed:
                verdicts = {
                    address: _Verdict(
                        Reply(550, "5.7.1", "recipient is on the suppression list"),
                        remote=None,
                        reason=suppressed[address].reason,
                        suppressed=True,
                    )
                    for address in suppressed
                }
                self._track(self._settle(entry, verdicts) or succeed(None))
            rest = [a for a in addresses if a not in suppressed]
            return self._route(entry, rest) if rest else None

        def unchecked(failure: Failure) -> Any:
            now = self.clock.seconds()
            if self.replica is not None:
                return self._checkReplica(entry, addresses, failure, now, checked)
            # The store being down must not stop mail: deliver, and say so
            # (once a minute, not once per message).
            if now - self._suppressionWarned >= 60:
                self._suppressionWarned = now
                self.log.warn(
                    "cannot check recipients against the suppression list "
                    "({why}); delivering anyway",
                    why=failure.getErrorMessage() or failure.type.__name__,
                )
            return self._route(entry, addresses)

        return d.addCallbacks(checked, unchecked)

    def _checkReplica(
        self, entry: SpoolEntry, addresses: list, failure: Failure, now: float, checked: Any
    ) -> Any:
        """
        The store could not be asked: check against the local replica if it
        is fresh enough, else hold the recipients (a temporary failure,
        retried on the retry schedule).  Never deliver unchecked.
        """
        replica = self.replica
        why = failure.getErrorMessage() or failure.type.__name__
        fresh = replica.fresh(now)
        # Once a minute, and whenever checking turns into holding or back.
        warn = now - self._suppressionWarned >= 60 or self._suppressionHeld == fresh
        self._suppressionHeld = not fresh
        if warn:
            self._suppressionWarned = now
        if fresh:
            if warn:
                self.log.warn(
                    "cannot check recipients against the suppression list ({why}); "
                    "checking against the local replica ({age:.0f}s old)",
                    why=why,
                    age=replica.age(now),
                )
            return checked(replica.check(addresses, now))
        age = replica.age(now)
        if warn:
            self.log.warn(
                "cannot check recipients against the suppression list ({why}) and "
                "the local replica is {state}; holding recipients until one of them "
                "answers",
                why=why,
                state="missing" if age is None else f"{age:.0f}s old",
            )
        replica.held += len(addresses)
        reply = Reply(
            451,
            "4.3.0",
            "held: the suppression list cannot be checked (store unreachable, "
            "local copy too old)",
        )
        return self._settle(entry, {a: _Verdict(reply, None) for a in addresses})

    def _route(self, entry: SpoolEntry, addresses: list) -> Deferred:
        """
        Route C{addresses} and queue jobs at their destinations; recipients
        that cannot be routed get their verdict at once.
        """
        if self.transports:
            addresses = self._handToTransports(entry, addresses)
            if not addresses:
                return succeed(None)
        byDomain: dict = {}
        for address in addresses:
            byDomain.setdefault(_domain(address), []).append(address)
        domains = list(byDomain)
        lookups = [maybeDeferred(self.router.route, domain) for domain in domains]

        def routed(results: list) -> Any:
            groups: dict = {}
            verdicts: dict = {}
            for domain, (ok, value) in zip(domains, results):
                if ok and value:
                    key, limits = self.policy.lookup(domain, value)
                    group = (key, frozenset(hop.name for hop in value))
                    groups.setdefault(group, (limits, list(value), []))[2].extend(
                        byDomain[domain]
                    )
                else:
                    verdict = self._unroutable(entry, domain, None if ok else value)
                    for address in byDomain[domain]:
                        verdicts[address] = verdict
            size = 1 if self.rewrapper is not None else max(1, self.maxRecipientsPerAttempt)
            for (key, _), (limits, hops, group) in groups.items():
                destination = self._destination(key, limits)
                for start in range(0, len(group), size):
                    job = _Job(entry, hops, group[start : start + size])
                    if self.running:
                        self._queue(destination, job)
                    else:
                        self._release(job)
            self._pump()
            if verdicts:
                return self._settle(entry, verdicts)
            return None

        return DeferredList(lookups, consumeErrors=True).addCallback(routed)

    # -- transports (SMS) --------------------------------------------------

    def _handToTransports(self, entry: SpoolEntry, addresses: list) -> list:
        """
        Start a delivery by its transport for each address a transport
        claims; return the others.
        """
        rest = []
        for address in addresses:
            transport = transportFor(self.transports, _domain(address))
            if transport is None:
                rest.append(address)
            else:
                self._track(Deferred.fromCoroutine(self._viaTransport(transport, entry, address)))
        return rest

    async def _viaTransport(self, transport: Any, entry: SpoolEntry, address: str) -> None:
        try:
            data = await maybeDeferred(self.spool.readMessage, entry)
            outcome = await maybeDeferred(transport.deliver, entry, address, data)
            verdict = _Verdict(
                outcome.reply, outcome.remote, event=outcome.event,
                eventDetail=dict(outcome.detail),
            )
        except CancelledError:
            self._busy.discard((entry.queue_id, address))
            raise
        except Exception:
            self.log.failure(
                "delivery of {queue_id} to {recipient} failed unexpectedly",
                queue_id=entry.queue_id,
                recipient=address,
            )
            verdict = _Verdict(Reply(451, "4.3.0", "local error during the delivery"), None)
        d = self._settle(entry, {address: verdict})
        if d is not None:
            await d

    def _unroutable(
        self, entry: SpoolEntry, domain: str, failure: Optional[Failure]
    ) -> _Verdict:
        if failure is not None and failure.check(NoRoute):
            noRoute = failure.value
            code = 550 if noRoute.permanent else 451
            return _Verdict(
                Reply(code, noRoute.status, noRoute.text),
                remote=None,
                reason=noRoute.reason if noRoute.permanent else None,
            )
        if failure is not None:
            self.log.failure(
                "routing {domain} for {queue_id} failed unexpectedly",
                failure,
                domain=domain,
                queue_id=entry.queue_id,
            )
            return _Verdict(Reply(451, "4.3.0", f"internal error routing {domain}"), None)
        return _Verdict(Reply(451, "4.4.3", f"no route to {domain}"), None)

    def _destination(self, key: str, limits: Any) -> Destination:
        destination = self._destinations.get(key)
        if destination is None:
            if self.throttles is None:
                throttle = Throttle(self.clock, self.throttleCooldown)
            else:
                throttle = self.throttles.throttle(key, lambda: self._throttleChanged(key))
            destination = Destination(key=key, limits=limits, throttle=throttle)
            self._destinations[key] = destination
        return destination

    def _queue(self, destination: Destination, job: _Job, first: bool = False) -> None:
        if first:
            destination.queue.appendleft(job)
        else:
            destination.queue.append(job)
        self._waiting[destination.key] = destination

    def _release(self, job: _Job) -> None:
        for address in job.addresses:
            self._busy.discard((job.entry.queue_id, address))

    # -- handing jobs to sessions ----------------------------------------------

    def _pump(self) -> None:
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
            while again and self.running:
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
        suspension = self._parking.get(destination.key)
        if suspension is not None:
            if not suspension.probing:
                while destination.queue:
                    self._parkJob(destination, destination.queue.popleft())
                return False
            if destination.sessions:
                return False  # one probe connection at a time
        if destination.deadUntil > self.clock.seconds():
            verdict = destination.deadVerdict
            while destination.queue:
                self._settleJob(destination.queue.popleft(), verdict)
            return False
        if destination.idle:
            idle = destination.idle.pop()
        elif (
            destination.sessions < destination.maxConnections
            and not self._waitingForLease(destination)
            and (self._active < self.maxConnections or self._closeIdleSession(destination))
        ):
            idle = None
        else:
            return False
        if destination.rate is not None:
            if destination.tokens <= 0:
                if idle is None and self.leases is not None:
                    # A new session needs a slot and a token: both in one
                    # call to the store.
                    self._acquireSlot(destination, withToken=True)
                    return False
                if idle is not None:
                    destination.idle.append(idle)
                self._fetchToken(destination)
                return False
            destination.tokens -= 1
        if idle is None and self.leases is not None:
            # A new session needs a cluster-wide slot first; asked for only
            # now that a job, a token and a local slot are ready for it.
            self._acquireSlot(destination)
            return False
        job = destination.queue.popleft()
        destination.lastUsed = self.clock.seconds()
        self._served += 1
        destination.served = self._served
        if idle is not None:
            idle.wake(job)
        else:
            self._startWorker(destination, job)
        return True

    def _closeIdleSession(self, needing: Destination) -> bool:
        """
        Close the idle session that has waited longest at another
        destination, to free a global slot.
        """
        candidates = [
            d for d in self._destinations.values() if d is not needing and d.idle
        ]
        if not candidates:
            return False
        victim = min(candidates, key=lambda d: d.lastUsed)
        victim.idle.pop(0).wake(None)
        return self._active < self.maxConnections

    def _fetchToken(self, destination: Destination) -> None:
        """
        Take one token from the destination's shared bucket; pump again
        when there is one (at once, or when the bucket refills).
        """
        if destination.fetchingToken or (
            destination.tokenTimer is not None and destination.tokenTimer.active()
        ):
            return
        destination.fetchingToken = True
        rate = destination.rate

        def later(delay: float) -> None:
            destination.tokenTimer = self.clock.callLater(max(delay, 0.001), self._pump)

        def taken(result: Any) -> None:
            destination.fetchingToken = False
            if self.ratesLocal:
                self.ratesLocal = False
                self.log.info("the store answers again: rate limits are cluster-wide again")
            if result.allowed:
                destination.tokens += 1
                self._pump()
            else:
                later(result.retry_after)

        def failed(failure: Failure) -> None:
            # The store is unreachable: pace locally at this node's share
            # of the rate (1/N of it for N live nodes), rather than stop
            # delivering or run unlimited.
            destination.fetchingToken = False
            share = rate if self.leases is None else self.leases.fallbackRate(rate)
            if self.leases is not None:
                # This node's bucket at its share, the one the lease keeper
                # takes from with a slot too.
                result = self.leases.takeLocalTokens(
                    f"rate:{destination.key}", rate, destination.burst
                )
            if not self.ratesLocal:
                self.ratesLocal = True
                self.log.warn(
                    "could not take a rate token for {destination} ({why}); every "
                    "rate limit is paced on this node at 1/{nodes} of its rate "
                    "until the store answers",
                    destination=destination.key,
                    why=failure.getErrorMessage() or failure.type.__name__,
                    nodes=round(rate / share),
                )
            if self.leases is None:
                destination.tokens += 1
                later(1 / share)
                self._pump()
            elif result.allowed:
                destination.tokens += 1
                self._pump()
            else:
                later(result.retry_after)

        d = maybeDeferred(
            self.store.takeTokens,
            f"rate:{destination.key}",
            rate,
            destination.burst,
            self.clock.seconds(),
        )
        d.addCallbacks(taken, failed)

    # -- cluster-wide connection slots (leases) ------------------------------

    def _waitingForLease(self, destination: Destination) -> bool:
        timer = destination.leaseTimer
        return destination.acquiring or (timer is not None and timer.active())

    def _acquireSlot(self, destination: Destination, withToken: bool = False) -> None:
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
        self._active += 1
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
            d = self.leases.acquire(resource, destination.maxConnections)

        def undo(tokenTaken: bool) -> None:
            # A token taken for this session (with the slot, or before it)
            # is kept for the next one.
            destination.acquiring = False
            destination.sessions -= 1
            self._active -= 1
            if destination.rate is not None and tokenTaken:
                destination.tokens += 1

        def acquired(result: Any) -> None:
            lease = result.lease
            if lease is None:
                undo(not withToken)
                if self.running:
                    # Spread a little, so that the nodes waiting for the
                    # same slot or token do not ask in lockstep (the first
                    # to ask winning every time).
                    delay = result.retryAfter * (1 + 0.25 * self.random.random())
                    destination.leaseTimer = self.clock.callLater(delay, self._pump)
                return
            if not self.running or not destination.queue:
                undo(True)
                lease.release()
                self._pump()
                return
            destination.acquiring = False
            job = destination.queue.popleft()
            destination.lastUsed = self.clock.seconds()
            self._served += 1
            destination.served = self._served
            self._startWorker(destination, job, lease=lease, counted=True)
            self._pump()

        def failed(failure: Failure) -> None:
            undo(not withToken)
            self.log.failure(
                "could not take a connection slot for {destination}",
                failure,
                destination=destination.key,
            )
            if self.running:
                destination.leaseTimer = self.clock.callLater(1.0, self._pump)

        d.addCallbacks(acquired, failed)

    def _startWorker(
        self, destination: Destination, job: _Job, lease: Any = None, counted: bool = False
    ) -> None:
        if not counted:
            destination.sessions += 1
            self._active += 1
        slot = _Slot(self, destination, lease=lease)
        worker = Deferred.fromCoroutine(self._worker(destination, job, slot))
        self._workers.add(worker)

        def finished(result: Any) -> None:
            self._workers.discard(worker)
            if isinstance(result, Failure):
                if result.check(CancelledError):
                    self.log.info(
                        "abandoned a delivery session to {destination}",
                        destination=destination.key,
                    )
                else:
                    self.log.failure(
                        "delivery session to {destination} failed unexpectedly",
                        result,
                        destination=destination.key,
                    )

        worker.addBoth(finished)

    def _yieldSlot(self, destination: Destination) -> bool:
        """
        Whether a session of C{destination} should close after its
        transaction so that a destination without any session gets the
        slot.
        """
        if self._active < self.maxConnections:
            return False
        return any(
            d is not destination and d.sessions == 0 and d.queue
            for d in self._waiting.values()
        )

    async def _worker(self, destination: Destination, job: Optional[_Job], slot: _Slot) -> None:
        """
        One session's life: open it for the first job, then run jobs of
        the destination until it is idle too long, has carried
        C{messagesPerConnection} transactions, or must make room.
        """
        session = None
        transactions = 0
        try:
            while job is not None:
                if session is None or not session.usable or session.remote not in job.hopNames:
                    if session is not None:
                        self._sessions.discard(session)
                        session.quit()
                    session = await self._open(destination, job)
                    if session is None:
                        return
                    self._sessions.add(session)
                    transactions = 0
                destination.busy += 1
                try:
                    await self._transact(destination, session, job)
                finally:
                    destination.busy -= 1
                transactions += 1
                job = None
                if (
                    not self.running
                    or not session.usable
                    or transactions >= destination.limits.messagesPerConnection
                    or destination.sessions > destination.maxConnections
                    or self._yieldSlot(destination)
                    or slot.lost
                ):
                    break
                job = await self._nextJob(destination, session, slot)
        finally:
            if session is not None:
                self._sessions.discard(session)
                # The slot is free once the connection is closed (QUIT is
                # answered, or aborted after a short timeout), so that
                # the peer never sees more sessions than the limit.
                await session.quit()
            slot.release()
            self._pump()

    def _nextJob(self, destination: Destination, session: Any, slot: _Slot) -> Deferred:
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
        self._pump()
        return idle.waiting

    async def _open(self, destination: Destination, job: _Job) -> Any:
        """
        Open a session for C{job}, trying its hops in order.  If none can
        be opened the job gets the last failure as its verdict (or, when
        other sessions to the destination work, goes back to the queue);
        returns L{None} then.
        """
        opened = None
        remote = None
        for index, hop in enumerate(job.hops):
            remote = hop.name
            opened = await self.connector.open(hop, destination.limits.tls)
            if opened.session is not None:
                destination.deadUntil = 0.0
                self._parking.recovered(destination.key)
                return opened.session
            if self._isThrottling(opened.reply):
                self._throttle(destination, opened.reply)
            if not (opened.tryNextHop and index + 1 < len(job.hops) and self.running):
                break
            self.log.info(
                "{destination}: {remote} unavailable ({reply}), trying {next}",
                destination=destination.key,
                remote=hop.name,
                reply=opened.reply.line,
                next=job.hops[index + 1].name,
            )
        reply = opened.reply
        if (
            not reply.permanent
            and destination.sessions > 1
            and job.requeued == 0
            and self.running
        ):
            # Other sessions to this destination work: this one was turned
            # away (too many connections, a flaky MX); the job waits for
            # one of them instead of a retry later.
            job.requeued += 1
            self._queue(destination, job, first=True)
            return None
        verdict = _Verdict(reply, remote, throttle=self._throttleDetail(destination, reply))
        self._settleJob(job, verdict)
        if destination.sessions <= 1 and not reply.permanent and self.running:
            # Nothing to this destination works: park what waits for it
            # and what comes until its next retry.
            self._parking.suspend(destination.key, reply, remote, job.addresses)
            while destination.queue:
                self._parkJob(destination, destination.queue.popleft())
        elif destination.sessions <= 1:
            # A dead destination: what waits for it, or comes in the next
            # moments, would only fail the same way.
            self._parking.refused(destination.key, reply)
            destination.deadUntil = self.clock.seconds() + DEAD_DESTINATION_TIME
            destination.deadVerdict = attrs.evolve(
                verdict,
                reply=attrs.evolve(
                    reply, text=f"delivery temporarily suspended: {reply.text}"
                ),
            )
            while destination.queue:
                self._settleJob(destination.queue.popleft(), verdict)
        return None

    async def _transact(self, destination: Destination, session: Any, job: _Job) -> None:
        entry = job.entry
        try:
            data = await maybeDeferred(self.spool.readMessage, entry)
        except CancelledError:
            raise
        except Exception:
            self.log.failure("could not read {queue_id} from the spool", queue_id=entry.queue_id)
            reply = Reply(451, "4.3.0", "local error: could not read the spooled message")
            self._settleJob(job, _Verdict(reply, None))
            return
        sender = entry.sender
        if self.rewrapper is not None:
            try:
                index = [r.address for r in entry.recipients].index(job.addresses[0])
                # Made for this session's server: downgraded where it cannot
                # take 8-bit content, then signed; sent as it is.
                sender, data = await self.rewrapper.rewrap(entry, index, data, session.offers)
            except CancelledError:
                raise
            except RewrapError as e:
                # A reason of its own (DKIM signing failed): deferred with it.
                self.log.error(
                    "could not re-wrap {queue_id} for {recipient}: {why}",
                    queue_id=entry.queue_id,
                    recipient=job.addresses[0],
                    why=str(e),
                )
                reply = Reply(451, "4.3.0", f"local error: {e}")
                self._settleJob(job, _Verdict(reply, None))
                return
            except Exception:
                self.log.failure(
                    "could not re-wrap {queue_id} for {recipient}",
                    queue_id=entry.queue_id,
                    recipient=job.addresses[0],
                )
                reply = Reply(451, "4.3.0", "local error: could not prepare the message")
                self._settleJob(job, _Verdict(reply, None))
                return
            if not session.usable:
                # The session went away while the message was prepared.
                if job.requeued == 0 and self.running:
                    job.requeued += 1
                    self._queue(destination, job, first=True)
                    return
                reply = Reply(451, "4.4.2", f"connection to {session.remote} lost")
                self._settleJob(job, _Verdict(reply, session.remote))
                return
        try:
            result = await session.send(sender, list(job.addresses), data)
        except CancelledError:
            self._release(job)
            raise
        except Exception:
            self.log.failure(
                "transaction for {queue_id} with {remote} failed unexpectedly",
                queue_id=entry.queue_id,
                remote=session.remote,
            )
            reply = Reply(451, "4.3.0", "local error during the SMTP transaction")
            self._settleJob(job, _Verdict(reply, session.remote))
            return
        if result.unanswered and job.requeued == 0 and self.running:
            # A reused connection that the server had closed meanwhile:
            # nothing was attempted, so try again on a fresh one.
            job.requeued += 1
            self._queue(destination, job, first=True)
            return
        throttle = None
        for reply in result.results.values():
            if self._isThrottling(reply):
                self._throttle(destination, reply)
                throttle = self._throttleDetail(destination, reply)
                break
        missing = Reply(451, "4.3.0", "local error: the attempt gave no result")
        self._settleJob(
            job,
            {
                a: _Verdict(
                    result.results.get(a, missing),
                    result.remote or None,
                    result.tls,
                    throttle=throttle if not result.results.get(a, missing).positive else None,
                )
                for a in job.addresses
            },
        )

    def _settleJob(self, job: _Job, verdicts: Any) -> None:
        if isinstance(verdicts, _Verdict):
            verdicts = {a: verdicts for a in job.addresses}
        d = self._settle(job.entry, verdicts)
        if d is not None:
            self._track(d)

    def _track(self, d: Deferred) -> None:
        self._inFlight.add(d)

        def finished(result: Any) -> None:
            self._inFlight.discard(d)
            if isinstance(result, Failure):
                self.log.failure("unexpected error in delivery scheduling", result)

        d.addBoth(finished)

    # -- throttling ------------------------------------------------------------

    def _isThrottling(self, reply: Optional[Reply]) -> bool:
        if reply is None or not 400 <= reply.code < 500:
            return False
        if reply.code == 421:
            return True
        line = reply.line
        return any(pattern.search(line) for pattern in self.throttlePatterns)

    def _throttleDetail(self, destination: Destination, reply: Reply) -> Optional[dict]:
        if not self._isThrottling(reply):
            return None
        return {
            "destination": destination.key,
            "max_connections": destination.maxConnections,
            "rate": destination.rate,
            "until": rfc3339(destination.throttle.until) if destination.throttle.until else None,
        }

    def _throttle(self, destination: Destination, reply: Reply) -> None:
        throttle = destination.throttle
        changed = throttle.trigger(reply.line)
        if changed:
            self.log.warn(
                "throttling {destination} to {connections} connections{rate} for "
                "{cooldown:g}s after: {reply}",
                destination=destination.key,
                connections=destination.maxConnections,
                rate=_rateText(destination.rate),
                cooldown=throttle.cooldown,
                reply=reply.line,
            )
        self._armRecovery(destination)

    def _armRecovery(self, destination: Destination) -> None:
        timer = destination.recoveryTimer
        if timer is not None and timer.active():
            timer.cancel()
        until = destination.throttle.until
        if until is None or not self.running:
            destination.recoveryTimer = None
            return
        destination.recoveryTimer = self.clock.callLater(
            max(0.0, until - self.clock.seconds()), self._recover, destination
        )

    def _throttleChanged(self, key: str) -> None:
        """
        Another node throttled C{key}, or its throttle changed in the
        cluster: apply its budget and recovery here.
        """
        destination = self._destinations.get(key)
        if destination is None:
            return
        self.log.info(
            "{destination} (throttled in the cluster): {connections} connections{rate}"
            "{state}",
            destination=key,
            connections=destination.maxConnections,
            rate=_rateText(destination.rate),
            state="" if destination.throttle.throttled else " (throttle lifted)",
        )
        self._armRecovery(destination)
        self._pump()

    def _recover(self, destination: Destination) -> None:
        destination.recoveryTimer = None
        if destination.throttle.recover():
            self.log.info(
                "{destination} recovering: {connections} connections{rate}{state}",
                destination=destination.key,
                connections=destination.maxConnections,
                rate=_rateText(destination.rate),
                state="" if destination.throttle.throttled else " (throttle lifted)",
            )
        self._armRecovery(destination)
        self._pump()

    # -- outcomes --------------------------------------------------------------

    def _settle(self, entry: SpoolEntry, verdicts: dict) -> Optional[Deferred]:
        """
        Turn verdicts into recipient changes and events, and record them.
        """
        now = self.clock.seconds()
        current = {r.address: r for r in entry.recipients}
        changes, events = [], []
        for address, verdict in verdicts.items():
            recipient = current.get(address)
            if recipient is None or recipient.final:
                self._busy.discard((entry.queue_id, address))
                continue
            change, event = self._outcome(entry, recipient, verdict, now)
            changes.append(change)
            events.append(event)
        if not changes:
            return None
        return self._record(entry, changes, events)

    def _outcome(
        self, entry: SpoolEntry, recipient: Recipient, verdict: _Verdict, now: float
    ) -> tuple:
        reply = verdict.reply
        attempts = recipient.attempts + 1
        status = reply.status or f"{reply.code // 100}.0.0"
        if verdict.suppressed:
            state, nextAttempt, attempts = "suppressed", recipient.next_attempt, recipient.attempts
            detail = {"reason": verdict.reason}
        elif reply.positive:
            state, nextAttempt = "delivered", recipient.next_attempt
            detail = {
                "remote": verdict.remote,
                "reply": reply.text,
                "code": reply.code,
                "tls": verdict.tls,
            }
        elif reply.permanent:
            state, nextAttempt = "bounced", recipient.next_attempt
            if verdict.reason:
                reason, kind = verdict.reason, bounceKind(verdict.reason, status)
            else:
                classified = classifyReply(
                    reply.status, reply.code, reply.text, reply.command, verdict.remote, recipient.address
                )
                reason, kind = classified.reason, classified.kind
            detail = {
                "kind": kind,
                "reason": reason,
                "status": status,
                "diagnostic": reply.line,
                "remote": verdict.remote,
                "source": "smtp",
            }
        else:
            if not 400 <= reply.code < 500:
                status = "4.0.0"
            delay = self.retry.delay(attempts)
            if self.jitter:
                delay *= 1 + self.jitter * self.random.random()
            nextAttempt = now + delay
            detail = {
                "reply": reply.text,
                "code": reply.code,
                "status": status,
                "remote": verdict.remote,
                "attempts": attempts,
            }
            if verdict.throttle is not None:
                detail["throttle"] = verdict.throttle
            if nextAttempt - entry.received > self.maxAge:
                state, nextAttempt = "expired", recipient.next_attempt
                detail = {"reason": "expired", "diagnostic": reply.line, **detail}
            else:
                state = "deferred"
                detail["next_attempt"] = rfc3339(nextAttempt)
        change = Recipient(
            address=recipient.address,
            state=state,
            attempts=attempts,
            next_attempt=nextAttempt,
        )
        override: tuple = ()
        if verdict.event is not None:
            # A transport's outcome: its own event type (or none), its detail.
            detail = {**detail, **verdict.eventDetail}
            override = (verdict.event,)
        # The log line's fields (MessageLog.outcome), beside the event's.
        line = {
            "delay": now - entry.received,
            "reply": (verdict.reason or "") if verdict.suppressed else reply.line,
            "relay": verdict.remote,
            "dsn": None if verdict.suppressed else status,
            "attempts": attempts,
            "next_attempt": detail.get("next_attempt"),
        }
        return change, (state, recipient.address, detail, line, *override)

    def _record(self, entry: SpoolEntry, changes: list, events: list) -> Deferred:
        """
        C{spool.record} the changes, then emit the events.  A failed record
        is logged and retried with back-off (once more, at once, when the
        service is stopping); the recipients stay busy meanwhile so they are
        not attempted twice.
        """
        done: Deferred = Deferred()

        def tryRecord(tries: int) -> None:
            d = maybeDeferred(self.spool.record, entry, changes)
            d.addCallbacks(recorded, failed, errbackArgs=(tries,))
            d.addErrback(
                lambda f: self.log.failure(
                    "unexpected error after recording {queue_id}", f,
                    queue_id=entry.queue_id,
                )
            )

        def recorded(_: Any) -> None:
            try:
                self._recorded(entry, changes, events)
            finally:
                done.callback(None)

        def failed(failure: Failure, tries: int) -> None:
            if not self.running and tries > 0:
                self.log.failure(
                    "could not record the outcome for {queue_id} before stopping; "
                    "{count} recipients will be attempted again after restart",
                    failure,
                    queue_id=entry.queue_id,
                    count=len(changes),
                )
                for change in changes:
                    self._busy.discard((entry.queue_id, change.address))
                done.callback(None)
                return
            delay = (
                min(self.recordRetryDelay * 2**tries, MAX_RECORD_RETRY_DELAY)
                if self.running
                else 0
            )
            self.log.failure(
                "could not record the outcome for {queue_id} "
                "({count} recipients); retrying in {delay}s",
                failure,
                queue_id=entry.queue_id,
                count=len(changes),
                delay=delay,
            )

            def again() -> None:
                self._recordRetries.discard(call)
                tryRecord(tries + 1)

            call = self.clock.callLater(delay, again)
            self._recordRetries.add(call)

        tryRecord(0)
        return done

    def _recorded(
        self,
        entry: SpoolEntry,
        changes: list,
        events: list,
        discard: bool = True,
        log: bool = True,
    ) -> None:
        if discard:
            for change in changes:
                self._busy.discard((entry.queue_id, change.address))
        for kind, address, detail, line, *override in events:
            eventType = override[0] if override else kind
            event = None
            if eventType:
                event = self.events.emit(
                    eventType,
                    entry.queue_id,
                    address,
                    tag=entry.tag,
                    metadata=entry.metadata or None,
                    detail=detail,
                )
            if log:
                self.messageLog.outcome(entry.queue_id, address, kind, **line)
            if kind == "deferred" and "suspended" not in detail:
                self._deferrals[(entry.queue_id, address)] = detail
            else:
                self._deferrals.pop((entry.queue_id, address), None)
            if eventType == "bounced" and self.bounces is not None:
                self._suppressBounce(event)
        if entry.done:
            self._cancelTimer(entry.queue_id)
            self._entries.pop(entry.queue_id, None)
        elif self.running:
            self._reschedule(entry)


    # -- parked recipients (smartrelay.outbound.parking) -----------------

    def _parkJob(self, destination: Destination, job: _Job) -> None:
        self._release(job)
        self._parking.park(destination.key, job.entry, job.addresses)

    def _recordParked(self, batch: list) -> None:
        """
        Record the deferrals of parked recipients, C{(entry, changes,
        events)} for each message, in one go (one group commit), then emit
        their events and log them a line per destination and up to
        L{MessageLog.PARKED_PER_LINE} recipients.  They stay parked (and
        may be released) meanwhile, so they are not marked busy; a failed
        record is not retried (it could land after a later outcome): its
        recipients stay parked, and their next deferral or outcome is
        recorded instead.
        """
        records = [maybeDeferred(self.spool.record, entry, changes) for entry, changes, _ in batch]

        def recorded(results: list) -> None:
            lines: dict = {}
            for (ok, value), (entry, changes, events) in zip(results, batch):
                if not ok:
                    self.log.failure(
                        "could not record the deferral of {count} parked recipients of "
                        "{queue_id}",
                        value,
                        count=len(changes),
                        queue_id=entry.queue_id,
                    )
                    continue
                self._recorded(entry, changes, events, discard=False, log=False)
                for _, address, detail, line in events:
                    key = (detail["suspended"], line["reply"], line["dsn"], line["next_attempt"])
                    lines.setdefault(key, []).append((entry.queue_id, address))
            for (destination, reply, dsn, nextAttempt), members in lines.items():
                self.messageLog.parked(destination, members, reply, dsn, nextAttempt)

        self._track(DeferredList(records, consumeErrors=True).addCallback(recorded))

    def _expireParked(self, entry: SpoolEntry, changes: list, events: list) -> None:
        """
        Record the expiry of recipients taken out of the parking, as any
        outcome (busy until recorded, retried if the record fails).
        """
        for change in changes:
            self._busy.add((entry.queue_id, change.address))
        self._track(self._record(entry, changes, events))

    def _unpark(self, entry: SpoolEntry, addresses: list) -> None:
        """
        Attempt released parked recipients now.
        """
        if not self.running or self._entries.get(entry.queue_id) is not entry:
            return
        pending = {r.address for r in self._idle(entry)}
        due = [a for a in addresses if a in pending]
        for address in due:
            self._busy.add((entry.queue_id, address))
        if due:
            self._track(self._dispatch(entry, due))

    def _suppressBounce(self, event) -> None:
        d = maybeDeferred(self.bounces.bounced, event)

        def failed(failure: Failure) -> None:
            # The bounce is recorded; the next one of the address tries again.
            self.log.warn(
                "could not put {recipient} on the suppression list after its bounce ({why})",
                recipient=event.recipient,
                why=failure.getErrorMessage() or failure.type.__name__,
            )

        self._track(d.addErrback(failed))


class DeliveryInProgress(Exception):
    """
    L{DeliveryScheduler.delete}: recipients of the message are being
    attempted right now.

    @ivar queue_id: the message.
    @ivar recipients: the addresses being attempted.
    """

    def __init__(self, queue_id: str, recipients: list) -> None:
        super().__init__(queue_id, recipients)
        self.queue_id = queue_id
        self.recipients = recipients

    def __str__(self) -> str:
        return f"{self.queue_id}: being delivered to {', '.join(self.recipients)} right now"


def _rateText(rate: Optional[float]) -> str:
    if rate is None:
        return ""
    return f", {rate * 60:g} messages/minute"
