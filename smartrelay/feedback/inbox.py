# -*- test-case-name: tests.test_feedback_processor -*-
"""
The feedback inbox: reports that came back, on disk, before they are
answered C{250}.

Layout under its directory (C{data_dir/feedback}), like a Maildir:

  - C{tmp/}: a report being written;
  - C{new/}: reports received (written, fsynced, renamed here, the
    directory fsynced: only then is the client answered C{250}) and not yet
    turned into events;
  - C{done/}: processed reports, kept for C{[store] retention} so that an
    operator can see what came back, then removed by L{FeedbackInbox.prune}.

A report file is the message as received after one header line,
C{X-SmartRelay-Envelope: {JSON}}, holding the envelope (L{Envelope}): the
file is itself a message a mail reader opens.  The report id, the file's
name, is C{<milliseconds since the epoch>-<12 random hex digits>}, so names
sort by arrival.

Every method that touches the disk runs in the given thread runner, never
on the reactor thread.
"""

import json
import os
import re
import threading
from typing import Callable, Optional

import attrs
from twisted.internet.defer import Deferred

from smartrelay.diskio import fsyncDirectory, unlinkQuietly, writeAll

ENVELOPE_HEADER = b"X-SmartRelay-Envelope: "
REPORT_ID = re.compile(r"[0-9]{13}-[0-9a-f]{12}\Z")


class InboxError(Exception):
    """
    A report could not be written or read; its reason says why.
    """


class DamagedReport(InboxError):
    """
    A report file that reads but is not one this module wrote whole (no
    envelope line, or a bad one): reading it again will not help.
    """


