"""
The one event model (DESIGN section 1.7) and the log that writes events to
the store.

Everything that happens to a message is an L{Event}.  Producers (the SMTP
policy, the delivery scheduler) call L{EventLog.emit}; the log batches
events and hands them to the store's C{appendEvents} so that a busy relay
writes many events per store round trip.
"""

import itertools
import json
import os
from datetime import datetime, timezone
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

EVENT_TYPES = frozenset(
    [
        "accepted",
        "rejected",
        "suppressed",
        "deferred",
        "delivered",
        "bounced",
        "expired",
        "complained",
        "unsubscribed",
        "opened",
        "clicked",
        "sms_submitted",
        "sms_delivered",
        "sms_failed",
    ]
)


def rfc3339(seconds: float) -> str:
    """
    Format POSIX seconds as an RFC 3339 UTC timestamp with milliseconds.
    """
    when = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (when.microsecond // 1000)


_idPrefix = os.urandom(8).hex()
_idCounter = itertools.count()


def _newPrefix() -> None:
    global _idPrefix
    _idPrefix = os.urandom(8).hex()


os.register_at_fork(after_in_child=_newPrefix)


def newEventID() -> str:
    """
    A unique, URL-safe, 128-bit event id: a random per-process prefix and a
    counter (os.urandom per event costs ~50 microseconds here, a tenth of
    the whole SMTP transaction).
    """
    return "%s%016x" % (_idPrefix, next(_idCounter))


@attrs.frozen
class Event:
    """
    One thing that happened to one message (and usually one recipient).

    @ivar time: POSIX seconds (float); serialised as RFC 3339 UTC.
    """

    type: str = attrs.field()
    queue_id: Optional[str]
    recipient: Optional[str]
    time: float
    tag: Optional[str] = None
    metadata: dict = attrs.field(factory=dict)
    detail: dict = attrs.field(factory=dict)
    id: str = attrs.field(factory=newEventID)

    @type.validator
    def _checkType(self, attribute, value):
        if value not in EVENT_TYPES:
            raise ValueError(f"unknown event type {value!r}")

    def asDict(self) -> dict[str, Any]:
        """
        The public JSON shape of DESIGN section 1.7.
        """
        return {
            "id": self.id,
            "time": rfc3339(self.time),
            "type": self.type,
            "queue_id": self.queue_id,
            "recipient": self.recipient,
            "tag": self.tag,
            "metadata": self.metadata,
            "detail": self.detail,
        }

    def toJSON(self) -> str:
        return json.dumps(self.asDict(), sort_keys=True, separators=(",", ":"))


@attrs.define
class EventLog:
    """
    Batches events and writes them to a store.

    Events emitted during one reactor turn are written together: the first
    C{emit} schedules a flush with C{callLater(0)}; at most one store write is
    in flight, events that arrive meanwhile wait for the next batch.

    @ivar store: provides C{appendEvents(list[Event]) -> Deferred}.
    @ivar clock: an L{IReactorTime}; its C{seconds} stamps events.
    """

    store: Any
    clock: Any
    maxBatch: int = 5000
    _pending: list = attrs.field(factory=list, init=False)
    _scheduled: Any = attrs.field(default=None, init=False)
    _inFlight: Optional[Deferred] = attrs.field(default=None, init=False)
    _waiters: list = attrs.field(factory=list, init=False)

    log = Logger()

    def emit(
        self,
        type: str,
        queue_id: Optional[str],
        recipient: Optional[str] = None,
        *,
        tag: Optional[str] = None,
        metadata: Optional[dict] = None,
        detail: Optional[dict] = None,
    ) -> Event:
        """
        Record one event; returns it (the write happens in the background).
        """
        event = Event(
            type=type,
            queue_id=queue_id,
            recipient=recipient,
            time=self.clock.seconds(),
            tag=tag,
            metadata=metadata or {},
            detail=detail or {},
        )
        self._pending.append(event)
        self._schedule()
        return event

    def _schedule(self) -> None:
        if self._scheduled is None and self._inFlight is None:
            self._scheduled = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        if not self._pending:
            self._notifyIdle()
            return
        batch = self._pending[: self.maxBatch]
        del self._pending[: self.maxBatch]
        d = self._inFlight = self.store.appendEvents(batch)

        def failed(failure):
            self.log.failure(
                "Could not write {count} events to the store", failure, count=len(batch)
            )

        def done(_):
            self._inFlight = None
            if self._pending:
                self._schedule()
            else:
                self._notifyIdle()

        d.addErrback(failed)
        d.addBoth(done)

    def _notifyIdle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    def flushed(self) -> Deferred:
        """
        A Deferred that fires once every event emitted so far is written
        (or its write failed and was logged).
        """
        if not self._pending and self._inFlight is None and self._scheduled is None:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d
