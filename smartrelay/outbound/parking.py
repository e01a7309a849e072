"""
Parking: a destination that cannot be connected to is suspended until its
next retry, and the mail queued for it waits there without attempts.

When no session can be opened to a destination (every hop refused the
connection, timed out or answered the greeting with a temporary failure)
and no other session to it works, the scheduler calls L{Parking.suspend}.
From then until the destination's next retry time:

* recipients routed to it, and new recipients at a domain already seen
  going there, join its I{parked set} (L{Parking.park}, L{Parking.admit}):
  no connection attempt, no timer, no routing, no suppression check;
* each parked recipient gets one C{deferred} event (the connection
  failure, C{next_attempt} the destination's retry time) and a spool
  state record, written in bulk: everything parked in one interval
  (L{FLUSH_INTERVAL}) is recorded in one go, at most L{CHUNK} recipients
  a reactor turn, so that the spool writes it in one group commit and the
  event log in one batch;
* a parked recipient whose next attempt would come after C{max_age}
  expires instead (an C{expired} event, as for any deferral).

At the retry time one parked recipient is released as the I{probe}
(L{Parking.probing}: the scheduler opens at most one session to a
probing destination).  If its session opens, L{Parking.recovered}
releases every parked recipient, L{CHUNK} a reactor turn, into the
scheduler's normal path (suppression list, routing, the destination's
limits, the pump's fairness between destinations).  If it fails,
L{Parking.suspend} is called again: the next retry comes from the retry
schedule by the number of consecutive failures, and every parked
recipient is told its new next attempt (bulk again).

Nothing here is durable and nothing needs to be: the spool holds every
parked recipient (queued, or deferred with its next attempt), so after a
restart each is retried at its next attempt, the first failure parks the
destination again, and the rest join it.
"""

from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any, Optional

import attrs
from twisted.logger import Logger

from smartrelay.events import rfc3339
from smartrelay.message import FINAL_STATES, Recipient, SpoolEntry

__all__ = ["Parking", "Suspension", "FLUSH_INTERVAL", "CHUNK", "PROBE_TIMEOUT"]

#: Seconds between two bulk records of new parked recipients.
FLUSH_INTERVAL = 1.0

#: Parked recipients recorded, or released, in one reactor turn.
CHUNK = 2000

#: A probe that has not led to a connection attempt after this many
#: seconds (its recipient was suppressed, deleted or routed elsewhere) is
#: replaced by another parked recipient.
PROBE_TIMEOUT = 120.0


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _status(reply: Any) -> str:
    return reply.status if reply.status and reply.status.startswith("4") else "4.0.0"


def _detail(suspension: "Suspension", attempts: int) -> dict:
    """
    The C{detail} of a parked recipient's C{deferred} event.
    """
    reply = suspension.reply
    return {
        "reply": suspension.reason,
        "code": reply.code,
        "status": _status(reply),
        "remote": suspension.remote,
        "attempts": attempts,
        "suspended": suspension.key,
        "next_attempt": rfc3339(suspension.retryAt),
    }


#: In L{Parking}'s pending records: every parked recipient of the message.
ALL = object()


@attrs.define(eq=False)
class _Several:
    """
    The parked recipients of a message with more than one.

    @ivar addresses: address → its L{Suspension} (L{None} while released).
    """

    entry: SpoolEntry
    addresses: dict


@attrs.define(eq=False, repr=False)
class Suspension:
    """
    One suspended destination and its parked recipients.

    @ivar key: the destination's key (a domain, C{provider:NAME},
        C{relay:HOST:PORT}).
    @ivar reply: the L{Reply <smartrelay.outbound.session.Reply>} of the
        last failed connection.
    @ivar remote: the hop that failed last.
    @ivar failures: failed connections in a row (the last probe's
        included): the retry schedule's index.
    @ivar retryAt: clock seconds of the next probe.
    @ivar probing: a probe recipient has been released and its connection
        is awaited.
    @ivar members: queue id → L{SpoolEntry} of the messages with
        recipients parked here, oldest first.
    @ivar count: the recipients parked here.
    @ivar domains: the recipient domains seen routed here.
    """

    key: str
    reply: Any
    remote: Optional[str]
    failures: int = 0
    retryAt: float = 0.0
    probing: bool = False
    members: dict = attrs.field(factory=dict)
    count: int = 0
    domains: set = attrs.field(factory=set)
    timer: Any = None

    def __repr__(self) -> str:
        return (
            f"<Suspension {self.key} parked={self.count} "
            f"failures={self.failures} probing={self.probing}>"
        )

    @property
    def reason(self) -> str:
        """
        What a parked recipient's C{deferred} event says.
        """
        return f"delivery temporarily suspended: {self.reply.text}"

    def state(self) -> dict:
        """
        For the destination views (API, UI, C{/metrics}).
        """
        return {
            "parked": self.count,
            "suspended_until": self.retryAt,
            "suspended_reason": self.reply.line,
        }


