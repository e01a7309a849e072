"""
The delivery scheduler: decides when each spooled recipient is tried, runs
attempts through a router and a deliverer with a bounded number of
connections, and turns replies into durable state changes and events.

Life of a recipient::

    enqueue ─▶ timer at next_attempt ─▶ route(domain) ─▶ FIFO work queue
      ─▶ (connection slot) deliverer(hop, ...) ─▶ outcome
      ─▶ spool.record(...) ─▶ events.emit(...) ─▶ timer for the next retry

Outcomes: 2xx → C{delivered}; 5xx → C{bounced} (hard); 4xx or network
trouble → C{deferred} with the next attempt from the retry schedule, or
C{expired} once the message would be older than C{maxAge}.  A state change
is always recorded in the spool before its event is emitted; a failed
record is logged and retried, never dropped.

The router, the deliverer and the retry schedule are plain injected
objects so that a fuller MTA engine (pooling, per-domain limits) can
replace any of them.
"""

from collections import deque
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

from smartrelay.events import rfc3339
from smartrelay.outbound.classify import classify
from smartrelay.outbound.client import AttemptResult, Reply
from smartrelay.outbound.router import NoRoute
from smartrelay.spool import Recipient, SpoolEntry

__all__ = ["DeliveryScheduler"]

#: Longest wait between two tries of a failed C{spool.record}.
MAX_RECORD_RETRY_DELAY = 300.0


@attrs.frozen
class _Verdict:
    """
    The reply one recipient got, and where from.
    """

    reply: Reply
    remote: Optional[str]
    tls: bool = False
    reason: Optional[str] = None


