# -*- test-case-name: tests.test_journal -*-
"""
A bounded on-disk journal for events the store could not take.

The spool, not the store, is the source of truth, so accepting mail must not
fail because the store is unreachable.  L{smartrelay.events.EventLog} puts
the events it cannot write into this journal and replays them, in order,
when the store is back.

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

SUFFIX = ".jsonl"


def encodeEvents(events: list) -> bytes:
    """
    Events as JSON lines, times kept as POSIX seconds so they round-trip.
    """
    return b"".join(
        json.dumps(
            {
                "id": e.id,
                "time": e.time,
                "type": e.type,
                "queue_id": e.queue_id,
                "recipient": e.recipient,
                "tag": e.tag,
                "metadata": e.metadata,
                "detail": e.detail,
            },
            separators=(",", ":"),
        ).encode("utf-8")
        + b"\n"
        for e in events
    )


def decodeEvents(raw: bytes) -> tuple:
    """
    Parse journal lines; returns C{(events, skipped)} where C{skipped} counts
    unreadable lines (a torn last line after a crash is expected).
    """
    events, skipped = [], 0
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
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
        except (ValueError, KeyError, TypeError):
            skipped += 1
    return events, skipped


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
