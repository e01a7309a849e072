# -*- test-case-name: tests.test_outbound_scheduler -*-
"""
From a reply to a durable outcome: what state a recipient's attempt leads
to (L{Outcomes}), and recording it — the spool first, then its event, its
log line and, for a bounce, the suppression list (L{Recorder}).

Outcomes: 2xx → C{delivered}; 5xx → C{bounced} (kind and reason from the
reply); 4xx or network trouble → C{deferred} with the next attempt from the
retry schedule (plus jitter), or C{expired} once the message would be older
than C{maxAge}.  A state change is always recorded in the spool before its
event is emitted; a failed record is logged and retried, never dropped.
"""

import random as _random
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.deferreds import InFlight
from smartrelay.events import rfc3339
from smartrelay.feedback.reasons import bounceKind, classifyReply
from smartrelay.logs import MessageLog
from smartrelay.message import Recipient, SpoolEntry
from smartrelay.outbound.session import Reply

__all__ = ["Verdict", "Outcomes", "Recorder", "MAX_RECORD_RETRY_DELAY"]

#: Longest wait between two tries of a failed C{spool.record}.
MAX_RECORD_RETRY_DELAY = 300.0


@attrs.frozen
class Verdict:
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
class Outcomes:
    """
    Turns verdicts into recipient changes and events.

    @ivar retry: C{delay(attempts) -> seconds}, C{attempts} counting the
        attempt that just failed.
    @ivar maxAge: seconds after C{entry.received} at which a recipient that
        still fails temporarily expires.
    @ivar jitter: retry delays are stretched by up to this fraction.
    """

    retry: Any
    maxAge: float
    jitter: float = 0.0
    random: Any = attrs.field(factory=_random.Random)

    def settle(self, entry: SpoolEntry, verdicts: dict, now: float) -> tuple:
        """
        The changes and events of C{verdicts} for the recipients of
        C{entry} that are not final yet, and the addresses that are (or
        are unknown).

        @return: C{(changes, events, skipped)}.
        """
        current = {r.address: r for r in entry.recipients}
        changes, events, skipped = [], [], []
        for address, verdict in verdicts.items():
            recipient = current.get(address)
            if recipient is None or recipient.final:
                skipped.append(address)
                continue
            change, event = self.outcome(entry, recipient, verdict, now)
            changes.append(change)
            events.append(event)
        return changes, events, skipped

    def outcome(self, entry: SpoolEntry, recipient: Recipient, verdict: Verdict, now: float) -> tuple:
        """
        One recipient's change, and its event as C{(state, address, detail,
        line, *override)}: C{line} the fields of its log line, C{override}
        a transport's event type.
        """
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
                    reply.status, reply.code, reply.text, reply.command, verdict.remote,
                    recipient.address,
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


@attrs.define(eq=False)
class Recorder:
    """
    Records outcomes: C{spool.record} the changes, then emit their events,
    write their log lines and tell C{bounces} of each bounce.

    @ivar spool: an L{IDeliverySpool <smartrelay.outbound.interfaces.IDeliverySpool>}.
    @ivar events: an L{IEventSink <smartrelay.outbound.interfaces.IEventSink>}.
    @ivar recorded: C{recorded(entry, changes, events, discard)}, the
        queue's bookkeeping once a record is durable (before its events):
        C{discard} says whether the recipients were busy.
    @ivar unrecorded: C{unrecorded(entry, changes)}: the scheduler stopped
        and the changes could not be recorded (their recipients are tried
        again after the restart).
    @ivar running: whether the scheduler runs (a failed record is retried
        with back-off while it does, once more at once when it stops).
    @ivar inFlight: where the records and bounce suppressions are tracked.
    """

    spool: Any
    events: Any
    clock: Any
    recorded: Callable
    unrecorded: Callable
    running: Callable[[], bool]
    inFlight: InFlight
    messageLog: MessageLog = attrs.field(factory=MessageLog)
    bounces: Any = None
    recordRetryDelay: float = 10.0
    _retries: set = attrs.field(factory=set, init=False)

    log = Logger()

    def record(self, entry: SpoolEntry, changes: list, events: list) -> Deferred:
        """
        C{spool.record} the changes, then emit the events.  A failed record
        is logged and retried with back-off (once more, at once, when the
        scheduler is stopping); the recipients stay busy meanwhile so they
        are not attempted twice.

        @return: a L{Deferred} firing once recorded and told (or given up
            on when stopping).
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
                self.recorded(entry, changes, events, True)
                self.tell(entry, events)
            finally:
                done.callback(None)

        def failed(failure: Failure, tries: int) -> None:
            running = self.running()
            if not running and tries > 0:
                self.log.failure(
                    "could not record the outcome for {queue_id} before stopping; "
                    "{count} recipients will be attempted again after restart",
                    failure,
                    queue_id=entry.queue_id,
                    count=len(changes),
                )
                self.unrecorded(entry, changes)
                done.callback(None)
                return
            delay = (
                min(self.recordRetryDelay * 2**tries, MAX_RECORD_RETRY_DELAY) if running else 0
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
                self._retries.discard(call)
                tryRecord(tries + 1)

            call = self.clock.callLater(delay, again)
            self._retries.add(call)

        tryRecord(0)
        return done

    def recordParked(self, batch: list) -> None:
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
        # One group commit, one Deferred (not one a message).
        recording = maybeDeferred(
            self.spool.recordMany, [(entry, changes) for entry, changes, _ in batch]
        )

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
                self.recorded(entry, changes, events, False)
                self.tell(entry, events, log=False)
                for _, address, detail, line in events:
                    key = (detail["suspended"], line["reply"], line["dsn"], line["next_attempt"])
                    lines.setdefault(key, []).append((entry.queue_id, address))
            for (destination, reply, dsn, nextAttempt), members in lines.items():
                self.messageLog.parked(destination, members, reply, dsn, nextAttempt)

        def failed(failure: Failure) -> None:
            # As a failed record of each: they stay parked.
            self.log.failure(
                "could not record the deferrals of {count} parked messages",
                failure,
                count=len(batch),
            )

        self.inFlight.track(recording.addCallbacks(recorded, failed))

    def tell(self, entry: SpoolEntry, events: list, log: bool = True) -> None:
        """
        Emit the recorded outcomes' events, write their log lines (if
        C{log}), and put bounced recipients on the suppression list.
        """
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
            if eventType == "bounced" and self.bounces is not None:
                self._suppressBounce(event)

    def _suppressBounce(self, event) -> None:
        d = maybeDeferred(self.bounces.bounced, event)

        def failed(failure: Failure) -> None:
            # The bounce is recorded; the next one of the address tries again.
            self.log.warn(
                "could not put {recipient} on the suppression list after its bounce ({why})",
                recipient=event.recipient,
                why=failure.getErrorMessage() or failure.type.__name__,
            )

        self.inFlight.track(d.addErrback(failed))

    def stop(self) -> None:
        """
        The scheduler stops: retry the failed records at once (a last try).
        """
        for call in list(self._retries):
            if call.active():
                call.reset(0)