@attrs.frozen
class _Job:
    """
    One attempt waiting for a connection slot.
    """

    entry: SpoolEntry
    hops: list
    addresses: list


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define(eq=False, slots=False, repr=False)
class DeliveryScheduler(Service):
    """
    Schedules and runs delivery attempts for spooled messages.

    @ivar spool: C{readMessage(entry) -> Deferred[bytes]} and
        C{record(entry, changes) -> Deferred[None]}.
    @ivar router: an L{IRouter}.
    @ivar deliverer: C{(hop, sender, recipients, data, heloName, timeout)
        -> Deferred[AttemptResult]}, e.g. C{partial(deliver, reactor)}.
    @ivar events: C{emit(type, queue_id, recipient, detail=...)}.
    @ivar clock: an L{IReactorTime}.
    @ivar retry: C{delay(attempts) -> seconds}, C{attempts} counting the
        attempt that just failed (1 after the first failure), e.g.
        L{smartrelay.config.RetrySchedule}.
    @ivar maxAge: seconds after C{entry.received} at which a recipient that
        still fails temporarily expires.
    @ivar maxConnections: attempts (connections) in flight at most.
    @ivar timeout: passed to the deliverer (connect and per-reply timeout).
    @ivar shutdownTimeout: how long L{stopService} waits for attempts in
        flight before abandoning them.
    @ivar recordRetryDelay: first delay before retrying a failed
        C{spool.record} (doubling up to L{MAX_RECORD_RETRY_DELAY}).
    @ivar maxRecipientsPerAttempt: RCPTs per transaction (RFC 5321 4.5.3.1.8).
    """

    spool: Any
    router: Any
    deliverer: Any
    events: Any
    clock: Any
    retry: Any
    maxAge: float
    maxConnections: int = attrs.field(validator=attrs.validators.ge(1))
    heloName: str = attrs.field()
    timeout: float = attrs.field()
    shutdownTimeout: float = 30.0
    recordRetryDelay: float = 10.0
    maxRecipientsPerAttempt: int = 100
    #: Accept and queue, but start no attempts until L{release} (or an
    #: explicit L{retryNow}).
    hold: bool = False

    _entries: dict = attrs.field(factory=dict, init=False)
    _timers: dict = attrs.field(factory=dict, init=False)
    _busy: set = attrs.field(factory=set, init=False)
    _work: deque = attrs.field(factory=deque, init=False)
    _active: int = attrs.field(default=0, init=False)
    _pumping: bool = attrs.field(default=False, init=False)
    _attempts: set = attrs.field(factory=set, init=False)
    _inFlight: set = attrs.field(factory=set, init=False)
    _recordRetries: set = attrs.field(factory=set, init=False)

    log = Logger()

    def __repr__(self) -> str:
        return (
            f"<DeliveryScheduler queued={len(self._entries)} "
            f"active={self._active} waiting={len(self._work)}>"
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
        return self._wake(queue_id, force=True)

    def queued(self) -> int:
        """
        The number of messages with recipients still to deliver.
        """
        return len(self._entries)

    def startService(self) -> None:
        Service.startService(self)
        if self.hold:
            self.log.info("delivery is on hold: messages are accepted and queued only")
            return
        for entry in list(self._entries.values()):
            self._reschedule(entry)

    def stopService(self) -> Deferred:
        """
        Stop starting attempts, cancel timers, and wait (at most
        C{shutdownTimeout} seconds) for attempts in flight and their spool
        records.  What is left stays in the spool for the next start.
        """
        Service.stopService(self)
        for queue_id in list(self._timers):
            self._cancelTimer(queue_id)
        while self._work:
            self._release(self._work.popleft())
        for call in list(self._recordRetries):
            if call.active():
                call.reset(0)
        if not self._inFlight:
            return succeed(None)
        self.log.info(
            "waiting up to {timeout}s for {count} deliveries in progress",
            timeout=self.shutdownTimeout,
            count=len(self._attempts),
        )
        done: Deferred = Deferred()

        def giveUp() -> None:
            self.log.warn(
                "{count} deliveries still in progress after {timeout}s; "
                "abandoning them (their recipients stay in the spool)",
                count=len(self._attempts),
                timeout=self.shutdownTimeout,
            )
            for attempt in list(self._attempts):
                attempt.cancel()
            if not done.called:
                done.callback(None)

        timer = self.clock.callLater(self.shutdownTimeout, giveUp)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        DeferredList(list(self._inFlight)).addCallback(finished)
        return done

    # -- timers --------------------------------------------------------------

    def _cancelTimer(self, queue_id: str) -> None:
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _idle(self, entry: SpoolEntry) -> list:
        return [r for r in entry.pending() if (entry.queue_id, r.address) not in self._busy]

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

    def _wake(self, queue_id: str, force: bool = False) -> bool:
        """
        Start attempts for the recipients of C{queue_id} that are due (all
        waiting ones if C{force}).
        """
        self._timers.pop(queue_id, None)
        entry = self._entries.get(queue_id)
        if entry is None or not self.running:
            return False
        now = self.clock.seconds()
        due = [r for r in self._idle(entry) if force or r.next_attempt <= now]
        for recipient in due:
            self._busy.add((queue_id, recipient.address))
        self._reschedule(entry)
        if due:
            self._track(self._dispatch(entry, [r.address for r in due]))
        return bool(due)

    # -- routing and the work queue ------------------------------------------

    def _dispatch(self, entry: SpoolEntry, addresses: list) -> Deferred:
        """
        Route C{addresses} and queue one job per hop list; recipients that
        cannot be routed get their verdict at once.
        """
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
                    key = frozenset(hop.name for hop in value)
                    groups.setdefault(key, (list(value), []))[1].extend(byDomain[domain])
                else:
                    verdict = self._unroutable(entry, domain, None if ok else value)
                    for address in byDomain[domain]:
                        verdicts[address] = verdict
            size = max(1, self.maxRecipientsPerAttempt)
            for hops, group in groups.values():
                for start in range(0, len(group), size):
                    job = _Job(entry, hops, group[start : start + size])
                    if self.running:
                        self._work.append(job)
                    else:
                        self._release(job)
            self._pump()
            if verdicts:
                return self._settle(entry, verdicts)
            return None

        return DeferredList(lookups, consumeErrors=True).addCallback(routed)

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

    def _release(self, job: _Job) -> None:
        for address in job.addresses:
            self._busy.discard((job.entry.queue_id, address))

    def _pump(self) -> None:
        """
        Start queued jobs, oldest first, while connection slots are free.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while self.running and self._work and self._active < self.maxConnections:
                self._start(self._work.popleft())
        finally:
            self._pumping = False

    def _start(self, job: _Job) -> None:
        self._active += 1
        attempt = Deferred.fromCoroutine(self._attempt(job))
        self._attempts.add(attempt)

        def slotFree(result: Any) -> Any:
            self._attempts.discard(attempt)
            self._active -= 1
            self._pump()
            return result

        def abandoned(failure: Failure) -> None:
            self._release(job)
            if failure.check(CancelledError):
                self.log.info(
                    "abandoned the attempt for {queue_id} ({count} recipients)",
                    queue_id=job.entry.queue_id,
                    count=len(job.addresses),
                )
            else:
                self.log.failure(
                    "attempt for {queue_id} failed unexpectedly",
                    failure,
                    queue_id=job.entry.queue_id,
                )

        attempt.addBoth(slotFree)
        attempt.addCallbacks(lambda verdicts: self._settle(job.entry, verdicts), abandoned)
        self._track(attempt)

    def _track(self, d: Deferred) -> None:
        self._inFlight.add(d)

        def finished(result: Any) -> None:
            self._inFlight.discard(d)
            if isinstance(result, Failure):
                self.log.failure("unexpected error in delivery scheduling", result)

        d.addBoth(finished)

    # -- one attempt -----------------------------------------------------------

    async def _attempt(self, job: _Job) -> dict:
        """
        Read the message and try the hops in order; return a verdict per
        recipient.  Unexpected failures become temporary verdicts.
        """
        entry = job.entry
        try:
            data = await maybeDeferred(self.spool.readMessage, entry)
        except CancelledError:
            raise
        except Exception:
            self.log.failure("could not read {queue_id} from the spool", queue_id=entry.queue_id)
            reply = Reply(451, "4.3.0", "local error: could not read the spooled message")
            return {a: _Verdict(reply, None) for a in job.addresses}

        result = AttemptResult(remote="", tls=False, results={})
        for index, hop in enumerate(job.hops):
            try:
                result = await maybeDeferred(
                    self.deliverer,
                    hop,
                    entry.sender,
                    list(job.addresses),
                    data,
                    self.heloName,
                    self.timeout,
                )
            except CancelledError:
                raise
            except Exception:
                self.log.failure(
                    "attempt for {queue_id} via {remote} failed unexpectedly",
                    queue_id=entry.queue_id,
                    remote=hop.name,
                )
                result = AttemptResult(remote=hop.name, tls=False, results={})
                break
            if result.tryNextHop and index + 1 < len(job.hops) and self.running:
                self.log.info(
                    "{queue_id}: {remote} unavailable, trying {next}",
                    queue_id=entry.queue_id,
                    remote=hop.name,
                    next=job.hops[index + 1].name,
                )
                continue
            break

        missing = Reply(451, "4.3.0", "local error: the attempt gave no result")
        return {
            a: _Verdict(result.results.get(a, missing), result.remote or None, result.tls)
            for a in job.addresses
        }

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
        if reply.positive:
            state, nextAttempt = "delivered", recipient.next_attempt
            detail = {
                "remote": verdict.remote,
                "reply": reply.text,
                "code": reply.code,
                "tls": verdict.tls,
            }
        elif reply.permanent:
            state, nextAttempt = "bounced", recipient.next_attempt
            detail = {
                "kind": "hard",
                "reason": verdict.reason or classify(reply.status, reply.text),
                "status": status,
                "diagnostic": reply.line,
                "remote": verdict.remote,
            }
        else:
            if not 400 <= reply.code < 500:
                status = "4.0.0"
            delay = self.retry.delay(attempts)
            nextAttempt = now + delay
            detail = {
                "reply": reply.text,
                "code": reply.code,
                "status": status,
                "remote": verdict.remote,
                "attempts": attempts,
            }
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
        return change, (state, recipient.address, detail)

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

    def _recorded(self, entry: SpoolEntry, changes: list, events: list) -> None:
        for change in changes:
            self._busy.discard((entry.queue_id, change.address))
        for kind, address, detail in events:
            self.events.emit(kind, entry.queue_id, address, detail=detail)
            self._logOutcome(kind, entry.queue_id, address, detail)
        if entry.done:
            self._cancelTimer(entry.queue_id)
            self._entries.pop(entry.queue_id, None)
        elif self.running:
            self._reschedule(entry)

    def _logOutcome(self, kind: str, queue_id: str, recipient: str, detail: dict) -> None:
        # Deliveries are recorded as events only: a log line per delivered
        # recipient costs more reactor time than the delivery's bookkeeping.
        # Bounces, deferrals and expiries are rarer and worth a line.
        if kind == "delivered":
            return
        if detail.get("remote") is None:
            detail = dict(detail, remote="(no connection)")
        if kind == "bounced":
            self.log.info(
                "bounced {queue_id} to {recipient} ({reason}) from {remote}: {diagnostic}",
                queue_id=queue_id, recipient=recipient, **detail,
            )
        elif kind == "deferred":
            self.log.info(
                "deferred {queue_id} to {recipient} (attempt {attempts}) from "
                "{remote}: {code} {reply}; next attempt {next_attempt}",
                queue_id=queue_id, recipient=recipient, **detail,
            )
        else:
            self.log.warn(
                "expired {queue_id} to {recipient} after {attempts} attempts: "
                "{diagnostic}",
                queue_id=queue_id, recipient=recipient, **detail,
            )
