"""
The durable on-disk queue (DESIGN section 1.3: no 250 before the message is
on disk; a 250 means the relay never loses it).

It stores the message model of L{smartrelay.message} (L{SpoolEntry}: one
accepted message, envelope and per-recipient L{Recipient} state); the
message bytes stay on disk and are read with L{Spool.readMessage}.

On-disk layout
==============

The spool directory holds append-only I{segment} files named
C{segment-<16 hex digits>.log}, numbered in the order they were created.
A segment is a sequence of records; each record is a fixed header
(L{RECORD_HEADER}: the magic C{SRL1}, a type byte, the payload length and
the CRC-32 of the payload) followed by its payload:

* C{MESSAGE}: a new message, the payload being L{encodeEntry}'s form
  (envelope JSON, then the message bytes, with their own CRC-32);
* C{STATE}: the queue id, a newline, then one L{encodeState} line per
  recipient whose state changed;
* C{DONE}: the queue id of a finished message (every recipient final).

Only the newest (I{active}) segment is ever appended to.  No file is created
or removed per message: that is the point of this layout, because on ext4
every creation, rename and unlink of a per-message file serializes on the
directory lock and the journal.

Durability
==========

Writes are batched (group commit): at most one batch is being written at a
time, and everything asked for while it is (new messages, state changes,
finished messages) goes into the next one.  A batch is one C{write} of all
its records at the end of the active segment followed by one
C{fdatasync}; only when a batch starts a new segment is the directory
fsynced too, once.  L{Spool.store} fires (and the client gets its C{250})
only after the C{fdatasync} covering the message returned;
L{Spool.record} applies new states to the entry only after theirs did.

If a batch's write or flush fails, every waiter of that batch fails, the
segment is truncated back to where the batch started (best effort) and
closed, and the next batch starts a new segment: no later acknowledged
batch is ever written behind a failed one.  If the truncation itself
fails, the failed batch's records may still be found, complete, by a later
recovery.  For a message whose C{store} failed that means it may be
delivered although its client got a C{451} (and may have sent it again): a
duplicate, never a loss.  For a failed C{record} it means a state that did
happen (the delivery attempt was made) is remembered after all.

Segments are removed, oldest first, once no message in them has work left:
a segment may hold the C{STATE} and C{DONE} records of messages stored in
older segments, so a segment is only removed when every older one is gone
(removals are then never needed for correctness: a crash before an unlink
reaches the disk just means recovery finds the segment finished and removes
it then).  So that one message deferred for days does not pin a whole
segment (and every segment after it), I{compaction} copies the live
messages of the oldest sealed segments, once they are old enough and mostly
finished, to the active segment (their C{MESSAGE} record byte for byte,
followed by a C{STATE} snapshot of every recipient) in a normal batch; once
that batch is durable the old segment has nothing live and is removed.
When nothing at all is left to deliver every segment is removed, so an idle
spool holds no files (under steady load that happens now and then: the next
batch then creates a new segment, one file creation and directory fsync for
a few dozen batches).  Removals are made oldest segment first; the file
system is trusted to keep those directory operations in order (ext4's
journal does): were a newer segment's removal to survive a crash and an
older one's not, the older one's messages would be delivered again (a
duplicate, never a loss).

Crash recovery
==============

L{Spool.recover} reads the segments in number order and their records in
file order.  The last C{MESSAGE} record of a queue id gives its location
(there are several after compaction); C{STATE} and C{DONE} records apply in
log order.  A record torn by a crash during a batch (cut short, or its CRC
wrong while it is the last record of its segment) was never acknowledged:
the segment is truncated there.  A record with a sane header but a wrong CRC
in the middle of a segment is skipped; a header that makes no sense in the
middle of a segment makes the rest of that segment unreadable.  In both
cases the bytes are copied to L{Spool.corruptDirectory} (never deleted) and
a warning is logged; so are C{MESSAGE} records that do not decode.  New
records always go to a new segment after recovery.

Files in the per-message layout of earlier versions (C{<id>.msg},
C{<id>.state}, C{tmp-*}) are migrated on recovery: loaded as those versions
did, written to a new segment, flushed, and only then removed.
"""

import errno
import json
import math
import os
import re
import struct
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.diskio import fsyncDirectory, unlinkQuietly, writeAll
from smartrelay.ids import fileName
from smartrelay.message import FINAL_STATES, Recipient, SpoolEntry


class SpoolError(Exception):
    """
    The spool could not durably store or update something (disk full, I/O
    error).  Temporary from the client's point of view: C{451 4.3.0}.
    """


class SpoolCorrupt(SpoolError):
    """
    A spool file failed its integrity check.
    """


#: The magic of L{encodeEntry}'s form (and of the per-message layout's
#: C{.msg} files).
MAGIC = b"SRSPOOL1 "
STATE_SUFFIX = ".state"
MESSAGE_SUFFIX = ".msg"
TEMP_PREFIX = "tmp-"


def encodeEntry(entry: SpoolEntry, data: bytes) -> bytes:
    """
    The on-disk form of a new message: a magic line with the header length,
    a JSON header (envelope, size and CRC-32 of the message), then the
    message bytes.
    """
    fields = {
        "queue_id": entry.queue_id,
        "sender": entry.sender,
        "recipients": [r.address for r in entry.recipients],
        "received": entry.received,
        "client": entry.client,
        "size": len(data),
        "crc32": zlib.crc32(data),
    }
    if entry.tag is not None:
        fields["tag"] = entry.tag
    if entry.metadata:
        fields["metadata"] = entry.metadata
    if entry.options:
        fields["options"] = entry.options
    header = json.dumps(fields, separators=(",", ":")).encode("utf-8")
    return b"".join([MAGIC, b"%d\n" % (len(header),), header, b"\n", data])


