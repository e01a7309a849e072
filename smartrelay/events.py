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
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

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
        "auto_replied",
        "sms_submitted",
        "sms_delivered",
        "sms_failed",
    ]
)


class JournalFull(Exception):
    """
    The event journal has no room for what the store could not take.
    """


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
    C{emit} schedules a flush with C{callLater(0)} (or, with
    C{minInterval}, no sooner than that after the last write started); at
    most C{maxInFlight} writes are in flight, events that arrive meanwhile
    wait for the next batch.

    If the store fails a write and there is a C{journal}
    (L{smartrelay.journal.EventJournal}), the log becomes I{degraded}: the
    failed batch and every later one go to the on-disk journal, and a replay
    is tried with back-off (C{retryDelays}) until the store takes everything
    in the journal, in order; then writes go to the store again.  Without a
    journal a failed batch is logged as lost.

    Suppression entries ride on the same mechanism (L{suppress}): one the
    store cannot take (an unsubscribe during a Redis outage) goes to the
    journal, durably, is replayed with the events and, until the store has
    it, is in L{pendingSuppressions}, which the relay checks recipients
    against.

    @ivar store: provides C{appendEvents(list[Event]) -> Deferred}.
    @ivar clock: an L{IReactorTime}; its C{seconds} stamps events.
    """

    store: Any
    clock: Any
    maxBatch: int = 5000
    journal: Any = None
    retryDelays: tuple = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
    _pending: list = attrs.field(factory=list, init=False)
    _scheduled: Any = attrs.field(default=None, init=False)
    #: Writes (to the store or the journal) allowed at once.  Two keep a
    #: networked store busy while the next batch is prepared (the back ends
    #: apply writes in the order they were issued); with one, events that
    #: arrive during a write make the next batch bigger.
    maxInFlight: int = 2
    #: Seconds at least between the starts of two writes: under load the
    #: batches are bigger and the writes (each a hand-off to the store's
    #: thread, or a round trip to Redis) fewer; an event waits at most this
    #: long more for its write.  0: every reactor turn's events at once.
    minInterval: float = 0.0
    _lastWrite: float = attrs.field(default=float("-inf"), init=False)
    _writing: int = attrs.field(default=0, init=False)
    _waiters: list = attrs.field(factory=list, init=False)
    _degraded: bool = attrs.field(default=False, init=False)
    _replayTimer: Any = attrs.field(default=None, init=False)
    _replaying: bool = attrs.field(default=False, init=False)
    _replayFailures: int = attrs.field(default=0, init=False)
    _journaledSinceSeal: int = attrs.field(default=0, init=False)
    _stopped: bool = attrs.field(default=False, init=False)
    _storeStarted: bool = attrs.field(default=True, init=False)
    #: Told of every event as it is emitted (C{observe(event)}), e.g. the
    #: relay's event counters (L{smartrelay.web.metrics.EventCounts}).
    observe: Optional[Callable[[Event], None]] = None
    #: Suppression entries kept in the journal and not yet in the store:
    #: normalised address -> the newest L{SuppressionEntry}.  The same dict
    #: for the log's life (the replica and the store wrapper read it).
    pendingSuppressions: dict = attrs.field(factory=dict, init=False)
    #: Suppression entries being appended to the journal.
    _keeping: int = attrs.field(default=0, init=False)

    log = Logger()

    @property
    def degraded(self) -> bool:
        """
        True while events go to the journal instead of the store.
        """
        return self._degraded

    @property
    def backlog(self) -> int:
        """
        Events emitted and not yet handed to the store (or the journal).
        """
        return len(self._pending)

    @property
    def writesInFlight(self) -> int:
        """
        Batches being written to the store or the journal.
        """
        return self._writing

    def start(self, storeStarted: bool = True) -> Deferred:
        """
        Open the journal; if it holds events from an earlier run, replay
        them (in the background) before writing new ones to the store.

        @param storeStarted: False if the store could not be started (it is
            unreachable): events are journaled, and each replay attempt
            first tries C{store.start()} again.
        """
        if self.journal is None:
            return succeed(None)
        self._storeStarted = storeStarted
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        waiting = await self.journal.open()
        if waiting:
            # Unsubscribes an earlier run could not give the store: checked
            # against from now on, before anything is delivered.
            for entry in await self.journal.suppressions():
                self._pendingSuppression(entry)
            if self.pendingSuppressions:
                self.log.info(
                    "{count} suppression(s) from the journal wait for the store",
                    count=len(self.pendingSuppressions),
                )
        if not self._storeStarted:
            self._degrade(delay=self.retryDelays[0])
        elif waiting:
            self.log.info(
                "replaying {count} journal segment(s) of events into the store",
                count=waiting,
            )
            self._degrade(delay=0)

    def suppress(self, entry: Any) -> Deferred:
        """
        Put a L{SuppressionEntry <smartrelay.store.interfaces.SuppressionEntry>}
        on the store's list, durably: in the store or, when the store fails
        (or the log is already degraded), in the journal, replayed when the
        store is back (adding an entry twice changes nothing, so a replay
        cut short by a crash is simply done again).  It is in
        L{pendingSuppressions} from this call until the store has it.

        @return: a L{Deferred} firing with L{True} once the store has it,
            L{False} once it is in the journal; failing (L{JournalFull}, or
            the store's or the disk's error) when it is in neither.
        """
        if self.journal is None:
            return maybeDeferred(self.store.addSuppression, entry).addCallback(lambda _: True)
        if self._degraded:
            return self._keepSuppression(entry)

        def failed(failure: Failure) -> Deferred:
            self.log.warn(
                "could not put {address} on the suppression list in the store "
                "({why}); kept in the journal until the store is back",
                address=entry.address,
                why=failure.getErrorMessage() or failure.type.__name__,
            )
            self._degrade(delay=self.retryDelays[0])
            return self._keepSuppression(entry)

        return maybeDeferred(self.store.addSuppression, entry).addCallbacks(
            lambda _: True, failed
        )

    def _pendingSuppression(self, entry: Any) -> None:
        known = self.pendingSuppressions.get(entry.address)
        if known is None or entry.time >= known.time:
            self.pendingSuppressions[entry.address] = entry

    def _keepSuppression(self, entry: Any) -> Deferred:
        # Checked against at once, durable once the append has fired.
        self._pendingSuppression(entry)
        self._journaledSinceSeal += 1
        self._keeping += 1

        def kept(ok: bool) -> bool:
            self._keeping -= 1
            if not ok:
                raise JournalFull(
                    f"the event journal is full ({self.journal.size} bytes): "
                    f"cannot keep the suppression of {entry.address}"
                )
            return False

        def failed(failure: Failure) -> Failure:
            self._keeping -= 1
            return failure

        return self.journal.append([entry]).addCallbacks(kept, failed)

    def stop(self) -> None:
        """
        Stop replaying (what is left stays in the journal for the next run).
        """
        self._stopped = True
        if self._replayTimer is not None and self._replayTimer.active():
            self._replayTimer.cancel()
        self._replayTimer = None

    def emit(
        self,
        type: str,
        queue_id: Optional[str],
        recipient: Optional[str] = None,
        *,
        tag: Optional[str] = None,
        metadata: Optional[dict] = None,
        detail: Optional[dict] = None,
        id: Optional[str] = None,
    ) -> Event:
        """
        Record one event; returns it (the write happens in the background).

        @param id: the event's id; a new one (L{newEventID}) unless given.
            A producer that may emit the same event again (the feedback
            processor, after a crash) gives a deterministic one.
        """
        event = Event(
            type=type,
            queue_id=queue_id,
            recipient=recipient,
            time=self.clock.seconds(),
            tag=tag,
            metadata=metadata or {},
            detail=detail or {},
            id=newEventID() if id is None else id,
        )
        self._pending.append(event)
        self._schedule()
        if self.observe is not None:
            self.observe(event)
        return event

    def _schedule(self) -> None:
        if self._scheduled is None and self._writing < self.maxInFlight:
            delay = 0.0
            if self.minInterval:
                delay = max(0.0, self._lastWrite + self.minInterval - self.clock.seconds())
            self._scheduled = self.clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        if not self._pending:
            if self._writing == 0:
                self._notifyIdle()
            return
        self._lastWrite = self.clock.seconds()
        batch = self._pending[: self.maxBatch]
        del self._pending[: self.maxBatch]
        if self._degraded:
            d = self._toJournal(batch)
        else:
            d = self.store.appendEvents(batch)
            d.addErrback(self._storeFailed, batch)
        self._writing += 1
        if self._pending:
            self._schedule()

        def done(_):
            self._writing -= 1
            if self._pending:
                self._schedule()
            elif self._writing == 0:
                self._notifyIdle()

        d.addBoth(done)

    def _storeFailed(self, failure, batch: list) -> Optional[Deferred]:
        if self.journal is None:
            self.log.failure(
                "Could not write {count} events to the store; they are lost",
                failure,
                count=len(batch),
            )
            return None
        self.log.failure(
            "Could not write {count} events to the store; keeping events in the "
            "journal until it is back",
            failure,
            count=len(batch),
        )
        self._degrade(delay=self.retryDelays[0])
        return self._toJournal(batch)

    def _toJournal(self, batch: list) -> Deferred:
        self._journaledSinceSeal += 1

        def kept(ok):
            if not ok:
                self.log.error(
                    "the event journal is full ({size} bytes): {count} events are lost",
                    size=self.journal.size,
                    count=len(batch),
                )

        def failed(failure):
            self.log.failure(
                "Could not journal {count} events; they are lost", failure, count=len(batch)
            )

        return self.journal.append(batch).addCallbacks(kept, failed)

    def _degrade(self, delay: float) -> None:
        if not self._degraded:
            self._degraded = True
            self._replayFailures = 0
        self._scheduleReplay(delay)

    def _scheduleReplay(self, delay: float) -> None:
        if self._stopped or self._replaying:
            return
        if self._replayTimer is not None and self._replayTimer.active():
            return
        self._replayTimer = self.clock.callLater(delay, self._replay)

    def _replay(self) -> None:
        self._replayTimer = None
        self._replaying = True
        Deferred.fromCoroutine(self._replayAll()).addBoth(self._replayed)

    async def _replayAll(self) -> bool:
        """
        Move sealed journal segments into the store, oldest first.  Returns
        True once the journal is empty and nothing was journaled since it
        was last sealed.
        """
        if not self._storeStarted:
            await self.store.start()
            self._storeStarted = True
            self.log.info("connected to the event store")
        while not self._stopped:
            self.journal.seal()
            self._journaledSinceSeal = 0
            segments = await self.journal.sealedSegments()
            if not segments:
                if self._journaledSinceSeal == 0 and self._writing == 0 and not self._keeping:
                    return True
                continue
            for path in segments:
                records = await self.journal.read(path)
                batch, suppressions = [], []
                for record in records:
                    if isinstance(record, Event):
                        batch.append(record)
                        if len(batch) >= self.maxBatch:
                            await self.store.appendEvents(batch)
                            batch = []
                        continue
                    # A suppression entry, in its place among the events.
                    if batch:
                        await self.store.appendEvents(batch)
                        batch = []
                    await self.store.addSuppression(record)
                    suppressions.append(record)
                if batch:
                    await self.store.appendEvents(batch)
                await self.journal.remove(path)
                for entry in suppressions:
                    if self.pendingSuppressions.get(entry.address) == entry:
                        del self.pendingSuppressions[entry.address]
                if suppressions:
                    self.log.info(
                        "{count} suppression(s) kept during the outage are in the store",
                        count=len(suppressions),
                    )
        return False

    def _replayed(self, result) -> None:
        self._replaying = False
        if result is True:
            self._degraded = False
            self._replayFailures = 0
            self.log.info("the event store is back; journal replayed")
            return
        if isinstance(result, Failure):
            delay = self.retryDelays[min(self._replayFailures, len(self.retryDelays) - 1)]
            self._replayFailures += 1
            self.log.warn(
                "event store still unavailable ({why}); next try in {delay}s",
                why=result.getErrorMessage(),
                delay=delay,
            )
            self._scheduleReplay(delay)

    def _notifyIdle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    def flushed(self) -> Deferred:
        """
        A Deferred that fires once every event emitted so far is written
        (or its write failed and was logged).
        """
        if not self._pending and self._writing == 0 and self._scheduled is None:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d
