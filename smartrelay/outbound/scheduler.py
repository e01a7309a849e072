"""
The delivery scheduler: the service that decides when each spooled
recipient is tried, routes it, queues it at its destination, hands it to a
pooled connection within the destination's limits, and turns replies into
durable state changes and events.

Life of a recipient::

    enqueue ─▶ timer at next_attempt ─▶ suppression check ─▶ route(domain)
      ─▶ destination queue ─▶ (connection slot, rate token) ─▶ pooled
      session: MAIL/RCPT/DATA ─▶ outcome ─▶ spool.record(...) ─▶
      events.emit(...) ─▶ next retry

L{DeliveryScheduler} is the service and the one face of delivery to the
rest of the relay (the SMTP server enqueues, the API inspects and steers);
it composes the parts, each in a module of its own:

* L{smartrelay.outbound.queue}: recipient state and retries (timers, busy
  recipients, the queue API's reads, retry now, delete);
* L{smartrelay.outbound.parking}: destinations that cannot be connected to,
  and what waits for them;
* L{smartrelay.outbound.checks}: the suppression list check (store, local
  replica, or hold);
* L{smartrelay.outbound.dispatch}: destinations, and handing their jobs to
  sessions under slots (leases), tokens, throttles and fairness;
* L{smartrelay.outbound.sessions}: the session loop;
* L{smartrelay.outbound.throttling}: adaptive throttles;
* L{smartrelay.outbound.outcomes}: verdicts → state changes, recorded in
  the spool before their events.

Its collaborators are given by interfaces
(L{smartrelay.outbound.interfaces}).  Destinations
(L{smartrelay.outbound.pool}) are domains, or providers grouping domains
by their MX host names.  A session is reused for up to
C{messagesPerConnection} transactions and kept open C{idleTimeout} seconds
with no work; the global C{maxConnections} bounds all sessions together.
"""

import random as _random
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

from smartrelay.cluster.leases import LeaseKeeper, LocalLeases
from smartrelay.deferreds import InFlight, whenAllDone
from smartrelay.logs import MessageLog
from smartrelay.message import SpoolEntry
from smartrelay.outbound.checks import SuppressionCheck
from smartrelay.outbound.dispatch import Dispatcher, Job, leaseResource
from smartrelay.outbound.outcomes import Outcomes, Recorder, Verdict
from smartrelay.outbound.parking import Parking
from smartrelay.outbound.pool import DestinationPolicy
from smartrelay.outbound.queue import DeliveryInProgress, RecipientQueue, recipientDomain
from smartrelay.outbound.router import NoRoute
from smartrelay.outbound.session import Reply
from smartrelay.outbound.sessions import SessionLoop
from smartrelay.outbound.throttling import Throttling
from smartrelay.outbound.transport import transportFor

__all__ = ["DeliveryScheduler", "DeliveryInProgress", "leaseResource"]