def decodeEntry(raw: bytes) -> tuple[SpoolEntry, bytes]:
    """
    Parse and verify a spool file written by L{encodeEntry}.

    @raise SpoolCorrupt: anything does not check out.
    """
    if not raw.startswith(MAGIC):
        raise SpoolCorrupt("bad magic")
    eol = raw.find(b"\n", len(MAGIC))
    try:
        headerLength = int(raw[len(MAGIC) : eol])
        header = json.loads(raw[eol + 1 : eol + 1 + headerLength])
        data = raw[eol + 2 + headerLength :]
        recipients = [Recipient(address=str(a)) for a in header["recipients"]]
        entry = SpoolEntry(
            queue_id=str(header["queue_id"]),
            sender=str(header["sender"]),
            recipients=recipients,
            received=float(header["received"]),
            size=int(header["size"]),
            client=dict(header["client"]),
            tag=None if header.get("tag") is None else str(header["tag"]),
            metadata={str(k): str(v) for k, v in dict(header.get("metadata", {})).items()},
            options={str(k): bool(v) for k, v in dict(header.get("options", {})).items()},
        )
        expected = (int(header["size"]), int(header["crc32"]))
    except (ValueError, KeyError, TypeError) as e:
        raise SpoolCorrupt(f"unreadable header: {e}") from e
    if raw[eol + 1 + headerLength : eol + 2 + headerLength] != b"\n":
        raise SpoolCorrupt("header not terminated")
    if (len(data), zlib.crc32(data)) != expected:
        raise SpoolCorrupt("message size or checksum mismatch (truncated file?)")
    if not recipients:
        raise SpoolCorrupt("no recipients")
    return entry, data


#: The JSON of the recipient states (C{encodeState}'s C{"s"}).
_STATE_JSON = {
    state: json.dumps(state)
    for state in ("queued", "deferred", "delivered", "bounced", "expired", "suppressed")
}


#: What C{json.dumps} does with a string (C{ensure_ascii}), without its
#: checks and keyword handling: a third of its time.
_quote = json.encoder.encode_basestring_ascii


def _jsonString(value: Any) -> str:
    return _quote(value) if type(value) is str else json.dumps(value)


def encodeState(recipient: Recipient) -> bytes:
    """
    One line of a C{STATE} record: C{{"a":address,"s":state,"n":attempts,
    "t":next_attempt}} as compact JSON and a newline.  Written out by hand
    (the bytes of C{json.dumps(..., separators=(",", ":"))}, half the time:
    every outcome, and every parked recipient's deferral, writes one).
    """
    return _encodeStateText(recipient).encode("ascii")


def _encodeStateText(recipient: Recipient) -> str:
    attempts, nextAttempt, state = recipient.attempts, recipient.next_attempt, recipient.state
    return '{"a":%s,"s":%s,"n":%s,"t":%s}\n' % (
        _jsonString(recipient.address),
        _STATE_JSON.get(state) if type(state) is str and state in _STATE_JSON
        else json.dumps(state),
        int.__repr__(attempts) if type(attempts) is int else json.dumps(attempts),
        float.__repr__(nextAttempt)
        if type(nextAttempt) is float and math.isfinite(nextAttempt)
        else json.dumps(nextAttempt),
    )


def applyState(entry: SpoolEntry, raw: bytes) -> int:
    """
    Apply a state journal to C{entry}; returns how many lines were skipped
    as unreadable (a torn last line after a crash is expected).
    """
    skipped = 0
    byAddress = {r.address: i for i, r in enumerate(entry.recipients)}
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
            index = byAddress[record["a"]]
            entry.recipients[index] = Recipient(
                address=record["a"],
                state=str(record["s"]),
                attempts=int(record["n"]),
                next_attempt=float(record["t"]),
            )
        except (ValueError, KeyError, TypeError):
            skipped += 1
    return skipped


# -- the log -----------------------------------------------------------------

#: Record header: magic, type, payload length, CRC-32 of the payload.
RECORD_HEADER = struct.Struct(">4sBII")
RECORD_MAGIC = b"SRL1"
MESSAGE = 1
STATE = 2
DONE = 3
RECORD_TYPES = frozenset([MESSAGE, STATE, DONE])
#: No record is longer than this: a longer length field is damage.
MAX_PAYLOAD = 1 << 30

SEGMENT_PREFIX = "segment-"
SEGMENT_SUFFIX = ".log"
_SEGMENT_RE = re.compile(r"^segment-([0-9a-f]{16})\.log$")


def encodeRecord(kind: int, payload: bytes) -> bytes:
    """
    One log record: L{RECORD_HEADER} then C{payload}.
    """
    return RECORD_HEADER.pack(RECORD_MAGIC, kind, len(payload), zlib.crc32(payload)) + payload


def statePayload(queueID: str, recipients: list) -> bytes:
    """
    The payload of a C{STATE} record: the queue id, a newline, then one
    L{encodeState} line per recipient.
    """
    # The lines as one string, encoded once (the JSON is ASCII).
    return queueID.encode("utf-8") + b"\n" + "".join(
        [_encodeStateText(r) for r in recipients]
    ).encode("ascii")


def _apply(entry: SpoolEntry, changes: list) -> None:
    """
    Merge recorded C{changes} into C{entry} as it is now (another record
    for other recipients of the same entry may have completed meanwhile).
    """
    recipients = entry.recipients
    if len(changes) == 1:
        change = changes[0]
        address = change.address
        if len(recipients) == 1:
            # Most messages: a list of one (a comprehension's would have
            # room for four, 24 bytes more for every queued message).
            entry.recipients = [change if recipients[0].address == address else recipients[0]]
        else:
            entry.recipients = [change if r.address == address else r for r in recipients]
    else:
        byAddress = {r.address: r for r in changes}
        entry.recipients = [byAddress.get(r.address, r) for r in recipients]


