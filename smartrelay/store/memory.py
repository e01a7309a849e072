"""
An in-memory L{IStore}: complete, fast, and gone when the process ends.

It passes the same contract suite as the durable back ends, so other
modules' tests can use it as a fake.  Metadata and detail are kept as JSON
text, like the SQLite back end keeps them, so that a value that could not be
stored there fails here too and callers always get fresh copies back.

Unlike the durable back ends it may be used without calling C{start} first.
"""

import json
from bisect import insort
from typing import Optional

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from smartrelay.events import Event
from smartrelay.store.interfaces import (
    EventPage,
    IStore,
    StoreClosed,
    checkLimit,
    checkTime,
    decodeCursor,
    encodeCursor,
    normaliseRecipient,
)


@attrs.frozen(order=True)
class _Row:
    time: float
    seq: int
    event: Event = attrs.field(eq=False, order=False)
    recipient: Optional[str] = attrs.field(eq=False, order=False)
    metadata: str = attrs.field(eq=False, order=False)
    detail: str = attrs.field(eq=False, order=False)

    def toEvent(self) -> Event:
        return attrs.evolve(
            self.event,
            metadata=json.loads(self.metadata),
            detail=json.loads(self.detail),
        )


@implementer(IStore)
@attrs.define
class MemoryStore:
    """
    An L{IStore} that keeps events in a list sorted by (time, insertion
    order).
    """

    _rows: list[_Row] = attrs.field(factory=list, init=False)
    _nextSeq: int = attrs.field(default=1, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def _checkOpen(self) -> None:
        if self._closed:
            raise StoreClosed("the event store is closed")

    def start(self) -> Deferred:
        return maybeDeferred(self._checkOpen)

    def close(self) -> Deferred:
        self._closed = True
        return maybeDeferred(lambda: None)

    def appendEvents(self, events: list[Event]) -> Deferred:
        return maybeDeferred(self._append, events)

    def _append(self, events: list[Event]) -> None:
        self._checkOpen()
        # Encode everything before storing anything: a batch is all or
        # nothing.
        encoded = [
            (event, json.dumps(event.metadata), json.dumps(event.detail))
            for event in events
        ]
        for event, metadata, detail in encoded:
            row = _Row(
                time=event.time,
                seq=self._nextSeq,
                event=event,
                recipient=normaliseRecipient(event.recipient),
                metadata=metadata,
                detail=detail,
            )
            self._nextSeq += 1
            insort(self._rows, row)

    def eventsForMessage(self, queue_id: str) -> Deferred:
        return maybeDeferred(self._eventsForMessage, queue_id)

    def _eventsForMessage(self, queue_id: str) -> list[Event]:
        self._checkOpen()
        return [row.toEvent() for row in self._rows if row.event.queue_id == queue_id]

    def queryEvents(
        self,
        *,
        type: Optional[str] = None,
        queue_id: Optional[str] = None,
        recipient: Optional[str] = None,
        tag: Optional[str] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        cursor: Optional[str] = None,
        limit: int = 100,
    ) -> Deferred:
        return maybeDeferred(
            self._query, type, queue_id, recipient, tag, since, until, cursor, limit
        )

    def _query(self, type, queue_id, recipient, tag, since, until, cursor, limit):
        self._checkOpen()
        limit = checkLimit(limit)
        since = checkTime("since", since)
        until = checkTime("until", until)
        after = None if cursor is None else decodeCursor(cursor)
        recipient = normaliseRecipient(recipient)

        found: list[_Row] = []
        for row in self._rows:
            event = row.event
            if after is not None and (row.time, row.seq) <= after:
                continue
            if since is not None and row.time < since:
                continue
            if until is not None and row.time >= until:
                # Rows are sorted by time: nothing later can match.
                break
            if type is not None and event.type != type:
                continue
            if queue_id is not None and event.queue_id != queue_id:
                continue
            if recipient is not None and row.recipient != recipient:
                continue
            if tag is not None and event.tag != tag:
                continue
            found.append(row)
            if len(found) > limit:
                break

        nextCursor = None
        if len(found) > limit:
            del found[limit:]
            last = found[-1]
            nextCursor = encodeCursor(last.time, last.seq)
        return EventPage(events=[row.toEvent() for row in found], cursor=nextCursor)