@attrs.frozen
class Envelope:
    """
    How a report arrived.

    @ivar sender: the envelope sender (C{""} for C{<>}).
    @ivar recipients: the accepted RCPT addresses, in order.
    @ivar received: POSIX seconds.
    @ivar client: C{{"ip", "helo", "tls"}}.
    """

    sender: str
    recipients: tuple
    received: float
    client: dict = attrs.field(factory=dict)

    def toJSON(self) -> bytes:
        return json.dumps(
            {
                "sender": self.sender,
                "recipients": list(self.recipients),
                "received": self.received,
                "client": self.client,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def fromJSON(cls, blob: bytes) -> "Envelope":
        """
        @raise ValueError: C{blob} is not an envelope this module wrote.
        """
        value = json.loads(blob)
        if not isinstance(value, dict):
            raise ValueError("the envelope is not a JSON object")
        sender, recipients = value.get("sender"), value.get("recipients")
        received, client = value.get("received"), value.get("client", {})
        if (
            not isinstance(sender, str)
            or not isinstance(recipients, list)
            or not all(isinstance(r, str) for r in recipients)
            or isinstance(received, bool)
            or not isinstance(received, (int, float))
            or not isinstance(client, dict)
        ):
            raise ValueError("the envelope lacks sender, recipients or received")
        return cls(sender, tuple(recipients), float(received), client)


def encodeReport(envelope: Envelope, data: bytes) -> bytes:
    """
    A report file's content.
    """
    return ENVELOPE_HEADER + envelope.toJSON() + b"\r\n" + data


def decodeReport(blob: bytes) -> tuple:
    """
    The (L{Envelope}, message) of a report file's content.

    @raise ValueError: it does not start with the envelope line.
    """
    if not blob.startswith(ENVELOPE_HEADER):
        raise ValueError("no X-SmartRelay-Envelope line")
    end = blob.find(b"\r\n")
    if end < 0:
        raise ValueError("the X-SmartRelay-Envelope line does not end")
    envelope = Envelope.fromJSON(blob[len(ENVELOPE_HEADER) : end])
    return envelope, blob[end + 2 :]


def _newReportID(now: float) -> str:
    return "%013d-%s" % (int(now * 1000), os.urandom(6).hex())


@attrs.define(eq=False)
class FeedbackInbox:
    """
    The reports on disk (see the module docstring).

    @ivar directory: C{data_dir/feedback}.
    @ivar runInThread: C{run(f, *args) -> Deferred} in a thread.
    @ivar fsync: C{os.fsync}; tests pass one that fails.
    """

    directory: str
    runInThread: Callable[..., Deferred]
    fsync: Callable[[int], None] = os.fsync
    fsyncDirectory: Callable[[str], None] = fsyncDirectory
    # Group commit of C{new/}'s fsync: reports renamed while one runs
    # share the next (see L{_syncNew}).
    _renamed: int = attrs.field(default=0, init=False)
    _synced: int = attrs.field(default=0, init=False)
    _ticketLock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _syncLock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def path(self, state: str, reportID: str) -> str:
        """
        Where report C{reportID} is in C{state} (C{"new"} or C{"done"}).
        """
        return os.path.join(self.directory, state, reportID)

    def open(self) -> Deferred:
        """
        Make the directories (if missing) and clear C{tmp/} of what a crash
        left half-written (never answered C{250}); fire with the ids in
        C{new/}, oldest first: reports to process.
        """
        return self.runInThread(self._open)

    def _open(self) -> list:
        for state in ("tmp", "new", "done"):
            os.makedirs(os.path.join(self.directory, state), 0o700, exist_ok=True)
        tmp = os.path.join(self.directory, "tmp")
        for name in os.listdir(tmp):
            unlinkQuietly(os.path.join(tmp, name))
        return sorted(
            name for name in os.listdir(os.path.join(self.directory, "new")) if REPORT_ID.match(name)
        )

    def store(self, envelope: Envelope, data: bytes) -> Deferred:
        """
        Write a report durably into C{new/}; its id holds
        C{envelope.received}.

        @return: a L{Deferred} firing with its report id once it is on
            disk; failing with L{InboxError} if it could not be written (it
            is then not in C{new/}).
        """
        return self.runInThread(self._store, envelope, data)

    def _store(self, envelope: Envelope, data: bytes) -> str:
        reportID = _newReportID(envelope.received)
        tmp = os.path.join(self.directory, "tmp", reportID)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                writeAll(fd, encodeReport(envelope, data))
                self.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path("new", reportID))
            self._syncNew()
        except OSError as e:
            unlinkQuietly(tmp)
            raise InboxError(f"cannot write report {reportID}: {e.strerror or e}") from None
        return reportID

    def _syncNew(self) -> None:
        """
        Make every rename into C{new/} so far durable: one directory fsync
        for all the reports renamed while the previous one ran (the spool
        thread pool writes several at once).
        """
        with self._ticketLock:
            self._renamed += 1
            ticket = self._renamed
        with self._syncLock:
            if self._synced >= ticket:
                return
            with self._ticketLock:
                covered = self._renamed
            self.fsyncDirectory(os.path.join(self.directory, "new"))
            self._synced = covered

    def read(self, reportID: str) -> Deferred:
        """
        Fire with the (L{Envelope}, message) of the report in C{new/}; fail
        with L{InboxError} if it cannot be read, L{DamagedReport} if it is
        damaged.
        """
        return self.runInThread(self._read, reportID)

    def _read(self, reportID: str) -> tuple:
        try:
            with open(self.path("new", reportID), "rb") as f:
                blob = f.read()
        except OSError as e:
            raise InboxError(f"cannot read report {reportID}: {e.strerror or e}") from None
        try:
            return decodeReport(blob)
        except ValueError as e:
            raise DamagedReport(f"report {reportID} is damaged: {e}") from None

    def markDone(self, reportID: str) -> Deferred:
        """
        Move a processed report from C{new/} to C{done/}.  (Not fsynced:
        if the move is lost in a crash the report is processed again,
        which adds nothing.)
        """
        return self.runInThread(
            os.rename, self.path("new", reportID), self.path("done", reportID)
        )

    def prune(self, before: float) -> Deferred:
        """
        Remove processed reports received before C{before} (POSIX seconds,
        read from their ids); fire with how many went.
        """
        return self.runInThread(self._prune, before)

    def _prune(self, before: float) -> int:
        cutoff = "%013d" % (max(0, int(before * 1000)),)
        done = os.path.join(self.directory, "done")
        removed = 0
        for name in os.listdir(done):
            if REPORT_ID.match(name) and name[:13] < cutoff:
                unlinkQuietly(os.path.join(done, name))
                removed += 1
        return removed


def receivedAt(reportID: str) -> Optional[float]:
    """
    The arrival time (POSIX seconds) in a report id, or L{None}.
    """
    if not REPORT_ID.match(reportID):
        return None
    return int(reportID[:13]) / 1000.0