def _waiting(entry: SpoolEntry) -> bool:
    """
    Whether every recipient of C{entry} left waits for a retry (none is
    still C{queued}).
    """
    for recipient in entry.recipients:
        if recipient.state == "queued":
            return False
    return True


def segmentName(number: int) -> str:
    """
    The file name of segment C{number}.
    """
    return "%s%016x%s" % (SEGMENT_PREFIX, number, SEGMENT_SUFFIX)


def segmentNumber(name: str) -> Optional[int]:
    """
    The number of the segment named C{name}, or L{None} if it is not one.
    """
    match = _SEGMENT_RE.match(name)
    return int(match.group(1), 16) if match else None


def parseRecord(raw: bytes, offset: int = 0) -> tuple:
    """
    Check the record at C{offset} of C{raw}.

    @return: C{(kind, payload, length, problem)}: C{problem} is L{None} for
        a sound record (C{length} is its whole length, header included);
        C{"insane"} if the header makes no sense (bad magic, type or
        length); C{"torn"} if the record runs past the end of C{raw};
        C{"crc"} if the payload does not match its checksum.
    """
    if len(raw) - offset < RECORD_HEADER.size:
        return None, b"", 0, "torn"
    magic, kind, size, crc = RECORD_HEADER.unpack_from(raw, offset)
    if magic != RECORD_MAGIC or kind not in RECORD_TYPES or size > MAX_PAYLOAD:
        return kind, b"", 0, "insane"
    length = RECORD_HEADER.size + size
    if offset + length > len(raw):
        return kind, b"", length, "torn"
    payload = raw[offset + RECORD_HEADER.size : offset + length]
    if zlib.crc32(payload) != crc:
        return kind, payload, length, "crc"
    return kind, payload, length, None


_FIELD = 40
_MASK = (1 << _FIELD) - 1


def _pack(location: tuple) -> Any:
    number, offset, length = location
    if 0 <= offset <= _MASK and 0 <= length <= _MASK and number >= 0:
        return (number << (2 * _FIELD)) | (offset << _FIELD) | length
    return (number, offset, length)


def _unpack(value: Any) -> tuple:
    if type(value) is tuple:
        return value
    return (value >> (2 * _FIELD), (value >> _FIELD) & _MASK, value & _MASK)


def _segmentOf(value: Any) -> int:
    return value[0] if type(value) is tuple else value >> (2 * _FIELD)


