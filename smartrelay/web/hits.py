# -*- test-case-name: tests.test_web_tracking -*-
"""
Opens, clicks and unsubscribes as events (L{HitRecorder}), for the
tracking routes of L{smartrelay.web.tracking}.

Each event carries the tag and metadata of its message, read once per
message from its C{accepted} event (that event alone: a message's clicks
are events too, and there may be hundreds of thousands of them) and kept
in a small LRU cache; a
message the store does not know (pruned, or still in the event journal)
is remembered as unknown for L{UNKNOWN_FOR} seconds, and the hits of one
message that arrive together share one look-up: a burst of clicks on one
message must not read its (growing) list of events once per click.

Opens and clicks are recorded in batches, off the request path
(L{HitRecorder.hit}): the hits of one reactor turn become their events
together in the next, without a L{Deferred} per hit.  An unsubscribe is
recorded at once (L{HitRecorder.record}), once the suppression list has
the address.
"""

from collections import OrderedDict
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

__all__ = ["HitRecorder", "UNKNOWN_FOR"]

#: Seconds a message the store does not know (no C{accepted} event: pruned,
#: or still in the event journal) is not looked up again for its tag.
UNKNOWN_FOR = 60.0


@attrs.define
class HitRecorder:
    """
    Emits the events of the tracking routes.

    @ivar events: an event log: C{emit(type, queue_id, recipient, *, tag,
        metadata, detail)}.
    @ivar store: provides C{queryEvents(type=, queue_id=, limit=)}
        (L{smartrelay.store.interfaces.IStore}), where the message's
        C{accepted} event is found.
    @ivar clock: an C{IReactorTime}.
    @ivar cacheSize: how many messages' (tag, metadata) to remember.
    @ivar pending: the L{Deferred}s of the work not done yet (a batch
        waiting for its turn, hits waiting for their message's look-up),
        each removed once it has fired (for
        L{smartrelay.deferreds.whenAllDone}).
    """

    events: Any
    store: Any
    clock: Any
    cacheSize: int = 4096
    pending: set = attrs.field(factory=set, init=False)
    _info: OrderedDict = attrs.field(factory=OrderedDict, init=False, repr=False)
    _lookups: dict = attrs.field(factory=dict, init=False, repr=False)
    #: Opens and clicks waiting for the next batch: (type, data, detail).
    _hits: list = attrs.field(factory=list, init=False, repr=False)

    log = Logger()

    def hit(self, type: str, data, detail: dict) -> None:
        """
        Record an open or a click (C{data} a token's C{TokenData}): with
        the others of this reactor turn, in the next.
        """
        hits = self._hits
        hits.append((type, data, detail))
        if len(hits) == 1:
            recorded: Deferred = Deferred()
            self.pending.add(recorded)
            self.clock.callLater(0, self._recordHits, recorded)

    def _recordHits(self, recorded: Deferred) -> None:
        """
        Emit the events of the waiting hits: at once for messages whose tag
        and metadata are known, after the look-up for the others
        (L{record}).
        """
        hits, self._hits = self._hits, []
        info = self._info
        now = self.clock.seconds()
        emit = self.events.emit
        for type, data, detail in hits:
            queueID = data.queue_id
            cached = info.get(queueID)
            if cached is None or (cached[1] is not None and cached[1] <= now):
                self.record(type, data, detail)
                continue
            info.move_to_end(queueID)
            tag, metadata = cached[0]
            try:
                emit(
                    type,
                    queueID,
                    data.recipient,
                    tag=tag,
                    metadata=dict(metadata),
                    detail=detail,
                )
            except Exception:
                self.log.failure(
                    "could not record {type} for {queue_id}", type=type, queue_id=queueID
                )
        self.pending.discard(recorded)
        recorded.callback(None)

    def record(self, type: str, data, detail: dict) -> Deferred:
        """
        Emit an event for the message and recipient of C{data}, with the
        message's tag and metadata when they can be found.

        @return: a L{Deferred} firing once it is emitted (or its failure
            logged).
        """

        def emit(info):
            tag, metadata = info
            self.events.emit(
                type,
                data.queue_id,
                data.recipient,
                tag=tag,
                metadata=dict(metadata),
                detail=detail,
            )

        d = self._messageInfo(data.queue_id)
        d.addCallback(emit)
        d.addErrback(
            lambda f: self.log.failure(
                "could not record {type} for {queue_id}",
                f,
                type=type,
                queue_id=data.queue_id,
            )
        )
        self.pending.add(d)

        def finished(result: Any) -> Any:
            self.pending.discard(d)
            return result

        return d.addBoth(finished)

    def _messageInfo(self, queueID: str) -> Deferred:
        """
        (tag, metadata) of a message, from its C{accepted} event; (None, {})
        if the store does not know it or fails (see the module's
        docstring for what is kept).
        """
        cached = self._info.get(queueID)
        if cached is not None:
            info, until = cached
            if until is None or until > self.clock.seconds():
                self._info.move_to_end(queueID)
                return succeed(info)
            del self._info[queueID]
        waiting = self._lookups.get(queueID)
        if waiting is not None:
            d: Deferred = Deferred()
            waiting.append(d)
            return d
        waiting = self._lookups[queueID] = []

        def remember(info, until):
            self._info[queueID] = (info, until)
            while len(self._info) > self.cacheSize:
                self._info.popitem(last=False)
            return info

        def found(page):
            for event in page.events:
                return remember((event.tag, dict(event.metadata or {})), None)
            return remember((None, {}), self.clock.seconds() + UNKNOWN_FOR)

        def failed(failure):
            self.log.failure(
                "could not look up the tag and metadata of {queue_id}",
                failure,
                queue_id=queueID,
            )
            return (None, {})

        def answer(info):
            del self._lookups[queueID]
            for d in waiting:
                d.callback(info)
            return info

        d = maybeDeferred(
            self.store.queryEvents, type="accepted", queue_id=queueID, limit=1
        )
        return d.addCallbacks(found, failed).addCallback(answer)
