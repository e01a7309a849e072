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
from collections import Counter
from typing import Optional

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from smartrelay.events import Event
from smartrelay.store.interfaces import (
    ISMSSubmissions,
    SMSSubmission,
    normaliseSMSMessageID,
    UNIQUE_TYPES,
    EventClaim,
    EventPage,
    IEventStreams,
    IStore,
    OutboxBatch,
    StoreClosed,
    SuppressionEntry,
    SuppressionPage,
    buildStatistics,
    checkAddresses,
    checkBatches,
    checkClaim,
    checkClaimArguments,
    checkLimit,
    checkPruneArguments,
    checkReason,
    checkStatisticsArguments,
    checkStreamName,
    checkTakeArguments,
    checkTime,
    checkTokenArguments,
    claimCursor,
    claimPage,
    counterBumps,
    decodeCursor,
    decodeSuppressionCursor,
    encodeCursor,
    encodeSuppressionCursor,
    eventCounterTypes,
    normaliseAddress,
    normalisePrefix,
    normaliseRecipient,
    takeFromBucket,
    uniqueKey,
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


@implementer(IStore, IEventStreams, ISMSSubmissions)
@attrs.define
class MemoryStore:
    """
    An L{IStore} that keeps events in a list sorted by (time, insertion
    order), and the suppression list, statistics counters and token
    buckets in dictionaries.
    """

    _rows: list[_Row] = attrs.field(factory=list, init=False)
    _suppressions: dict[str, SuppressionEntry] = attrs.field(factory=dict, init=False)
    # (interval, dimension, key) -> bucket start -> counter type -> count
    _counters: dict[tuple[str, str, str], dict[int, Counter]] = attrs.field(
        factory=dict, init=False
    )
    # (queue id, recipient, type) counted as a unique open / click -> the
    # time of that first open / click
    _seen: dict[tuple[str, str, str], float] = attrs.field(factory=dict, init=False)
    _buckets: dict[str, tuple[float, float]] = attrs.field(factory=dict, init=False)
    # SMS submissions (issue 15): message id -> submission as JSON.
    _sms: dict[str, str] = attrs.field(factory=dict, init=False)
    _nextSeq: int = attrs.field(default=1, init=False)
    # Event streams and outboxes: stream -> cursor, (stream, owner) ->
    # open claim, outbox -> id -> batch.
    _streams: dict[str, int] = attrs.field(factory=dict, init=False)
    _claims: dict[tuple[str, str], EventClaim] = attrs.field(factory=dict, init=False)
    _outboxes: dict[str, dict[str, OutboxBatch]] = attrs.field(factory=dict, init=False)
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
            self._count(event)

    def _count(self, event: Event) -> None:
        types = eventCounterTypes(event)
        unique = uniqueKey(event)
        if unique is not None and unique not in self._seen:
            self._seen[unique] = event.time
            types.append(UNIQUE_TYPES[event.type])
        for interval, bucket, dim, key, type in counterBumps(event, types):
            series = self._counters.setdefault((interval, dim, key), {})
            series.setdefault(bucket, Counter())[type] += 1

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

    def pruneEvents(self, before: float, limit: int = 10000) -> Deferred:
        return maybeDeferred(self._prune, before, limit)

    def _prune(self, before, limit) -> int:
        self._checkOpen()
        before, limit = checkPruneArguments(before, limit)
        # Rows are sorted by time: the older ones are a prefix.
        count = 0
        for row in self._rows:
            if count >= limit or row.time >= before:
                break
            count += 1
        del self._rows[:count]
        budget = limit - count
        if budget:
            old = sorted(
                (time, key) for key, time in self._seen.items() if time < before
            )
            for time, key in old[:budget]:
                del self._seen[key]
                count += 1
        return count

    # -- suppression list ------------------------------------------------

    def addSuppression(self, entry: SuppressionEntry) -> Deferred:
        return maybeDeferred(self._addSuppression, entry)

    def _addSuppression(self, entry: SuppressionEntry) -> None:
        self._checkOpen()
        if not isinstance(entry, SuppressionEntry):
            raise TypeError(f"not a SuppressionEntry: {entry!r}")
        old = self._suppressions.get(entry.address)
        if old is None or entry.time >= old.time:
            self._suppressions[entry.address] = entry

    def removeSuppression(self, address: str) -> Deferred:
        return maybeDeferred(self._removeSuppression, address)

    def _removeSuppression(self, address: str) -> bool:
        self._checkOpen()
        return self._suppressions.pop(normaliseAddress(address), None) is not None

    def checkSuppressions(self, addresses: list[str], now: float) -> Deferred:
        return maybeDeferred(self._checkSuppressions, addresses, now)

    def _checkSuppressions(self, addresses, now) -> dict[str, SuppressionEntry]:
        self._checkOpen()
        pairs = checkAddresses(addresses)
        now = checkTime("now", now)
        if now is None:
            raise ValueError("now is required")
        found = {}
        for given, normalised in pairs:
            entry = self._suppressions.get(normalised)
            if entry is not None and entry.activeAt(now):
                found[given] = entry
        return found

    def listSuppressions(
        self,
        *,
        prefix: Optional[str] = None,
        reason: Optional[str] = None,
        cursor: Optional[str] = None,
        limit: int = 100,
    ) -> Deferred:
        return maybeDeferred(self._listSuppressions, prefix, reason, cursor, limit)

    def _listSuppressions(self, prefix, reason, cursor, limit) -> SuppressionPage:
        self._checkOpen()
        limit = checkLimit(limit)
        reason = checkReason(reason)
        prefix = normalisePrefix(prefix)
        after = None if cursor is None else decodeSuppressionCursor(cursor)
        found = []
        for address in sorted(self._suppressions):
            if after is not None and address <= after:
                continue
            if prefix is not None and not address.startswith(prefix):
                continue
            entry = self._suppressions[address]
            if reason is not None and entry.reason != reason:
                continue
            found.append(entry)
            if len(found) > limit:
                break
        nextCursor = None
        if len(found) > limit:
            del found[limit:]
            nextCursor = encodeSuppressionCursor(found[-1].address)
        return SuppressionPage(entries=found, cursor=nextCursor)

    # -- statistics ------------------------------------------------------

    def statistics(
        self,
        *,
        since: float,
        until: float,
        interval: str = "hour",
        tag: Optional[str] = None,
        domain: Optional[str] = None,
    ) -> Deferred:
        return maybeDeferred(self._statistics, since, until, interval, tag, domain)

    def _statistics(self, since, until, interval, tag, domain):
        self._checkOpen()
        since, until, size, dim, key, first = checkStatisticsArguments(
            since, until, interval, tag, domain
        )
        series = self._counters.get((interval, dim, key), {})
        counters = [
            (bucket, type, count)
            for bucket, counts in series.items()
            if first <= bucket < until
            for type, count in counts.items()
        ]
        return buildStatistics(
            since=since,
            until=until,
            interval=interval,
            tag=tag,
            domain=domain,
            counters=counters,
        )

    # -- token buckets ---------------------------------------------------

    def takeTokens(
        self, key: str, rate: float, burst: float, now: float, count: float = 1
    ) -> Deferred:
        return maybeDeferred(self._takeTokens, key, rate, burst, now, count)

    def _takeTokens(self, key, rate, burst, now, count):
        self._checkOpen()
        key, rate, burst, now, count = checkTokenArguments(
            key, rate, burst, now, count
        )
        state, result = takeFromBucket(
            self._buckets.get(key), rate, burst, now, count
        )
        self._buckets[key] = state
        return result

    # -- event streams and outboxes --------------------------------------

    def claimEvents(self, stream, owner, now, limit=None, begin="oldest") -> Deferred:
        return maybeDeferred(self._claimEvents, stream, owner, now, limit, begin)

    def _claimEvents(self, stream, owner, now, limit, begin):
        self._checkOpen()
        stream, owner, now, limit, begin = checkClaimArguments(
            stream, owner, now, limit, begin
        )
        open = self._claims.get((stream, owner))
        if open is not None:
            return open
        top = self._nextSeq - 1
        cursor = self._streams.setdefault(stream, top if begin == "newest" else 0)
        if top <= cursor:
            return None
        last = top if limit is None else min(top, cursor + limit)
        claim = EventClaim(stream, owner, cursor, last, now)
        self._claims[stream, owner] = claim
        self._streams[stream] = last
        return claim

    def claimedEvents(self, claim, cursor=None, limit=1000) -> Deferred:
        return maybeDeferred(self._claimedEvents, claim, cursor, limit)

    def _claimedEvents(self, claim, cursor, limit) -> EventPage:
        self._checkOpen()
        after, upTo = claimPage(claim, cursor, limit)
        rows = sorted(
            (row for row in self._rows if after < row.seq <= upTo),
            key=lambda row: row.seq,
        )
        return EventPage(
            events=[row.toEvent() for row in rows], cursor=claimCursor(claim, upTo)
        )

    def finishClaim(self, claim) -> Deferred:
        return maybeDeferred(self._finishClaim, claim)

    def _finishClaim(self, claim) -> bool:
        self._checkOpen()
        checkClaim(claim)
        key = (claim.stream, claim.owner)
        if self._claims.get(key) != claim:
            return False
        del self._claims[key]
        return True

    def addToOutbox(self, outbox, batches, claim=None) -> Deferred:
        return maybeDeferred(self._addToOutbox, outbox, batches, claim)

    def _addToOutbox(self, outbox, batches, claim) -> None:
        self._checkOpen()
        checkStreamName(outbox)
        batches = checkBatches(batches)
        if claim is not None:
            checkClaim(claim)
        box = self._outboxes.setdefault(outbox, {})
        for batch in batches:
            box.setdefault(batch.id, batch)
        if claim is not None:
            self._finishClaim(claim)

    def takeFromOutbox(self, outbox, now, lease, limit=10) -> Deferred:
        return maybeDeferred(self._takeFromOutbox, outbox, now, lease, limit)

    def _takeFromOutbox(self, outbox, now, lease, limit) -> list:
        self._checkOpen()
        outbox, now, lease, limit = checkTakeArguments(outbox, now, lease, limit)
        box = self._outboxes.get(outbox, {})
        due = sorted(
            (batch for batch in box.values() if batch.due <= now),
            key=lambda batch: (batch.due, batch.id),
        )[:limit]
        taken = []
        for batch in due:
            batch = box[batch.id] = attrs.evolve(batch, due=now + lease)
            taken.append(batch)
        return taken

    def deferInOutbox(self, outbox, id, due) -> Deferred:
        return maybeDeferred(self._deferInOutbox, outbox, id, due)

    def _deferInOutbox(self, outbox, id, due) -> bool:
        self._checkOpen()
        checkStreamName(outbox)
        due = checkTime("due", due)
        if due is None:
            raise ValueError("due is required")
        box = self._outboxes.get(outbox, {})
        batch = box.get(id)
        if batch is None:
            return False
        box[id] = attrs.evolve(batch, due=due, attempts=batch.attempts + 1)
        return True

    def removeFromOutbox(self, outbox, id) -> Deferred:
        return maybeDeferred(self._removeFromOutbox, outbox, id)

    def _removeFromOutbox(self, outbox, id) -> bool:
        self._checkOpen()
        checkStreamName(outbox)
        return self._outboxes.get(outbox, {}).pop(id, None) is not None

    def outboxSize(self, outbox) -> Deferred:
        return maybeDeferred(self._outboxSize, outbox)

    def _outboxSize(self, outbox) -> int:
        self._checkOpen()
        checkStreamName(outbox)
        return len(self._outboxes.get(outbox, {}))

    # -- SMS submissions (ISMSSubmissions, issue 15) ----------------------

    def addSMSSubmission(self, submission) -> Deferred:
        return maybeDeferred(self._addSMSSubmission, submission)

    def _addSMSSubmission(self, submission) -> None:
        self._checkOpen()
        if not isinstance(submission, SMSSubmission):
            raise TypeError("an SMSSubmission is needed")
        self._sms[submission.message_id] = json.dumps(submission.asDict())

    def findSMSSubmission(self, message_id) -> Deferred:
        return maybeDeferred(self._findSMSSubmission, message_id)

    def _findSMSSubmission(self, message_id):
        self._checkOpen()
        found = self._sms.get(normaliseSMSMessageID(message_id))
        return None if found is None else SMSSubmission(**json.loads(found))

    def smsSubmissions(self, queue_id, recipient) -> Deferred:
        return maybeDeferred(self._smsSubmissions, queue_id, recipient)

    def _smsSubmissions(self, queue_id, recipient) -> list:
        self._checkOpen()
        found = [SMSSubmission(**json.loads(value)) for value in self._sms.values()]
        return sorted(
            (s for s in found if s.queue_id == queue_id and s.recipient == recipient),
            key=lambda s: (s.part, s.time),
        )

    def pruneSMSSubmissions(self, before, limit=10000) -> Deferred:
        return maybeDeferred(self._pruneSMSSubmissions, before, limit)

    def _pruneSMSSubmissions(self, before, limit) -> int:
        self._checkOpen()
        before, limit = checkPruneArguments(before, limit)
        old = [
            key for key, value in self._sms.items() if json.loads(value)["time"] < before
        ][:limit]
        for key in old:
            del self._sms[key]
        return len(old)