class Locations:
    """
    The spool's messages (those with work left, and those whose C{DONE}
    record is not yet durable) by queue id, and where each one's latest
    C{MESSAGE} record is: C{(segment number, offset, length)}.

    A queue of a million deferred messages keeps a million of these, so
    one dict maps the queue id to the L{SpoolEntry} and the location is
    kept on the entry itself (L{SpoolEntry.spoolLocation}), as one integer
    (the three numbers packed, 40 bits for the offset and the length)
    rather than a tuple of three: one dict entry a message instead of two
    (a table of entries and one of locations).  An offset or length
    that does not fit (a segment past a terabyte) is kept as the tuple.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, queueID: object) -> bool:
        return queueID in self._entries

    def place(self, entry: SpoolEntry, location: tuple) -> None:
        """
        Keep C{entry} (instead of any other entry of its queue id) and its
        latest record's C{location}.
        """
        entry.spoolLocation = _pack(location)
        self._entries[entry.queue_id] = entry

    def entry(self, queueID: str) -> Optional[SpoolEntry]:
        return self._entries.get(queueID)

    def entries(self) -> Iterator[SpoolEntry]:
        return iter(self._entries.values())

    def segmentOf(self, queueID: str) -> Optional[int]:
        """
        The number of the segment holding C{queueID}'s latest record, or
        L{None}.
        """
        entry = self._entries.get(queueID)
        return None if entry is None else _segmentOf(entry.spoolLocation)

    def __getitem__(self, queueID: str) -> tuple:
        return _unpack(self._entries[queueID].spoolLocation)

    def get(self, queueID: str, default: Any = None) -> Any:
        entry = self._entries.get(queueID)
        return default if entry is None else _unpack(entry.spoolLocation)

    def pop(self, queueID: str, default: Any = None) -> Any:
        entry = self._entries.pop(queueID, None)
        return default if entry is None else _unpack(entry.spoolLocation)

    def __delitem__(self, queueID: str) -> None:
        del self._entries[queueID]

    def items(self) -> Iterator[tuple]:
        for queueID, entry in self._entries.items():
            yield queueID, _unpack(entry.spoolLocation)


@attrs.define
class _Segment:
    """
    What the spool knows of one segment file.

    @ivar size: bytes durably written to it.
    @ivar live: the queue ids of the messages placed in it: those with
        work left whose latest copy is in this segment, and some that have
        finished or been copied forward since (the spool's L{Locations}
        tells which: a list costs 8 bytes a message where a set of a
        segment's 30,000 cost some 70; it is pruned whenever it holds more
        than twice as many as are live).
    @ivar liveCount: how many of them are live.
    @ivar liveBytes: the sum of the live ones' record lengths.
    @ivar sealedAt: when it stopped being the active segment (the spool's
        clock), or L{None} while it is active.
    """

    number: int
    path: str
    size: int = 0
    live: list = attrs.field(factory=list)
    liveCount: int = 0
    liveBytes: int = 0
    sealedAt: Optional[float] = None

    def addLive(self, queueID: str, length: int) -> None:
        """
        A message's latest record is now in this segment (never twice for
        one queue id: records are only placed in the active segment, each
        message's at most once).
        """
        self.live.append(queueID)
        self.liveCount += 1
        self.liveBytes += length

    def dropLive(self, locations: Locations, length: int) -> None:
        """
        One of its live messages finished or was copied forward
        (C{locations} already says so).
        """
        self.liveCount -= 1
        self.liveBytes -= length
        if len(self.live) > 2 * self.liveCount + 16:
            self.live = self.liveIDs(locations)

    def liveIDs(self, locations: Locations) -> list:
        """
        The queue ids of its live messages.
        """
        number, segmentOf = self.number, locations.segmentOf
        return [q for q in self.live if segmentOf(q) == number]


@attrs.define
class _Writer:
    """
    The active segment's open file; used only by L{_writeBatch}, one batch
    at a time.
    """

    directory: str
    fd: Optional[int] = None


@attrs.define
class _Batch:
    """
    What one call of L{_writeBatch} does.

    @ivar path: the segment appended to.
    @ivar newSegment: create C{path} (and fsync the directory).
    @ivar start: the segment's size before this batch.
    @ivar pieces: in order, C{bytes} (an encoded record), C{(type,
        payload)} (a record to encode) or C{(path, offset, length)} (a
        record copied byte for byte from an older segment).
    @ivar deletions: C{(number, path)} of segments to remove, oldest first,
        once the batch is durable.
    @ivar retire: close the active segment after the batch (it is among
        the deletions).
    """

    path: str
    newSegment: bool
    start: int
    pieces: list
    deletions: list = attrs.field(factory=list)
    retire: bool = False


def _readRange(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(raw) != length:
        raise OSError(errno.EIO, f"short read of {length} bytes at {offset} of {path}")
    return raw


def _resolvePiece(piece) -> bytes:
    if isinstance(piece, bytes):
        return piece
    if len(piece) == 2:
        return encodeRecord(*piece)
    return _readRange(*piece)


def _writeBatch(writer: _Writer, batch: _Batch) -> list:
    """
    Append one batch to the active segment and make it durable; blocking,
    runs in a thread.

    All the records are written with one C{write} and flushed with one
    C{fdatasync} (plus one directory fsync when the segment is new).  On
    failure the segment is truncated back to C{batch.start} (best effort)
    and closed, and the error is raised: the caller must then start a new
    segment.  After success the segments in C{batch.deletions} are removed,
    oldest first, stopping at the first that cannot be.

    @return: the numbers of the segments removed.
    """
    if batch.newSegment:
        if writer.fd is not None:
            os.close(writer.fd)
            writer.fd = None
        writer.fd = os.open(
            batch.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
    fd = writer.fd
    if fd is None:
        raise OSError(errno.EBADF, "no active segment")
    try:
        blob = b"".join(map(_resolvePiece, batch.pieces))
        writeAll(fd, blob)
        os.fdatasync(fd)
        if batch.newSegment:
            fsyncDirectory(writer.directory)
    except BaseException:
        writer.fd = None
        try:
            os.ftruncate(fd, batch.start)
        except OSError:
            pass
        os.close(fd)
        raise
    if batch.retire:
        writer.fd = None
        os.close(fd)
    removed = []
    for number, path in batch.deletions:
        try:
            unlinkQuietly(path)
        except OSError:
            break
        removed.append(number)
    return removed


@attrs.define(eq=False)
class _Op:
    """
    One thing waiting for the next batch: a new message (C{data} set) or a
    state change (C{changes} set; C{finishing}: a C{DONE} record).
    C{waiter} is L{None} for the spool's own C{DONE} records.
    """

    entry: SpoolEntry
    payload: bytes
    waiter: Optional[Deferred]
    data: Optional[bytes] = None
    changes: Optional[list] = None
    finishing: bool = False


@attrs.define(eq=False)
class _Group:
    """
    The records of one L{Spool.recordMany}: C{results} filled in by their
    L{_Member}s, C{deferred} fired with them when C{left} reaches 0.
    """

    deferred: Deferred
    results: list
    left: int


class _Member:
    """
    The waiter of one record of a L{_Group} (what L{Spool._batchWritten}
    tells, as it tells a record's L{Deferred}).
    """

    __slots__ = ("group", "index")

    def __init__(self, group: _Group, index: int) -> None:
        self.group, self.index = group, index

    def callback(self, _: Any) -> None:
        self._done((True, None))

    def errback(self, failure: Failure) -> None:
        self._done((False, failure))

    def _done(self, result: tuple) -> None:
        group = self.group
        group.results[self.index] = result
        group.left -= 1
        if group.left == 0:
            group.deferred.callback(group.results)


class MessageCache:
    """
    Message bytes by queue id, oldest dropped first past C{limit} bytes.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self._items: "OrderedDict[str, bytes]" = OrderedDict()

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.limit // 4:
            return
        self._items[key] = data
        self.size += len(data)
        while self.size > self.limit:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped)

    def get(self, key: str) -> Optional[bytes]:
        return self._items.get(key)

    def pop(self, key: str) -> None:
        data = self._items.pop(key, None)
        if data is not None:
            self.size -= len(data)



