# -*- test-case-name: tests.test_outbound_scheduler,tests.test_outbound_parking -*-
"""
The queue of recipient state and retries: the spooled messages with work
left, a timer per message for its earliest waiting recipient, the
recipients being attempted right now (C{busy}), those parked at a
suspended destination, and the last deferral of each, for the queue API.

Life of a recipient::

    enqueue ─▶ timer at next_attempt ─▶ attempt (suppression check, route,
      destination queue, session) ─▶ outcome recorded ─▶ next timer, or done

A recipient is in at most one of: waiting for its timer, busy (being
attempted, or its outcome being recorded), parked.
"""

from collections.abc import Iterable
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, succeed

from smartrelay.deferreds import InFlight
from smartrelay.message import Recipient, SpoolEntry

__all__ = ["RecipientQueue", "DeliveryInProgress", "recipientDomain"]


def recipientDomain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@attrs.define(eq=False)
class RecipientQueue:
    """
    The messages with recipients still to deliver, and when each is tried.

    @ivar attempt: C{attempt(entry, addresses) -> Deferred}: start attempts
        of C{addresses} (marked busy) of C{entry}.
    @ivar recorder: the L{Recorder <smartrelay.outbound.outcomes.Recorder>}
        (for deletes and expiries of parked recipients).
    @ivar parking: the L{Parking <smartrelay.outbound.parking.Parking>}.
    @ivar running: whether recipients are being scheduled.
    """

    clock: Any
    attempt: Callable[[SpoolEntry, list], Deferred]
    parking: Any
    inFlight: InFlight
    running: Callable[[], bool]
    recorder: Any = None

    entries: dict = attrs.field(factory=dict, init=False)
    _timers: dict = attrs.field(factory=dict, init=False)
    #: (queue id, address) of the recipients being attempted.
    busy: set = attrs.field(factory=set, init=False)
    #: The detail of each waiting recipient's last C{deferred} event, by
    #: (queue id, address), for the queue API (not kept across restarts;
    #: a parked recipient's is made from its suspension when asked).
    _deferrals: dict = attrs.field(factory=dict, init=False)

    # -- taking messages -----------------------------------------------------

    def add(self, entry: SpoolEntry) -> Optional[SpoolEntry]:
        """
        Take charge of C{entry} (the first entry object of a queue id is
        kept); L{None} if it has nothing left to do.
        """
        known = self.entries.get(entry.queue_id)
        if known is None:
            if entry.done:
                return None
            self.entries[entry.queue_id] = known = entry
        return known

    def schedule(self, entry: SpoolEntry) -> None:
        """
        Recipients at a domain whose destination is suspended wait there,
        with no timer and no attempt of their own; the others get the
        entry's timer.
        """
        self.parking.admit(entry, self.idle(entry), self.clock.seconds())
        self.reschedule(entry)

    def scheduleAll(self) -> None:
        for entry in list(self.entries.values()):
            self.reschedule(entry)

    def stop(self) -> None:
        for queue_id in list(self._timers):
            self.cancelTimer(queue_id)
        self.parking.stop()

    # -- reading -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def pending(self) -> Iterable[SpoolEntry]:
        return self.entries.values()

    def attempting(self, queue_id: str) -> set:
        """
        The recipients of C{queue_id} being attempted right now.
        """
        return {address for (q, address) in self.busy if q == queue_id}

    def lastDeferral(self, queue_id: str, address: str) -> Optional[dict]:
        """
        The C{detail} of the last C{deferred} event of a waiting recipient
        in this run, or L{None}.  A parked recipient's is made from its
        destination's suspension (it is shared, not kept per recipient).
        """
        parked = self.parking.lastDeferral(queue_id, address)
        if parked is not None:
            return parked
        return self._deferrals.get((queue_id, address))

    # -- operator control ----------------------------------------------------

    def retryNow(self, queue_id: str) -> bool:
        if queue_id not in self.entries:
            return False
        self.cancelTimer(queue_id)
        # Parked recipients are tried too: their destination is probed now.
        self.parking.probeNow(self.parking.forget(queue_id))
        return self.wake(queue_id, force=True)

    def retryDomain(self, domain: str) -> int:
        domain = domain.lower().rstrip(".")
        woken = 0
        for queue_id, entry in list(self.entries.items()):
            self.parking.probeNow(self.parking.forget(queue_id, domain))
            if any(recipientDomain(r.address) == domain for r in self.idle(entry)):
                self.cancelTimer(queue_id)
                woken += self.wake(queue_id, force=True, domain=domain)
        return woken

    def delete(self, entry: SpoolEntry, reason: str) -> Deferred:
        """
        Give up on every waiting recipient of C{entry} (its jobs waiting for
        a session already taken back): see L{DeliveryScheduler.delete
        <smartrelay.outbound.scheduler.DeliveryScheduler.delete>}.
        """
        queue_id = entry.queue_id
        busy = sorted(self.attempting(queue_id))
        if busy:
            raise DeliveryInProgress(queue_id, busy)
        self.parking.forget(queue_id)
        self.cancelTimer(queue_id)
        now = self.clock.seconds()
        changes, events = [], []
        for recipient in entry.pending():
            self.busy.add((queue_id, recipient.address))
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
        d = self.inFlight.track(self.recorder.record(entry, changes, events))
        return d.addCallback(lambda _: addresses)

    # -- timers ----------------------------------------------------------------

    def cancelTimer(self, queue_id: str) -> None:
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def idle(self, entry: SpoolEntry) -> list:
        """
        The recipients of C{entry} waiting for their timer: not final, not
        busy, not parked.
        """
        queue_id, busy, parked = entry.queue_id, self.busy, self.parking
        return [
            r for r in entry.pending()
            if (queue_id, r.address) not in busy and (queue_id, r.address) not in parked
        ]

    def reschedule(self, entry: SpoolEntry) -> None:
        """
        (Re)arm the entry's timer for its earliest waiting recipient.
        """
        self.cancelTimer(entry.queue_id)
        idle = self.idle(entry)
        if not idle or not self.running():
            return
        delay = max(0.0, min(r.next_attempt for r in idle) - self.clock.seconds())
        self._timers[entry.queue_id] = self.clock.callLater(delay, self.wake, entry.queue_id)

    def wake(self, queue_id: str, force: bool = False, domain: Optional[str] = None) -> bool:
        """
        Start attempts for the recipients of C{queue_id} that are due (all
        waiting ones if C{force}; only those at C{domain} if given).
        """
        self._timers.pop(queue_id, None)
        entry = self.entries.get(queue_id)
        if entry is None or not self.running():
            return False
        now = self.clock.seconds()
        due = [
            r
            for r in self.idle(entry)
            if (force or r.next_attempt <= now)
            and (domain is None or recipientDomain(r.address) == domain)
        ]
        for recipient in due:
            self.busy.add((queue_id, recipient.address))
        self.reschedule(entry)
        if due:
            self.inFlight.track(self.attempt(entry, [r.address for r in due]))
        return bool(due)

    # -- busy recipients and recorded outcomes ----------------------------------

    def release(self, queue_id: str, addresses: Iterable[str]) -> None:
        """
        The attempts of C{addresses} ended with nothing to record.
        """
        for address in addresses:
            self.busy.discard((queue_id, address))

    def releaseJob(self, job: Any) -> None:
        self.release(job.entry.queue_id, job.addresses)

    def recorded(self, entry: SpoolEntry, changes: list, events: list, discard: bool) -> None:
        """
        Outcomes of C{entry} are durable: its recipients are no longer busy
        (if C{discard}), their last deferrals are kept for the API, and the
        entry is dropped when done or its timer armed again.
        """
        queue_id = entry.queue_id
        if discard:
            self.release(queue_id, [change.address for change in changes])
        for kind, address, detail, *_ in events:
            if kind == "deferred" and "suspended" not in detail:
                self._deferrals[(queue_id, address)] = detail
            else:
                self._deferrals.pop((queue_id, address), None)
        if entry.done:
            self.cancelTimer(queue_id)
            self.entries.pop(queue_id, None)
        elif self.running():
            self.reschedule(entry)

    def unrecorded(self, entry: SpoolEntry, changes: list) -> None:
        self.release(entry.queue_id, [change.address for change in changes])

    # -- parked recipients (smartrelay.outbound.parking) -----------------------

    def parkJob(self, destination: Any, job: Any) -> None:
        self.releaseJob(job)
        self.parking.park(destination.key, job.entry, job.addresses)

    def expireParked(self, entry: SpoolEntry, changes: list, events: list) -> None:
        """
        Record the expiry of recipients taken out of the parking, as any
        outcome (busy until recorded, retried if the record fails).
        """
        for change in changes:
            self.busy.add((entry.queue_id, change.address))
        self.inFlight.track(self.recorder.record(entry, changes, events))

    def unpark(self, entry: SpoolEntry, addresses: list) -> None:
        """
        Attempt released parked recipients now.
        """
        if not self.running() or self.entries.get(entry.queue_id) is not entry:
            return
        pending = {r.address for r in self.idle(entry)}
        due = [a for a in addresses if a in pending]
        for address in due:
            self.busy.add((entry.queue_id, address))
        if due:
            self.inFlight.track(self.attempt(entry, due))


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