@attrs.define(eq=False, slots=False, repr=False)
class DeliveryScheduler(Service):
    """
    Schedules and runs deliveries of spooled messages.

    @ivar spool: an L{IDeliverySpool}.
    @ivar router: an L{IRouter}.
    @ivar connector: an L{IConnector} (L{smartrelay.outbound.pool.Connector}).
    @ivar events: an L{IEventSink} (L{smartrelay.events.EventLog}).
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
    @ivar rewrapper: an L{IRewrapper}, see below; L{None}: messages go out
        as stored.
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
    #: Takes a connection slot (and, with a rate, the first token) for
    #: every new session (L{smartrelay.cluster.leases.LeaseKeeper}): the
    #: destinations' limits hold across the nodes sharing the store.
    #: L{None}: a keeper of this node's own slots (over C{store}'s buckets).
    leases: Any = None
    #: Seconds an idle session holding a cluster-wide slot stays open (at
    #: most C{idleTimeout}), so that a slot is not kept from other nodes.
    leaseIdleTimeout: float = 2.0
    #: The local suppression replica
    #: (L{smartrelay.cluster.replica.SuppressionReplica}) checked while
    #: the store cannot be; a recipient is held when it is too old.  L{None}:
    #: recipients are held whenever the store cannot be asked.
    replica: Any = None
    #: The destinations' throttles kept with the other nodes sharing the
    #: store (L{smartrelay.cluster.throttle.ThrottleBoard}: C{throttle(key,
    #: onChange)}).  L{None}: a L{Throttle} of this node's own each.
    throttles: Any = None


    log = Logger()

    def __attrs_post_init__(self) -> None:
        running = lambda: self.running  # noqa: E731
        self._inFlight = InFlight(self.log)
        if self.leases is None:
            # One node's own slots, over the store's buckets for rates.
            tokens = self.store if hasattr(self.store, "takeTokens") else None
            self.leases = LeaseKeeper(LocalLeases(tokens=tokens), self.clock, shared=False)
        self._outcomes = Outcomes(self.retry, self.maxAge, self.jitter, self.random)
        self._parking = Parking(
            clock=self.clock,
            retry=self.retry,
            maxAge=self.maxAge,
            record=lambda batch: self._recorder.recordParked(batch),
            expire=lambda entry, changes, events: self._queue.expireParked(entry, changes, events),
            release=lambda entry, addresses: self._queue.unpark(entry, addresses),
            opening=self._opening,
            jitter=self.jitter,
            random=self.random,
        )
        self._queue = RecipientQueue(
            clock=self.clock,
            attempt=self._attempt,
            parking=self._parking,
            inFlight=self._inFlight,
            running=running,
        )
        self._recorder = Recorder(
            spool=self.spool,
            events=self.events,
            clock=self.clock,
            recorded=self._queue.recorded,
            unrecorded=self._queue.unrecorded,
            running=running,
            inFlight=self._inFlight,
            messageLog=self.messageLog,
            bounces=self.bounces,
            recordRetryDelay=self.recordRetryDelay,
        )
        self._queue.recorder = self._recorder
        self._throttling = Throttling(
            clock=self.clock,
            lookup=lambda key: self._dispatcher.destinations.get(key),
            pump=lambda: self._dispatcher.pump(),
            running=running,
            patterns=self.throttlePatterns,
            cooldown=self.throttleCooldown,
            board=self.throttles,
        )
        self._dispatcher = Dispatcher(
            clock=self.clock,
            maxConnections=self.maxConnections,
            leases=self.leases,
            parking=self._parking,
            throttleFor=self._throttling.throttleFor,
            settleJob=self._settleJob,
            parkJob=self._queue.parkJob,
            releaseJob=self._queue.releaseJob,
            running=running,
            tokens=self.store,
            idleTimeout=self.idleTimeout,
            leaseIdleTimeout=self.leaseIdleTimeout,
            random=self.random,
        )
        self._sessions = SessionLoop(
            dispatcher=self._dispatcher,
            connector=self.connector,
            spool=self.spool,
            throttling=self._throttling,
            parking=self._parking,
            settleJob=self._settleJob,
            parkJob=self._queue.parkJob,
            releaseJob=self._queue.releaseJob,
            running=running,
            rewrapper=self.rewrapper,
        )
        self._dispatcher.startSession = self._sessions.start
        self._check = (
            SuppressionCheck(self.store, self.clock, self.replica)
            if self.suppress and self.store is not None
            else None
        )

    def _opening(self, key: str) -> bool:
        destination = self._dispatcher.destinations.get(key)
        return destination is not None and destination.sessions > 0

    def __repr__(self) -> str:
        return (
            f"<DeliveryScheduler queued={len(self._queue)} "
            f"sessions={self._dispatcher.active} "
            f"destinations={len(self._dispatcher.destinations)}>"
        )

    # -- public API ----------------------------------------------------------

    def enqueue(self, entry: SpoolEntry) -> None:
        """
        Take charge of C{entry}: its non-final recipients are tried at their
        C{next_attempt} (soon, if that is in the past; never synchronously).
        Enqueueing a queue id twice keeps the first entry object.
        """
        known = self._queue.add(entry)
        if known is not None and self.running and not self.hold:
            self._queue.schedule(known)

    def release(self) -> None:
        """
        End a hold (C{[delivery] hold}): schedule everything queued.
        """
        self.hold = False
        if self.running:
            self._queue.scheduleAll()

    def retryNow(self, queue_id: str) -> bool:
        """
        Attempt every waiting recipient of C{queue_id} now.

        @return: C{False} if the message is unknown, finished, or all its
            recipients are already being attempted.
        """
        if not self.running:
            return False
        return self._queue.retryNow(queue_id)

    def retryDomain(self, domain: str) -> int:
        """
        Attempt every waiting recipient at C{domain} now.

        @return: the number of messages with recipients woken.
        """
        if not self.running:
            return 0
        return self._queue.retryDomain(domain)

    def queued(self) -> int:
        """
        The number of messages with recipients still to deliver.
        """
        return len(self._queue)

    @property
    def pendingEntries(self) -> Iterable[SpoolEntry]:
        """
        The messages with recipients still to deliver, in no order: a live
        view of the scheduler's own entries, to be read (on the reactor
        thread) and never changed; C{/metrics} sums it by domain.
        """
        return self._queue.pending

    @property
    def ratesLocal(self) -> bool:
        """
        Whether the last rate token (or connection slot) could not be taken
        from the store: rates are then paced locally, at this node's share.
        """
        return self._dispatcher.ratesLocal

    @property
    def activeSessions(self) -> int:
        """
        Sessions open or being opened, in all.
        """
        return self._dispatcher.active

    def destinations(self) -> list:
        """
        The state of every destination seen (queue, sessions, limits,
        throttle), for the API, the UI and C{/metrics}.
        """
        return self._dispatcher.state()

    # -- queue inspection and control (the HTTP API) --------------------------

    def queuedMessages(self) -> list:
        """
        The messages with recipients still to deliver, oldest first: the
        scheduler's own L{SpoolEntry} objects, to be read, never changed.
        """
        return sorted(self._queue.pending, key=lambda e: (e.received, e.queue_id))

    def queuedMessage(self, queue_id: str) -> Optional[SpoolEntry]:
        """
        The queued message C{queue_id} (to be read only), or L{None}.
        """
        return self._queue.entries.get(queue_id)

    def attempting(self, queue_id: str) -> set:
        """
        The recipients of C{queue_id} being attempted right now (routed,
        waiting for a session, or in a transaction).
        """
        return self._queue.attempting(queue_id)

    def lastDeferral(self, queue_id: str, address: str) -> Optional[dict]:
        """
        The C{detail} of the last C{deferred} event of a waiting recipient
        in this run, or L{None}.
        """
        return self._queue.lastDeferral(queue_id, address)

    def delete(self, queue_id: str, reason: str = "deleted") -> Deferred:
        """
        Give up on every waiting recipient of C{queue_id}: none of them is
        attempted again; each gets the final state C{expired} (in the spool
        first) and an C{expired} event whose detail C{reason} is C{reason}.
        Jobs still waiting for a session are taken back first.

        @return: a L{Deferred} firing with the addresses given up, once the
            spool has recorded them and their events are written (so that
            whoever asked reads them at once).
        @raise KeyError: C{queue_id} is not queued.
        @raise DeliveryInProgress: some recipients are being attempted right
            now (in a transaction); nothing was changed.
        """
        entry = self._queue.entries.get(queue_id)
        if entry is None:
            raise KeyError(queue_id)
        self._dispatcher.takeBack(entry)
        d = self._queue.delete(entry, reason)
        return d.addCallback(
            lambda addresses: maybeDeferred(self.events.flushed).addCallback(lambda _: addresses)
        )

    def startService(self) -> None:
        Service.startService(self)
        if self.hold:
            self.log.info("delivery is on hold: messages are accepted and queued only")
            return
        self._queue.scheduleAll()

    def stopService(self) -> Deferred:
        """
        Stop starting transactions, cancel timers, close idle sessions, and
        wait (at most C{shutdownTimeout} seconds) for transactions in flight
        and their spool records.  What is left stays in the spool for the
        next start.
        """
        Service.stopService(self)
        self._queue.stop()
        self._dispatcher.stop()
        self._recorder.stop()
        workers = self._sessions.workers
        pending = lambda: workers | self._inFlight.pending  # noqa: E731
        if not pending():
            return succeed(None)
        self.log.info(
            "waiting up to {timeout}s for {count} deliveries in progress",
            timeout=self.shutdownTimeout,
            count=len(workers),
        )
        done: Deferred = Deferred()

        def giveUp() -> None:
            self.log.warn(
                "{count} deliveries still in progress after {timeout}s; "
                "abandoning them (their recipients stay in the spool)",
                count=len(workers),
                timeout=self.shutdownTimeout,
            )
            self._sessions.abandon()
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
        whenAllDone(pending).addCallback(finished)
        return done

    # -- an attempt: suppression check, transports, routing ------------------

    def _attempt(self, entry: SpoolEntry, addresses: list) -> Deferred:
        """
        Check C{addresses} (busy) against the suppression list, then route
        the others and queue them at their destinations.
        """
        if self._check is None:
            return self._route(entry, addresses)

        def checked(verdicts: dict) -> Any:
            if verdicts:
                self._track(self._settle(entry, verdicts) or succeed(None))
            rest = [a for a in addresses if a not in verdicts]
            return self._route(entry, rest) if rest else None

        return self._check.check(addresses).addCallback(checked)

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
            byDomain.setdefault(recipientDomain(address), []).append(address)
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
            dispatcher = self._dispatcher
            for (key, _), (limits, hops, group) in groups.items():
                destination = dispatcher.destination(key, limits)
                for start in range(0, len(group), size):
                    job = Job(entry, hops, group[start : start + size])
                    if self.running:
                        dispatcher.queue(destination, job)
                    else:
                        self._queue.releaseJob(job)
            dispatcher.pump()
            if verdicts:
                return self._settle(entry, verdicts)
            return None

        return DeferredList(lookups, consumeErrors=True).addCallback(routed)

    def _unroutable(self, entry: SpoolEntry, domain: str, failure: Optional[Failure]) -> Verdict:
        if failure is not None and failure.check(NoRoute):
            noRoute = failure.value
            code = 550 if noRoute.permanent else 451
            return Verdict(
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
            return Verdict(Reply(451, "4.3.0", f"internal error routing {domain}"), None)
        return Verdict(Reply(451, "4.4.3", f"no route to {domain}"), None)

    # -- transports (SMS) --------------------------------------------------

    def _handToTransports(self, entry: SpoolEntry, addresses: list) -> list:
        """
        Start a delivery by its transport for each address a transport
        claims; return the others.
        """
        rest = []
        for address in addresses:
            transport = transportFor(self.transports, recipientDomain(address))
            if transport is None:
                rest.append(address)
            else:
                self._track(Deferred.fromCoroutine(self._viaTransport(transport, entry, address)))
        return rest

    async def _viaTransport(self, transport: Any, entry: SpoolEntry, address: str) -> None:
        try:
            data = await maybeDeferred(self.spool.readMessage, entry)
            outcome = await maybeDeferred(transport.deliver, entry, address, data)
            verdict = Verdict(
                outcome.reply, outcome.remote, event=outcome.event,
                eventDetail=dict(outcome.detail),
            )
        except CancelledError:
            self._queue.release(entry.queue_id, [address])
            raise
        except Exception:
            self.log.failure(
                "delivery of {queue_id} to {recipient} failed unexpectedly",
                queue_id=entry.queue_id,
                recipient=address,
            )
            verdict = Verdict(Reply(451, "4.3.0", "local error during the delivery"), None)
        d = self._settle(entry, {address: verdict})
        if d is not None:
            await d

    # -- outcomes --------------------------------------------------------------

    def _settle(self, entry: SpoolEntry, verdicts: dict) -> Optional[Deferred]:
        """
        Turn verdicts into recipient changes and events, and record them.
        """
        changes, events, skipped = self._outcomes.settle(entry, verdicts, self.clock.seconds())
        self._queue.release(entry.queue_id, skipped)
        if not changes:
            return None
        return self._recorder.record(entry, changes, events)

    def _settleJob(self, job: Job, verdicts: Any) -> None:
        if isinstance(verdicts, Verdict):
            verdicts = {a: verdicts for a in job.addresses}
        d = self._settle(job.entry, verdicts)
        if d is not None:
            self._track(d)

    def _track(self, d: Deferred) -> None:
        self._inFlight.track(d)