@attrs.define(eq=False)
class Spool:
    """
    The durable on-disk queue: a log of segment files in one directory (see
    the module docstring for the layout, the durability argument and crash
    recovery).

    Every blocking call runs through C{runInThread(f, *args) -> Deferred}
    (a thread pool in production, a synchronous stand-in in unit tests);
    the delivery side's reads of messages not in memory go through a
    separate C{runDeliveryIO} so that they never queue in front of the
    latency-critical writes.

    Messages just stored are kept in a bounded in-memory cache
    (C{cacheBytes}) until they are finished or wait for a retry (no
    recipient left C{queued}), so the first delivery attempt does not read
    them back from disk.

    @ivar directory: the spool directory (created if missing).
    @ivar maxBatch: at most this many new messages go into one batch.
    @ivar segmentBytes: a new segment is started once the active one has
        grown past this.
    @ivar compactAfter: seconds after being sealed before a segment's live
        messages may be copied forward.
    @ivar compactRatio: ...when its live messages take at most this share
        of it.
    @ivar compactBytes: at most about this many bytes are copied forward per
        batch.
    @ivar clock: the reactor's clock (C{seconds()}), read on the reactor
        thread only: when a segment was sealed, for C{compactAfter}.  A
        wall-clock jump only makes a compaction early or late, which is
        harmless (it never changes what the log holds).
    """

    directory: str
    runInThread: Callable[..., Deferred]
    clock: IReactorTime = attrs.field(kw_only=True)
    runDeliveryIO: Optional[Callable[..., Deferred]] = None
    cacheBytes: int = 64 * 1024 * 1024
    maxBatch: int = 256
    segmentBytes: int = 64 * 1024 * 1024
    compactAfter: float = 300.0
    compactRatio: float = 0.25
    compactBytes: int = 8 * 1024 * 1024
    _cache: "MessageCache" = attrs.field(init=False)
    _writer: _Writer = attrs.field(init=False)
    _pendingStores: list = attrs.field(factory=list, init=False)
    _pendingRecords: list = attrs.field(factory=list, init=False)
    _writing: bool = attrs.field(default=False, init=False)
    _segments: dict = attrs.field(factory=dict, init=False)
    _active: Optional[_Segment] = attrs.field(default=None, init=False)
    _rollNext: bool = attrs.field(default=False, init=False)
    _nextNumber: int = attrs.field(default=1, init=False)
    _locations: Locations = attrs.field(factory=Locations, init=False)
    #: Queue ids whose C{DONE} record the spool queued itself (finished
    #: by concurrent records), so that it is queued once.
    _doneQueued: set = attrs.field(factory=set, init=False)

    log = Logger()

    def __attrs_post_init__(self):
        if self.runDeliveryIO is None:
            self.runDeliveryIO = self.runInThread
        self._cache = MessageCache(self.cacheBytes)
        self._writer = _Writer(self.directory)

    @property
    def corruptDirectory(self) -> str:
        return os.path.join(self.directory, "corrupt")

    @property
    def diskBytes(self) -> int:
        """
        Bytes durably written to the segment files (for C{/metrics}).
        """
        return sum(segment.size for segment in self._segments.values())

    @property
    def liveBytes(self) -> int:
        """
        Bytes of the latest copies of the messages with work left.
        """
        return sum(segment.liveBytes for segment in self._segments.values())

    @property
    def segmentCount(self) -> int:
        """
        Segment files in the spool.
        """
        return len(self._segments)

    def _segmentPath(self, number: int) -> str:
        return os.path.join(self.directory, segmentName(number))

    # -- recovery ---------------------------------------------------------

    def recover(self) -> Deferred:
        """
        Read the log on start (and migrate files of the per-message layout),
        truncate torn tails, move damaged records aside.  Fires with the
        list of L{SpoolEntry} that still have work to do, oldest first.
        Call it once, before anything else.
        """
        # The segments found count as sealed now, by the reactor's clock
        # (read here, not in the thread).
        return self.runInThread(self._recover, self.clock.seconds())

    def _recover(self, now: float) -> list:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        names = sorted(os.listdir(self.directory))
        numbers = sorted(n for n in map(segmentNumber, names) if n is not None)
        locations = Locations()
        finished: set = set()
        sizes: dict = {}
        for number in numbers:
            sizes[number] = self._replaySegment(number, locations, finished)
        for queueID in [e.queue_id for e in locations.entries() if e.done]:
            del locations[queueID]
            finished.add(queueID)
        nextNumber = (numbers[-1] + 1) if numbers else 1

        legacy = [
            n
            for n in names
            if n.startswith(TEMP_PREFIX) or n.endswith(MESSAGE_SUFFIX) or n.endswith(STATE_SUFFIX)
        ]
        if legacy:
            nextNumber = self._migrate(names, nextNumber, locations, finished, sizes)

        segments = {
            number: _Segment(number, self._segmentPath(number), size, sealedAt=now)
            for number, size in sizes.items()
        }
        for queueID, (number, _, length) in locations.items():
            segments[number].addLive(queueID, length)
        # Remove the finished segments at the head of the log (all of them
        # if nothing is left to deliver).
        for number in sorted(segments):
            if segments[number].liveCount:
                break
            unlinkQuietly(segments.pop(number).path)

        self._segments = segments
        self._locations = locations
        self._nextNumber = nextNumber
        return sorted(locations.entries(), key=lambda e: e.received)

    def _replaySegment(self, number: int, locations: Locations, finished: set) -> int:
        """
        Apply the records of one segment; returns its (possibly truncated)
        size.
        """
        path = self._segmentPath(number)
        name = segmentName(number)
        with open(path, "rb") as f:
            raw = f.read()
        offset = 0
        while offset < len(raw):
            kind, payload, length, problem = parseRecord(raw, offset)
            if problem == "crc" and offset + length < len(raw):
                self._saveAside(
                    f"{name}-{offset:x}.record",
                    raw[offset : offset + length],
                    f"record at offset {offset} of {name} failed its checksum; skipped",
                )
                offset += length
                continue
            if problem == "insane" and raw[offset:].strip(b"\0"):
                self._saveAside(
                    f"{name}-{offset:x}.rest",
                    raw[offset:],
                    f"unreadable record header at offset {offset} of {name}; "
                    f"the rest of the segment ({len(raw) - offset} bytes) is unreadable",
                )
                os.truncate(path, offset)
                return offset
            if problem is not None:
                self.log.info(
                    "{name}: truncating an unfinished write of {count} byte(s) at offset {offset}",
                    name=name,
                    count=len(raw) - offset,
                    offset=offset,
                )
                os.truncate(path, offset)
                return offset
            self._replayRecord(
                name, number, offset, kind, payload, raw[offset : offset + length],
                locations, finished,
            )
            offset += length
        return len(raw)

    def _replayRecord(
        self,
        name: str,
        number: int,
        offset: int,
        kind: int,
        payload: bytes,
        record: bytes,
        locations: Locations,
        finished: set,
    ) -> None:
        if kind == MESSAGE:
            try:
                entry, _ = decodeEntry(payload)
            except SpoolCorrupt as e:
                self._saveAside(
                    f"{name}-{offset:x}.record",
                    record,
                    f"undecodable message at offset {offset} of {name}: {e}",
                )
                return
            if entry.queue_id in finished:
                return
            # The first copy's entry is kept (the states since apply to
            # it), at the latest copy's location.
            kept = locations.entry(entry.queue_id)
            locations.place(entry if kept is None else kept, (number, offset, len(record)))
            return
        queueLine, _, rest = payload.partition(b"\n")
        queueID = queueLine.decode("utf-8", "replace")
        if kind == DONE:
            locations.pop(queueID, None)
            finished.add(queueID)
            return
        entry = locations.entry(queueID)
        if entry is None:
            return
        skipped = applyState(entry, rest)
        if skipped:
            self.log.warn(
                "{queue_id}: skipped {count} unreadable state line(s) in {name}",
                queue_id=queueID,
                count=skipped,
                name=name,
            )

    def _saveAside(self, name: str, blob: bytes, why: str) -> None:
        """
        Keep damaged bytes in the corrupt directory, durably, with a
        warning.
        """
        os.makedirs(self.corruptDirectory, mode=0o700, exist_ok=True)
        path = os.path.join(self.corruptDirectory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            writeAll(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsyncDirectory(self.corruptDirectory)
        self.log.warn(
            "{why}: {count} byte(s) saved as {path}", why=why, count=len(blob), path=path
        )

    # -- migration from the per-message layout ----------------------------

    def _migrate(
        self,
        names: list,
        nextNumber: int,
        locations: Locations,
        finished: set,
        sizes: dict,
    ) -> int:
        """
        Load the files of the per-message layout as earlier versions did,
        append the live entries to a new segment, flush it, then remove the
        old files.  Returns the next free segment number.
        """
        present = set(names)
        migrated = []
        oldFiles = []
        for name in names:
            path = os.path.join(self.directory, name)
            if name.startswith(TEMP_PREFIX):
                self.log.info("removing unfinished spool file {name}", name=name)
                unlinkQuietly(path)
            elif name.endswith(STATE_SUFFIX):
                if name[: -len(STATE_SUFFIX)] + MESSAGE_SUFFIX not in present:
                    unlinkQuietly(path)
            elif name.endswith(MESSAGE_SUFFIX):
                loaded = self._loadLegacy(name, path, present)
                if loaded is None:
                    continue
                entry, raw, paths = loaded
                oldFiles.extend(paths)
                if (
                    not entry.done
                    and entry.queue_id not in locations
                    and entry.queue_id not in finished
                ):
                    migrated.append((entry, raw))
        if migrated:
            number = nextNumber
            nextNumber += 1
            path = self._segmentPath(number)
            pieces = []
            offset = 0
            for entry, raw in migrated:
                record = encodeRecord(MESSAGE, raw)
                locations.place(entry, (number, offset, len(record)))
                state = encodeRecord(STATE, statePayload(entry.queue_id, entry.recipients))
                pieces += [record, state]
                offset += len(record) + len(state)
            _writeBatch(_Writer(self.directory), _Batch(path, True, 0, pieces, retire=True))
            sizes[number] = offset
            self.log.info(
                "migrated {count} message(s) from the per-message spool layout to {name}",
                count=len(migrated),
                name=segmentName(number),
            )
        for path in oldFiles:
            unlinkQuietly(path)
        fsyncDirectory(self.directory)
        return nextNumber

    def _loadLegacy(self, name: str, path: str, present: set) -> Optional[tuple]:
        """
        One C{.msg} file of the per-message layout and its C{.state}
        journal: C{(entry, raw, paths)}, or L{None} if it was corrupt
        (moved aside).
        """
        stem = name[: -len(MESSAGE_SUFFIX)]
        try:
            with open(path, "rb") as f:
                raw = f.read()
            entry, _ = decodeEntry(raw)
            if fileName(entry.queue_id) != stem:
                raise SpoolCorrupt("file name does not match its queue id")
        except SpoolCorrupt as e:
            self._moveAside(name, str(e))
            return None
        paths = [path]
        if stem + STATE_SUFFIX in present:
            statePath = os.path.join(self.directory, stem + STATE_SUFFIX)
            paths.append(statePath)
            with open(statePath, "rb") as f:
                skipped = applyState(entry, f.read())
            if skipped:
                self.log.warn(
                    "{queue_id}: skipped {count} unreadable state line(s)",
                    queue_id=entry.queue_id,
                    count=skipped,
                )
        return entry, raw, paths

    def _moveAside(self, name: str, why: str) -> None:
        os.makedirs(self.corruptDirectory, mode=0o700, exist_ok=True)
        stem = name.rsplit(".", 1)[0]
        for suffix in (MESSAGE_SUFFIX, STATE_SUFFIX):
            source = os.path.join(self.directory, stem + suffix)
            if os.path.exists(source):
                os.replace(source, os.path.join(self.corruptDirectory, stem + suffix))
        self.log.error(
            "corrupt spool entry {name} moved to {where}: {why}",
            name=name,
            where=self.corruptDirectory,
            why=why,
        )

    # -- writing -----------------------------------------------------------

    def store(self, entry: SpoolEntry, data: bytes) -> Deferred:
        """
        Durably store a new message.  Fires with C{entry} once the message
        and its envelope are on disk (the segment fdatasynced); fails with
        L{SpoolError} otherwise, in which case it is not delivered (see the
        module docstring for what a crash may still find).

        Messages are written in batches (group commit): every message that
        arrives while a batch is being written goes into the next one.
        """
        d = Deferred()
        self._pendingStores.append(_Op(entry, encodeEntry(entry, data), d, data=data))
        self._startBatch()

        def failed(failure):
            self.log.failure("could not store {queue_id}", failure, queue_id=entry.queue_id)
            raise SpoolError(str(failure.value))

        def stored(_):
            self._cache.put(entry.queue_id, data)
            return entry

        d.addCallbacks(stored, failed)
        return d

    def record(self, entry: SpoolEntry, changes: list) -> Deferred:
        """
        Durably record new recipient states, then apply them to C{entry}.

        The changes go into the next batch: a C{STATE} record, or, when they
        leave every recipient final, a C{DONE} record (the message is then
        finished and its space reclaimable).  Fails with the C{OSError} if
        the batch could not be written; C{entry} is then left unchanged.
        """
        d = Deferred()
        self._record(entry, changes, d)
        self._startBatch()
        return d

    def recordMany(self, batch: list) -> Deferred:
        """
        L{record} for many messages in one go (the deferrals of parked
        recipients, once a second): C{[(entry, changes), ...]}, all in the
        next batch (one group commit), with one L{Deferred} instead of one
        a message.

        @return: a L{Deferred} firing, once every record is written or has
            failed, with one C{(True, None)} or C{(False, failure)} per
            message, in order (the results of a L{DeferredList} with
            C{consumeErrors}); each entry is updated, as by L{record}, when
            its record is written.
        """
        group = _Group(Deferred(), [None] * len(batch), len(batch))
        if not batch:
            group.deferred.callback([])
            return group.deferred
        for index, (entry, changes) in enumerate(batch):
            self._record(entry, changes, _Member(group, index))
        self._startBatch()
        return group.deferred

    def _record(self, entry: SpoolEntry, changes: list, waiter: Any) -> None:
        """
        Queue the record of C{changes} for the next batch; C{waiter} is
        told (C{callback(None)} or C{errback(failure)}) once it is written
        and applied to C{entry}, or has failed.
        """
        # Few objects a record: a parked recipient's deferral is recorded
        # many thousand times a second, and every object allocated here
        # and alive until the batch is written costs the garbage collector
        # more.
        changes = list(changes)
        finishing = True
        if len(changes) == 1:
            change = changes[0]
            address = change.address
            for r in entry.recipients:
                if (change if r.address == address else r).state not in FINAL_STATES:
                    finishing = False
                    break
        else:
            byAddress = {r.address: r for r in changes}
            for r in entry.recipients:
                if byAddress.get(r.address, r).state not in FINAL_STATES:
                    finishing = False
                    break
        if finishing:
            payload = entry.queue_id.encode("utf-8")
        else:
            payload = statePayload(entry.queue_id, changes)
        # Applied to the entry by _batchWritten, before the waiter is told.
        self._pendingRecords.append(
            _Op(entry, payload, waiter, changes=changes, finishing=finishing)
        )

    def _startBatch(self) -> None:
        """
        Start writing the next batch, unless one is being written or there
        is nothing to write.
        """
        if self._writing or not (self._pendingStores or self._pendingRecords):
            return
        now = self.clock.seconds()
        active = self._active
        newSegment = False
        if active is None or self._rollNext or active.size >= self.segmentBytes:
            if active is not None:
                active.sealedAt = now
            number = self._nextNumber
            self._nextNumber += 1
            active = self._active = self._segments[number] = _Segment(
                number, self._segmentPath(number)
            )
            newSegment = True
            self._rollNext = False

        records, self._pendingRecords = self._pendingRecords, []
        stores = self._pendingStores[: self.maxBatch]
        del self._pendingStores[: self.maxBatch]
        finishing = {op.entry.queue_id for op in records if op.finishing}
        copies = self._compaction(now, finishing)

        pieces: list = []
        placed: list = []  # (entry, offset, length) of each MESSAGE record
        offset = active.size
        for entry, (number, at, length) in copies:
            pieces.append((self._segments[number].path, at, length))
            placed.append((entry, offset, length))
            offset += length
            snapshot = encodeRecord(STATE, statePayload(entry.queue_id, entry.recipients))
            pieces.append(snapshot)
            offset += len(snapshot)
        for op in records:
            record = encodeRecord(DONE if op.finishing else STATE, op.payload)
            pieces.append(record)
            offset += len(record)
        for op in stores:
            # Encoded (checksummed) in the thread: messages may be large.
            length = RECORD_HEADER.size + len(op.payload)
            pieces.append((MESSAGE, op.payload))
            placed.append((op.entry, offset, length))
            offset += length

        # Which segments this batch leaves with nothing live: all of them if
        # nothing at all is left, else the finished ones at the head of the
        # log.
        gone = finishing | {entry.queue_id for entry, _ in copies}
        # How many of each segment's live messages that is.
        goneHere: dict = {}
        segmentOf = self._locations.segmentOf
        for queueID in gone:
            number = segmentOf(queueID)
            if number is not None:
                goneHere[number] = goneHere.get(number, 0) + 1
        leftOver = (
            len(self._locations)
            - sum(1 for queueID in finishing if queueID in self._locations)
            + len(stores)
        )
        retire = not leftOver and not self._pendingStores
        deletions = []
        for number in sorted(self._segments):
            segment = self._segments[number]
            if not retire and (
                segment is active or segment.liveCount > goneHere.get(number, 0)
            ):
                break
            deletions.append((number, segment.path))

        batch = _Batch(active.path, newSegment, active.size, pieces, deletions, retire)
        self._writing = True
        self.runInThread(_writeBatch, self._writer, batch).addBoth(
            self._batchWritten, batch, active, offset, stores, records, placed
        )

    def _compaction(self, now: float, finishing: set) -> list:
        """
        The live messages to copy forward with the next batch: those of the
        oldest sealed segments, while such a segment was sealed at least
        C{compactAfter} seconds ago and its live messages take at most
        C{compactRatio} of it.

        @return: C{(entry, (segment number, offset, length))} pairs.
        """
        copies: list = []
        budget = self.compactBytes
        locations = self._locations
        segmentOf = locations.segmentOf
        for number in sorted(self._segments):
            segment = self._segments[number]
            if (
                segment is self._active
                or segment.sealedAt is None
                or now - segment.sealedAt < self.compactAfter
                or segment.liveBytes > self.compactRatio * segment.size
            ):
                break
            for queueID in segment.live:
                if segmentOf(queueID) != number or queueID in finishing:
                    continue  # finished, or copied forward already
                entry = locations.entry(queueID)
                if entry.done:  # finished by concurrent records, DONE queued
                    continue
                location = locations[queueID]
                copies.append((entry, location))
                budget -= location[2]
                if budget <= 0:
                    return copies
        return copies

    def _batchWritten(
        self,
        result,
        batch: _Batch,
        active: _Segment,
        end: int,
        stores: list,
        records: list,
        placed: list,
    ) -> None:
        try:
            if isinstance(result, Failure):
                self._rollNext = True
                for op in [*stores, *records]:
                    if op.waiter is not None:
                        op.waiter.errback(result)
                    else:
                        self.log.failure(
                            "could not record {queue_id} as finished",
                            result,
                            queue_id=op.entry.queue_id,
                        )
                return
            active.size = end
            locations = self._locations
            for entry, offset, length in placed:
                queueID = entry.queue_id
                old = locations.get(queueID)
                locations.place(entry, (active.number, offset, length))
                if old is not None:
                    self._segments[old[0]].dropLive(locations, old[2])
                active.addLive(queueID, length)
            for op in stores:
                op.waiter.callback(None)
            for op in records:
                if op.changes is not None:
                    _apply(op.entry, op.changes)
                if op.waiter is not None:
                    op.waiter.callback(None)
                queueID = op.entry.queue_id
                if op.finishing:
                    self._finished(queueID)
                    continue
                if op.changes is not None and _waiting(op.entry):
                    # Every recipient left waits for a retry: its bytes
                    # are read back then (a queue of deferred messages
                    # would otherwise hold a full cache of them).
                    self._cache.pop(queueID)
                if (
                    op.entry.done
                    and queueID in self._locations
                    and queueID not in self._doneQueued
                ):
                    # Finished by concurrent records: say so, so that its
                    # space can be reclaimed.
                    self._doneQueued.add(queueID)
                    self._pendingRecords.append(
                        _Op(op.entry, queueID.encode("utf-8"), None, finishing=True)
                    )
            for number in result:
                self._segments.pop(number, None)
            if batch.retire:
                # Its file is closed (and normally removed).
                self._rollNext = True
                if self._active is active and active.number not in self._segments:
                    self._active = None
        finally:
            self._writing = False
            self._startBatch()

    def _finished(self, queueID: str) -> None:
        """
        Forget a message whose C{DONE} record is durable.
        """
        location = self._locations.pop(queueID, None)
        if location is not None and location[0] in self._segments:
            self._segments[location[0]].dropLive(self._locations, location[2])
        self._doneQueued.discard(queueID)
        self._cache.pop(queueID)

    # -- delivery side -------------------------------------------------------

    def readMessage(self, entry: SpoolEntry) -> Deferred:
        """
        The stored message bytes (verified against their checksums).  A
        message stored moments ago usually comes from memory.
        """
        cached = self._cache.get(entry.queue_id)
        if cached is not None:
            return succeed(cached)
        location = self._locations.get(entry.queue_id)
        if location is None:
            return fail(SpoolError(f"{entry.queue_id} is not in the spool"))
        number, offset, length = location

        def moved(failure):
            # Compaction may have copied it forward and removed the segment.
            failure.trap(FileNotFoundError)
            if self._locations.get(entry.queue_id, location) != location:
                return self.readMessage(entry)
            return failure

        return self.runDeliveryIO(
            _readMessageAt, self._segmentPath(number), offset, length
        ).addErrback(moved)


def _readMessageAt(path: str, offset: int, length: int) -> bytes:
    """
    Read and verify the C{MESSAGE} record at C{offset} of C{path}; blocking.

    @raise SpoolCorrupt: it does not check out.
    """
    raw = _readRange(path, offset, length)
    kind, payload, _, problem = parseRecord(raw)
    if problem is not None or kind != MESSAGE:
        raise SpoolCorrupt(f"bad record at offset {offset} of {path}: {problem or kind}")
    return decodeEntry(payload)[1]