@attrs.define(eq=False, slots=False, repr=False)
class Parking:
    """
    The suspended destinations of one L{DeliveryScheduler
    <smartrelay.outbound.scheduler.DeliveryScheduler>} and their parked
    recipients.

    @ivar clock: an C{IReactorTime}.
    @ivar retry: C{delay(failures) -> seconds} (the scheduler's retry
        schedule).
    @ivar maxAge: seconds after C{entry.received} past which a recipient
        is not deferred but expired.
    @ivar record: C{record([(entry, changes, events), ...])}: write the
        C{deferred} states of parked recipients, message by message in one
        go, and then emit their events; the recipients stay parked
        meanwhile (and may be released).
    @ivar expire: C{expire(entry, changes, events)}: the same for
        recipients no longer parked that expire.
    @ivar release: C{release(entry, addresses)}: attempt these recipients
        now, through the scheduler's normal path.
    @ivar opening: C{opening(key) -> bool}: whether a session to the
        destination is open or being opened (the probe is under way).
    @ivar jitter: retry delays are stretched by up to this fraction.
    @ivar random: C{random() -> float} in [0, 1).
    """

    clock: Any
    retry: Any
    maxAge: float
    record: Callable
    expire: Callable
    release: Callable
    opening: Callable
    jitter: float = 0.0
    random: Any = None
    flushInterval: float = FLUSH_INTERVAL
    chunk: int = CHUNK
    probeTimeout: float = PROBE_TIMEOUT

    _suspensions: dict = attrs.field(factory=dict, init=False)
    _byDomain: dict = attrs.field(factory=dict, init=False)
    #: queue id → its parked recipients, in one of three forms (L{_one}
    #: reads the first two): the message's first recipient alone parked,
    #: its L{Suspension} (most messages: a million parked messages is the
    #: size to plan for, and every object a recipient costs tens of bytes;
    #: the entry is the suspension's member); another recipient alone, or
    #: one being released, C{(entry, address, suspension)}, the suspension
    #: L{None} while it is being released; several, a L{_Several}.
    _parked: dict = attrs.field(factory=dict, init=False)
    #: The parked recipients in all.
    _count: int = attrs.field(default=0, init=False)
    #: queue id → whose deferral is still to be recorded: L{ALL} its
    #: parked recipients, or one address, or a set of them.
    _pending: dict = attrs.field(factory=dict, init=False)
    _flushTimer: Any = attrs.field(default=None, init=False)
    #: Queue ids with recipients being released.
    _releasing: deque = attrs.field(factory=deque, init=False)
    _releaseTimer: Any = attrs.field(default=None, init=False)
    #: The C{deferred} details of the flush in progress, shared by the
    #: recipients they are the same for (the scheduler keeps each parked
    #: recipient's last deferral: one dict a recipient was ~400 bytes),
    #: with the status and reply text of their log line: C{(suspension
    #: key, retry time, reply, remote, attempts) -> (detail, status,
    #: reply line)}.
    _details: dict = attrs.field(factory=dict, init=False)

    log = Logger()

    def __repr__(self) -> str:
        return f"<Parking suspended={len(self._suspensions)} parked={self._count}>"

    def __contains__(self, key: tuple) -> bool:
        """
        Whether the recipient C{(queue id, address)} is parked (and so not
        to be attempted by the scheduler's own timers).
        """
        found = self._parked.get(key[0])
        if found is None:
            return False
        if type(found) is Suspension:
            return found.members[key[0]].recipients[0].address == key[1]
        if type(found) is tuple:
            return found[1] == key[1]
        return key[1] in found.addresses

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def _one(queue_id: str, found: Any) -> tuple:
        """
        C{(entry, address, suspension)} of the one parked recipient of
        C{queue_id}, whose C{_parked} value is C{found} (not a
        L{_Several}).
        """
        if type(found) is tuple:
            return found
        entry = found.members[queue_id]
        return entry, entry.recipients[0].address, found

    @staticmethod
    def _single(entry: SpoolEntry, address: str, suspension: Optional[Suspension]) -> Any:
        """
        The C{_parked} value of the one parked recipient C{address} of
        C{entry} (at C{suspension}, which has or is about to have the entry
        as a member).
        """
        if suspension is not None and entry.recipients[0].address == address:
            return suspension
        return (entry, address, suspension)

    def _recipients(self, queue_id: str) -> tuple:
        """
        The entry of C{queue_id} and its parked recipients as C{(address,
        suspension)} pairs (C{(None, [])} if none is parked).
        """
        found = self._parked.get(queue_id)
        if found is None:
            return None, []
        if type(found) is _Several:
            return found.entry, list(found.addresses.items())
        entry, address, suspension = self._one(queue_id, found)
        return entry, [(address, suspension)]

    def get(self, key: str) -> Optional[Suspension]:
        """
        The suspension of the destination C{key}, or L{None}.
        """
        return self._suspensions.get(key)

    def state(self, key: str) -> dict:
        """
        The destination's parking state for its views: C{parked}
        (recipients), C{suspended_until} (clock seconds of the next probe
        or L{None}) and C{suspended_reason}.
        """
        suspension = self._suspensions.get(key)
        if suspension is None:
            return {"parked": 0, "suspended_until": None, "suspended_reason": None}
        return suspension.state()

    # -- suspending and parking -------------------------------------------

    def suspend(
        self, key: str, reply: Any, remote: Optional[str], addresses: Iterable[str] = ()
    ) -> Suspension:
        """
        No connection to C{key} could be opened: suspend it until its next
        retry (by the failures in a row so far), and tell every recipient
        parked there its new next attempt.

        @param addresses: the recipients of the failed attempt: new mail
            for their domains is parked without being routed.
        """
        suspension = self._suspensions.get(key)
        if suspension is None:
            suspension = self._suspensions[key] = Suspension(key, reply, remote)
        self._learn(suspension, addresses)
        suspension.reply, suspension.remote = reply, remote
        suspension.failures += 1
        suspension.probing = False
        delay = self.retry.delay(suspension.failures)
        if self.jitter and self.random is not None:
            delay *= 1 + self.jitter * self.random.random()
        suspension.retryAt = self.clock.seconds() + delay
        self._cancel(suspension)
        suspension.timer = self.clock.callLater(delay, self._probe, suspension)
        for queue_id in suspension.members:
            self._pending[queue_id] = ALL
        self._armFlush()
        self.log.warn(
            "{destination} suspended until {until} after: {reply}; "
            "{count} recipients parked",
            destination=key,
            until=rfc3339(suspension.retryAt),
            reply=reply.line,
            count=suspension.count,
        )
        return suspension

    def park(self, key: str, entry: SpoolEntry, addresses: Iterable[str]) -> None:
        """
        Park recipients routed to the suspended destination C{key}.
        """
        suspension = self._suspensions[key]
        for address in addresses:
            self._add(suspension, entry, address)
        self._learn(suspension, addresses)
        self._armFlush()

    def _learn(self, suspension: Suspension, addresses: Iterable[str]) -> None:
        for address in addresses:
            domain = _domain(address)
            if domain not in suspension.domains:
                suspension.domains.add(domain)
                self._byDomain[domain] = suspension

    def admit(self, entry: SpoolEntry, recipients: Iterable[Recipient], now: float) -> None:
        """
        Park at once, without routing, the due C{recipients} of C{entry}
        whose domain was seen going to a suspended destination.
        """
        if not self._byDomain:
            return
        added = False
        for recipient in recipients:
            if recipient.next_attempt > now:
                continue
            suspension = self._byDomain.get(_domain(recipient.address))
            if suspension is not None:
                self._add(suspension, entry, recipient.address)
                added = True
        if added:
            self._armFlush()

    def _add(self, suspension: Suspension, entry: SpoolEntry, address: str) -> None:
        queue_id = entry.queue_id
        found = self._parked.get(queue_id)
        if found is None:
            self._parked[queue_id] = self._single(entry, address, suspension)
        else:
            if type(found) is not _Several:
                _, there, before = self._one(queue_id, found)
                if there == address:
                    self._leave(before, queue_id, None)
                    self._parked[queue_id] = self._single(entry, address, suspension)
                    found = None
                else:
                    found = self._parked[queue_id] = _Several(entry, {there: before})
            if found is not None:
                known = address in found.addresses
                before = found.addresses.get(address)
                found.addresses[address] = suspension
                if known:
                    self._leave(before, queue_id, found)
        self._count += 1
        suspension.count += 1
        suspension.members[queue_id] = entry
        pending = self._pending.get(queue_id)
        if pending is None:
            self._pending[queue_id] = address
        elif pending is ALL or pending == address:
            pass
        elif type(pending) is str:
            self._pending[queue_id] = {pending, address}
        else:
            pending.add(address)

    def _leave(self, suspension: Optional[Suspension], queue_id: str, found: Any) -> None:
        """
        Count one recipient of C{queue_id} out of C{suspension} (L{None}:
        it was being released), which keeps the message among its members
        while C{found} (a L{_Several}) has another recipient there.
        """
        self._count -= 1
        if suspension is None:
            return
        suspension.count -= 1
        if found is None or suspension not in found.addresses.values():
            suspension.members.pop(queue_id, None)

    def _remove(self, queue_id: str, address: str) -> Optional[SpoolEntry]:
        """
        Unpark one recipient; return its entry (L{None} if it was not
        parked).
        """
        found = self._parked.get(queue_id)
        if found is None:
            return None
        if type(found) is not _Several:
            entry, there, suspension = self._one(queue_id, found)
            if there != address:
                return None
            del self._parked[queue_id]
            self._leave(suspension, queue_id, None)
            self._pending.pop(queue_id, None)
            return entry
        if address not in found.addresses:
            return None
        suspension = found.addresses.pop(address)
        self._leave(suspension, queue_id, found)
        if not found.addresses:
            del self._parked[queue_id]
            self._pending.pop(queue_id, None)
        return found.entry

    def forget(self, queue_id: str, domain: Optional[str] = None) -> set:
        """
        Unpark the recipients of C{queue_id} (only those at C{domain} if
        given) without releasing them: the operator deletes or retries
        them.

        @return: the L{Suspension}s they were parked in.
        """
        suspensions = set()
        _, parked = self._recipients(queue_id)
        for address, suspension in parked:
            if domain is not None and _domain(address) != domain:
                continue
            if suspension is not None:
                suspensions.add(suspension)
            self._remove(queue_id, address)
        return suspensions

    # -- the bulk records -------------------------------------------------

    def _armFlush(self) -> None:
        if self._pending and self._flushTimer is None:
            self._flushTimer = self.clock.callLater(self.flushInterval, self._flush)

    def _flush(self) -> None:
        """
        Record the deferral (or expiry) of up to L{chunk} parked
        recipients, grouped by message; the rest in the next turn.
        """
        self._flushTimer = None
        now = self.clock.seconds()
        if len(self._pending) <= self.chunk:
            members, self._pending = list(self._pending.items()), {}
        else:
            # Taken from the front in one pass (popping the first key one
            # at a time would rescan the deleted slots: quadratic).
            members = list(islice(self._pending.items(), self.chunk))
            for queue_id, _ in members:
                del self._pending[queue_id]
        batch: list = []
        self._details = {}
        found, one = self._parked.get, self._one
        for queue_id, which in members:
            parked = found(queue_id)
            if parked is None:
                continue
            if type(parked) is not _Several:
                # Most messages: one recipient, parked (no list to build).
                entry, address, suspension = one(queue_id, parked)
                if suspension is None or not (which is ALL or address == which or (
                    type(which) is set and address in which)):
                    continue
                self._recordOne(entry, address, suspension, now, batch)
                continue
            entry = parked.entry
            parked = [
                (address, suspension)
                for address, suspension in parked.addresses.items()
                if suspension is not None
                and (which is ALL or address == which or (type(which) is set and address in which))
            ]
            if parked:
                self._recordEntry(entry, parked, now, batch)
        self._details = {}
        if batch:
            self.record(batch)
        if self._pending:
            self._flushTimer = self.clock.callLater(0, self._flush)

    def _recordOne(
        self, entry: SpoolEntry, address: str, suspension: Suspension, now: float, batch: list
    ) -> None:
        """
        L{_recordEntry} for the one parked recipient of a message.
        """
        recipient = None
        for each in entry.recipients:  # the last of that address, as in _recordEntry
            if each.address == address:
                recipient = each
        if recipient is None or recipient.state in FINAL_STATES:
            self._remove(entry.queue_id, address)
            return
        change, event = self._deferral(entry, recipient, suspension, now)
        if change.state == "expired":
            self._remove(entry.queue_id, address)
            self.expire(entry, [change], [event])
        else:
            batch.append((entry, [change], [event]))

    def _recordEntry(self, entry: SpoolEntry, parked: list, now: float, batch: list) -> None:
        current = {r.address: r for r in entry.recipients}
        deferrals: tuple = ([], [])
        expiries: tuple = ([], [])
        for address, suspension in parked:
            recipient = current.get(address)
            if recipient is None or recipient.final:
                self._remove(entry.queue_id, address)
                continue
            change, event = self._deferral(entry, recipient, suspension, now)
            if change.state == "expired":
                self._remove(entry.queue_id, address)
                target = expiries
            else:
                target = deferrals
            target[0].append(change)
            target[1].append(event)
        if deferrals[0]:
            batch.append((entry, *deferrals))
        if expiries[0]:
            self.expire(entry, *expiries)

    def _deferral(
        self, entry: SpoolEntry, recipient: Recipient, suspension: Suspension, now: float
    ) -> tuple:
        """
        The recipient's new state and event (in the scheduler's form:
        C{(state, address, detail, log line fields)}); no attempt is
        counted, none was made.
        """
        reply = suspension.reply
        nextAttempt = suspension.retryAt
        attempts = recipient.attempts
        key = (suspension.key, nextAttempt, reply, suspension.remote, attempts)
        # What the recipients of one suspension with as many attempts
        # share (the detail dict itself, and the strings of the log line)
        # is made once a flush.
        shared = self._details.get(key)
        if shared is None:
            status = _status(reply)
            shared = self._details[key] = (
                _detail(suspension, attempts),
                status,
                f"{reply.code} {status} {suspension.reason}",
            )
        detail, status, replyLine = shared
        if nextAttempt - entry.received > self.maxAge:
            state, nextAttempt = "expired", recipient.next_attempt
            detail = {"reason": "expired", "diagnostic": replyLine,
                      **{k: v for k, v in detail.items() if k != "next_attempt"}}
        else:
            state = "deferred"
        change = Recipient(recipient.address, state, attempts, nextAttempt)
        line = {
            "delay": now - entry.received,
            "reply": replyLine,
            "relay": None,
            "dsn": status,
            "attempts": attempts,
            "next_attempt": detail.get("next_attempt"),
        }
        return change, (state, recipient.address, detail, line)

    def lastDeferral(self, queue_id: str, address: str) -> Optional[dict]:
        """
        The C{detail} of a parked recipient's C{deferred} event, or L{None}
        if it is not parked.  Made when asked, from its suspension: a
        million parked recipients keep no detail each.
        """
        entry, parked = self._recipients(queue_id)
        suspension = dict(parked).get(address)
        if suspension is None:
            return None
        for recipient in entry.recipients:
            if recipient.address == address:
                return _detail(suspension, recipient.attempts)
        return None

    # -- probing and releasing --------------------------------------------

    def probing(self, key: str) -> bool:
        """
        Whether the destination C{key} is being probed: at most one
        session to it may be opened.
        """
        suspension = self._suspensions.get(key)
        return suspension is not None and suspension.probing

    def probeNow(self, suspensions: Iterable[Suspension]) -> None:
        """
        The operator asked for recipients of these suspensions to be tried
        now: probe them at once, the recipients asked for being the probe.
        """
        for suspension in suspensions:
            if self._suspensions.get(suspension.key) is suspension:
                self._cancel(suspension)
                suspension.probing = True
                suspension.timer = self.clock.callLater(
                    self.probeTimeout, self._probeAgain, suspension
                )

    def _probe(self, suspension: Suspension) -> None:
        """
        The retry time has come: release the oldest parked recipient as
        the probe; with nothing parked, end the suspension.
        """
        suspension.timer = None
        if self._suspensions.get(suspension.key) is not suspension:
            return
        if not suspension.members:
            self._end(suspension)
            return
        suspension.probing = True
        queue_id = next(iter(suspension.members))
        entry, parked = self._recipients(queue_id)
        address = next(a for a, s in parked if s is suspension)
        self._remove(queue_id, address)
        suspension.timer = self.clock.callLater(self.probeTimeout, self._probeAgain, suspension)
        self.log.info(
            "{destination}: retrying ({count} recipients parked)",
            destination=suspension.key,
            count=suspension.count,
        )
        self.release(entry, [address])

    def _probeAgain(self, suspension: Suspension) -> None:
        suspension.timer = None
        if self._suspensions.get(suspension.key) is not suspension or not suspension.probing:
            return
        if self.opening(suspension.key):
            suspension.timer = self.clock.callLater(
                self.probeTimeout, self._probeAgain, suspension
            )
            return
        self._probe(suspension)

    def recovered(self, key: str) -> None:
        """
        A session to C{key} opened: end its suspension and release its
        parked recipients, L{chunk} a reactor turn.
        """
        suspension = self._suspensions.get(key)
        if suspension is None:
            return
        count = suspension.count
        self._end(suspension)
        self.log.info(
            "{destination} answers again: releasing {count} parked recipients",
            destination=key,
            count=count,
        )

    def refused(self, key: str, reply: Any) -> None:
        """
        The destination C{key} refused a connection permanently (a C{5xx}
        greeting): end its suspension and release its parked recipients
        to get that answer like any other mail for it.
        """
        suspension = self._suspensions.get(key)
        if suspension is None:
            return
        count = suspension.count
        self._end(suspension)
        self.log.warn(
            "{destination} refused permanently ({reply}): releasing {count} parked "
            "recipients",
            destination=key,
            reply=reply.line,
            count=count,
        )

    def _end(self, suspension: Suspension) -> None:
        self._cancel(suspension)
        del self._suspensions[suspension.key]
        for domain in suspension.domains:
            if self._byDomain.get(domain) is suspension:
                del self._byDomain[domain]
        for queue_id, entry in suspension.members.items():
            found = self._parked[queue_id]
            if type(found) is Suspension:
                self._parked[queue_id] = (entry, entry.recipients[0].address, None)
            elif type(found) is tuple:
                self._parked[queue_id] = found[:2] + (None,)
            else:
                for address, there in found.addresses.items():
                    if there is suspension:
                        found.addresses[address] = None
            self._pending.pop(queue_id, None)
            self._releasing.append(queue_id)
        suspension.members.clear()
        suspension.count = 0
        if self._releasing and self._releaseTimer is None:
            self._releaseTimer = self.clock.callLater(0, self._releaseSome)

    def _releaseSome(self) -> None:
        self._releaseTimer = None
        byEntry: dict = {}
        taken = 0
        while self._releasing and taken < self.chunk:
            queue_id = self._releasing.popleft()
            entry, parked = self._recipients(queue_id)
            for address, suspension in parked:
                if suspension is None:  # not forgotten, nor parked again meanwhile
                    self._remove(queue_id, address)
                    taken += 1
                    byEntry.setdefault(entry, []).append(address)
        for entry, addresses in byEntry.items():
            self.release(entry, addresses)
        if self._releasing:
            self._releaseTimer = self.clock.callLater(0, self._releaseSome)

    def _cancel(self, suspension: Suspension) -> None:
        if suspension.timer is not None and suspension.timer.active():
            suspension.timer.cancel()
        suspension.timer = None

    def stop(self) -> None:
        """
        The scheduler stops: cancel every timer and forget everything
        parked (the spool has it for the next start).
        """
        for suspension in self._suspensions.values():
            self._cancel(suspension)
        for timer in (self._flushTimer, self._releaseTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._flushTimer = self._releaseTimer = None
        self._suspensions.clear()
        self._byDomain.clear()
        self._parked.clear()
        self._count = 0
        self._pending.clear()
        self._releasing.clear()
