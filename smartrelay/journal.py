# -*- test-case-name: tests.test_journal -*-
"""
A bounded on-disk journal for events the store could not take.

The spool, not the store, is the source of truth, so accepting mail must not
fail because the store is unreachable.  L{smartrelay.events.EventLog} puts
the events it cannot write into this journal and replays them, in order,
when the store is back.

Suppression entries the store could not take (an unsubscribe or a
complaint that arrived while Redis was down) ride in the same journal, as
lines of their own (C{{"suppression": {...}}}), and are replayed in order
with the events around them.

The journal is a directory of numbered segment files of JSON lines.  New
events go to the current segment; L{EventJournal.seal} starts a new one, and
sealed segments are replayed oldest first and removed once the store has
them.  All file work runs through C{runInThread}, which must run jobs in
order (a one-thread pool).
"""

import json
import os
from typing import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from smartrelay.diskio import appendDurably
from smartrelay.events import Event
from smartrelay.store.interfaces import SuppressionEntry

SUFFIX = ".jsonl"

#: How a suppression entry's line starts (an event's line starts with C{"id"}).
SUPPRESSION_LINE = b'{"suppression":'


def _record(e) -> dict:
    if isinstance(e, SuppressionEntry):
        return {"suppression": attrs.asdict(e)}
    return {
        "id": e.id,
        "time": e.time,
        "type": e.type,
        "queue_id": e.queue_id,
        "recipient": e.recipient,
        "tag": e.tag,
        "metadata": e.metadata,
        "detail": e.detail,
    }


def encodeEvents(records: list) -> bytes:
    """
    Events (and L{SuppressionEntry} objects) as JSON lines, times kept as
    POSIX seconds so they round-trip.
    """
    return b"".join(
        json.dumps(_record(e), separators=(",", ":")).encode("utf-8") + b"\n"
        for e in records
    )


def decodeEvents(raw: bytes) -> tuple:
    """
    Parse journal lines; returns C{(records, skipped)}: the L{Event} and
    L{SuppressionEntry} objects in their order, and how many lines were
    unreadable (a torn last line after a crash is expected).
    """
    events, skipped = [], 0
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
            if "suppression" in record:
                events.append(SuppressionEntry(**record["suppression"]))
                continue
            events.append(
                Event(
                    type=record["type"],
                    queue_id=record["queue_id"],
                    recipient=record["recipient"],
                    time=float(record["time"]),
                    tag=record["tag"],
                    metadata=dict(record["metadata"]),
                    detail=dict(record["detail"]),
                    id=str(record["id"]),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped += 1
    return events, skipped


def _suppressionsIn(path: str) -> list:
    """
    The suppression entries in one segment (a cheap scan: only their lines
    are parsed).
    """
    with open(path, "rb") as f:
        lines = [line for line in f if line.startswith(SUPPRESSION_LINE)]
    return decodeEvents(b"".join(lines))[0]


@attrs.define(eq=False)
class EventJournal:
    """
    See the module docstring.

    @ivar maxBytes: the journal's size limit; past it new events are
        refused (and the caller logs them as lost).
    """

    directory: str
    runInThread: Callable[..., Deferred]
    maxBytes: int = 256 * 1024 * 1024
    size: int = attrs.field(default=0, init=False)
    _current: int = attrs.field(default=0, init=False)

    log = Logger()

    def _segment(self, number: int) -> str:
        return os.path.join(self.directory, "%012d%s" % (number, SUFFIX))

    def open(self) -> Deferred:
        """
        Create the directory if needed and take stock of what is there.
        Fires with the number of segments waiting to be replayed.
        """

        def scan():
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            numbers, size = [], 0
            for name in os.listdir(self.directory):
                stem = name[: -len(SUFFIX)]
                if name.endswith(SUFFIX) and stem.isdigit():
                    numbers.append(int(stem))
                    size += os.path.getsize(os.path.join(self.directory, name))
            return numbers, size

        def scanned(result):
            numbers, self.size = result
            self._current = max(numbers, default=-1) + 1
            return len(numbers)

        return self.runInThread(scan).addCallback(scanned)

    def append(self, events: list) -> Deferred:
        """
        Durably add events to the current segment.  Fires with True, or with
        False if the journal is full and the events were not kept.
        """
        blob = encodeEvents(events)
        if self.size + len(blob) > self.maxBytes:
            return succeed(False)
        self.size += len(blob)
        return self.runInThread(appendDurably, self._segment(self._current), blob).addCallback(
            lambda _: True
        )

    def seal(self) -> None:
        """
        Later appends go to a new segment.
        """
        self._current += 1

    def sealedSegments(self) -> Deferred:
        """
        The paths of sealed segments, oldest first.
        """
        current = self._current

        def scan():
            numbers = sorted(
                int(name[: -len(SUFFIX)])
                for name in os.listdir(self.directory)
                if name.endswith(SUFFIX) and name[: -len(SUFFIX)].isdigit()
            )
            return [self._segment(n) for n in numbers if n < current]

        return self.runInThread(scan)

    def read(self, path: str) -> Deferred:
        """
        The events in one segment (unreadable lines skipped with a warning).
        """

        def load():
            with open(path, "rb") as f:
                return decodeEvents(f.read())

        def loaded(result):
            events, skipped = result
            if skipped:
                self.log.warn(
                    "skipped {count} unreadable line(s) in {path}", count=skipped, path=path
                )
            return events

        return self.runInThread(load).addCallback(loaded)

    def suppressions(self) -> Deferred:
        """
        The suppression entries in every segment, oldest first: those the
        store has not taken yet (read at start-up, so that the relay never
        delivers to them meanwhile).
        """

        def scan():
            names = sorted(
                name
                for name in os.listdir(self.directory)
                if name.endswith(SUFFIX) and name[: -len(SUFFIX)].isdigit()
            )
            found = []
            for name in names:
                found.extend(_suppressionsIn(os.path.join(self.directory, name)))
            return found

        return self.runInThread(scan)

    def remove(self, path: str) -> Deferred:
        """
        Delete a replayed segment.
        """

        def unlink():
            size = os.path.getsize(path)
            os.unlink(path)
            return size

        def removed(size):
            self.size = max(0, self.size - size)

        return self.runInThread(unlink).addCallback(removed)
