"""
The durable on-disk queue (DESIGN section 1.3: no 250 before the message is
on disk; a 250 means the relay never loses it).

Data types shared with the delivery side:

* L{Recipient}: one envelope recipient and its delivery state.
* L{SpoolEntry}: one accepted message (envelope + per-recipient state);
  the message bytes stay on disk and are read with L{Spool.readMessage}.
"""

import itertools
import json
import os
import zlib
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.diskio import appendDurably, fsyncDirectory, unlinkQuietly, writeAll
from smartrelay.ids import fileName

FINAL_STATES = frozenset(["delivered", "bounced", "expired"])


@attrs.define
class Recipient:
    """
    One envelope recipient of a spooled message.

    @ivar state: C{queued} (never tried), C{deferred} (tried, will retry),
        or a final state: C{delivered}, C{bounced}, C{expired}.
    @ivar attempts: delivery attempts made so far.
    @ivar next_attempt: POSIX seconds of the next attempt (0: as soon as
        possible).
    """

    address: str
    state: str = "queued"
    attempts: int = 0
    next_attempt: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@attrs.define(eq=False)
class SpoolEntry:
    """
    One accepted message.

    @ivar sender: envelope sender, C{""} for the null reverse path.
    @ivar received: POSIX seconds when the 250 was sent.
    @ivar size: size in bytes of the stored message (CRLF line ends).
    @ivar client: facts about the submitting client: C{ip}, C{helo},
        C{user} (SMTP AUTH name or None).
    """

    queue_id: str
    sender: str
    recipients: list
    received: float
    size: int
    client: dict = attrs.field(factory=dict)
    #: A C{.state} journal may exist for this entry (so removing it must
    #: remove that too).
    journaled: bool = attrs.field(default=False, repr=False)

    def pending(self) -> list:
        return [r for r in self.recipients if not r.final]

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)


class SpoolError(Exception):
    """
    The spool could not durably store or update something (disk full, I/O
    error).  Temporary from the client's point of view: C{451 4.3.0}.
    """


class SpoolCorrupt(SpoolError):
    """
    A spool file failed its integrity check.
    """


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
    header = json.dumps(
        {
            "queue_id": entry.queue_id,
            "sender": entry.sender,
            "recipients": [r.address for r in entry.recipients],
            "received": entry.received,
            "client": entry.client,
            "size": len(data),
            "crc32": zlib.crc32(data),
        },
        separators=(",", ":"),
    ).encode("utf-8")
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


def encodeState(recipient: Recipient) -> bytes:
    return (
        json.dumps(
            {
                "a": recipient.address,
                "s": recipient.state,
                "n": recipient.attempts,
                "t": recipient.next_attempt,
            },
            separators=(",", ":"),
        ).encode("utf-8")
        + b"\n"
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


def _loadSyncfs():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _loadSyncfs()


def _writeBatch(directory: str, items: list, removals: Sequence = ()) -> tuple:
    """
    Durably write a batch of new messages and remove finished ones;
    blocking, runs in a thread.

    C{items} are C{(tmpPath, finalPath, blob)}; C{removals} are paths to
    unlink.  Every blob is written to its temp file and renamed into
    place, the removals are unlinked, and one C{syncfs} of the spool's
    file system makes all of it durable at once (one journal commit for
    the whole batch, new and finished messages together).  Where
    C{syncfs} is missing or fails, each file is fdatasynced and one
    directory fsync covers the renames and removals instead.

    A crash before the flush completes can leave a renamed file whose
    data never reached the disk; no C{250} was sent for it, and recovery
    finds its checksum wrong and moves it aside.

    @return: C{(results, removalError)}: one entry per item (L{None} if it
        is durable, else the exception; an item that failed leaves no file
        behind, neither temp nor final), and the first error removing or
        flushing the removals, or L{None}.
    """
    results: list = [None] * len(items)
    written = []
    for index, (tmpPath, finalPath, blob) in enumerate(items):
        try:
            fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            results[index] = e
            continue
        try:
            writeAll(fd, blob)
            os.rename(tmpPath, finalPath)
        except OSError as e:
            results[index] = e
            os.close(fd)
            unlinkQuietly(tmpPath)
            continue
        written.append((index, fd))
    removalError: Optional[OSError] = None
    for path in removals:
        try:
            unlinkQuietly(path)
        except OSError as e:
            removalError = removalError or e
    try:
        flushed = False
        if _syncfs is not None and (written or removals):
            fd = written[0][1] if written else None
            if fd is None:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    flushed = _syncfs(fd) == 0
                finally:
                    os.close(fd)
            else:
                flushed = _syncfs(fd) == 0
        if not flushed:
            for index, fd in written:
                try:
                    os.fdatasync(fd)
                except OSError as e:
                    results[index] = e
            try:
                fsyncDirectory(directory)
            except OSError as e:
                removalError = removalError or e
                for index, _ in written:
                    results[index] = results[index] or e
    finally:
        for index, fd in written:
            os.close(fd)
            if results[index] is not None:
                unlinkQuietly(items[index][1])
    return results, removalError


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
    The durable on-disk queue: one directory, one C{.msg} file per accepted
    message (envelope + bytes, written once) and a C{.state} journal of
    per-recipient state changes beside it.

    Every blocking call runs through C{runInThread(f, *args) -> Deferred}
    (a thread pool in production, a synchronous stand-in in unit tests);
    the delivery side's reads, journal appends and removals may go through a
    separate C{runDeliveryIO} so that they never queue in front of the
    latency-critical writes of new messages.

    Messages just stored are kept in a bounded in-memory cache
    (C{cacheBytes}) until they are finished, so the first delivery attempt
    does not read them back from disk.
    New messages are written and renamed into place, finished ones
    removed, in batches (group commit): every message stored, and every
    finished one removed, while the previous batch was being written goes
    into the next batch, and one flush (C{syncfs}) makes the whole batch
    durable.

    @ivar directory: the spool directory (created if missing).
    """

    directory: str
    runInThread: Callable[..., Deferred]
    runDeliveryIO: Optional[Callable[..., Deferred]] = None
    cacheBytes: int = 64 * 1024 * 1024
    batchesInFlight: int = 2
    maxBatch: int = 256
    _cache: "MessageCache" = attrs.field(init=False)
    _pendingWrites: list = attrs.field(factory=list, init=False)
    _batchesInFlight: int = attrs.field(default=0, init=False)
    _pendingRemovals: list = attrs.field(factory=list, init=False)
    _tempCounter: "itertools.count" = attrs.field(factory=itertools.count, init=False)

    log = Logger()

    def __attrs_post_init__(self):
        if self.runDeliveryIO is None:
            self.runDeliveryIO = self.runInThread
        self._cache = MessageCache(self.cacheBytes)

    @property
    def corruptDirectory(self) -> str:
        return os.path.join(self.directory, "corrupt")

    def _path(self, queueID: str, suffix: str) -> str:
        return os.path.join(self.directory, fileName(queueID) + suffix)

    # -- recovery ---------------------------------------------------------

    def recover(self) -> Deferred:
        """
        Scan the directory on start: remove temp files, re-queue complete
        entries, move corrupt ones aside.  Fires with the list of
        L{SpoolEntry} that still have work to do, oldest first.
        """
        return self.runInThread(self._recover)

    def _recover(self) -> list:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        entries = []
        names = os.listdir(self.directory)
        present = set(names)
        for name in names:
            path = os.path.join(self.directory, name)
            if name.startswith(TEMP_PREFIX):
                self.log.info("removing unfinished spool file {name}", name=name)
                unlinkQuietly(path)
            elif name.endswith(STATE_SUFFIX):
                if name[: -len(STATE_SUFFIX)] + MESSAGE_SUFFIX not in present:
                    unlinkQuietly(path)
            elif name.endswith(MESSAGE_SUFFIX):
                entry = self._recoverOne(name, path, present)
                if entry is not None:
                    entries.append(entry)
        entries.sort(key=lambda e: e.received)
        return entries

    def _recoverOne(self, name: str, path: str, present: set):
        stem = name[: -len(MESSAGE_SUFFIX)]
        try:
            with open(path, "rb") as f:
                entry, _ = decodeEntry(f.read())
            if fileName(entry.queue_id) != stem:
                raise SpoolCorrupt("file name does not match its queue id")
        except SpoolCorrupt as e:
            self._moveAside(name, str(e))
            return None
        statePath = self._path(entry.queue_id, STATE_SUFFIX)
        if stem + STATE_SUFFIX in present:
            entry.journaled = True
            with open(statePath, "rb") as f:
                skipped = applyState(entry, f.read())
            if skipped:
                self.log.warn(
                    "{queue_id}: skipped {count} unreadable state line(s)",
                    queue_id=entry.queue_id,
                    count=skipped,
                )
        if entry.done:
            unlinkQuietly(path)
            unlinkQuietly(statePath)
            return None
        return entry

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

    # -- new messages ------------------------------------------------------

    def store(self, entry: SpoolEntry, data: bytes) -> Deferred:
        """
        Durably store a new message.  Fires with C{entry} once the message
        and its envelope are on disk (file and directory fsynced); fails
        with L{SpoolError} otherwise, in which case nothing of it is left
        to be delivered.

        Messages are written in batches (group commit): every message that
        arrives while a batch is being written goes into the next one, which
        is written, renamed into place and flushed together.
        """
        blob = encodeEntry(entry, data)
        finalPath = self._path(entry.queue_id, MESSAGE_SUFFIX)
        tmpPath = os.path.join(
            self.directory,
            "%s%d-%s%s"
            % (TEMP_PREFIX, next(self._tempCounter), fileName(entry.queue_id), MESSAGE_SUFFIX),
        )
        d = Deferred()
        self._pendingWrites.append((tmpPath, finalPath, blob, d))
        self._startBatches()

        def failed(failure):
            failure.trap(OSError)
            self.log.failure(
                "could not store {queue_id}", failure, queue_id=entry.queue_id
            )
            raise SpoolError(str(failure.value))

        def stored(_):
            self._cache.put(entry.queue_id, data)
            return entry

        d.addCallbacks(stored, failed)
        return d

    def _startBatches(self) -> None:
        while (
            self._pendingWrites or self._pendingRemovals
        ) and self._batchesInFlight < self.batchesInFlight:
            batch = self._pendingWrites[: self.maxBatch]
            del self._pendingWrites[: self.maxBatch]
            removals, self._pendingRemovals = self._pendingRemovals, []
            self._batchesInFlight += 1
            work = [(tmp, final, blob) for tmp, final, blob, _ in batch]
            paths = [path for paths, _ in removals for path in paths]
            self.runInThread(_writeBatch, self.directory, work, paths).addBoth(
                self._batchWritten, [d for _, _, _, d in batch], [d for _, d in removals]
            )

    def _batchWritten(self, result, waiters: list, removalWaiters: list = ()) -> None:
        self._batchesInFlight -= 1
        self._startBatches()
        if isinstance(result, Failure):
            for waiter in [*waiters, *removalWaiters]:
                waiter.errback(result)
            return
        results, removalError = result
        for waiter, error in zip(waiters, results):
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(Failure(error))
        for waiter in removalWaiters:
            if removalError is None:
                waiter.callback(None)
            else:
                waiter.errback(Failure(removalError))

    def _removeDurably(self, entry: SpoolEntry) -> Deferred:
        """
        Remove a finished entry's files with the next batch (sharing its
        flush).
        """
        d = Deferred()
        paths = [self._path(entry.queue_id, MESSAGE_SUFFIX)]
        if entry.journaled:
            paths.append(self._path(entry.queue_id, STATE_SUFFIX))
        self._pendingRemovals.append((paths, d))
        self._startBatches()
        return d

    # -- delivery side -------------------------------------------------------

    def readMessage(self, entry: SpoolEntry) -> Deferred:
        """
        The stored message bytes (verified against their checksum).  A
        message stored moments ago usually comes from memory.
        """
        cached = self._cache.get(entry.queue_id)
        if cached is not None:
            return succeed(cached)

        def read():
            with open(self._path(entry.queue_id, MESSAGE_SUFFIX), "rb") as f:
                return decodeEntry(f.read())[1]

        return self.runDeliveryIO(read)

    def record(self, entry: SpoolEntry, changes: list) -> Deferred:
        """
        Durably record new recipient states, then apply them to C{entry}.

        When the changes leave every recipient final, the entry's files are
        removed instead (and the removal is made durable with the shared
        directory fsync): a finished message needs no journal.  Otherwise
        the changes are appended to the journal and fdatasynced.
        """
        byAddress = {r.address: r for r in changes}
        finishing = all(byAddress.get(r.address, r).final for r in entry.recipients)

        def applied(_):
            # Merge into the entry as it is now: another record() for other
            # recipients of the same entry may have completed meanwhile.
            entry.recipients = [byAddress.get(r.address, r) for r in entry.recipients]
            if entry.done:
                self._cache.pop(entry.queue_id)
                if not finishing:
                    return self.runDeliveryIO(self._remove, entry).addErrback(
                        lambda f: self.log.failure(
                            "could not remove finished {queue_id}", f, queue_id=entry.queue_id
                        )
                    )

        if finishing:
            d = self._removeDurably(entry)
        else:
            entry.journaled = True
            blob = b"".join(encodeState(r) for r in changes)
            d = self.runDeliveryIO(
                appendDurably, self._path(entry.queue_id, STATE_SUFFIX), blob
            )
        return d.addCallback(applied)

    def _remove(self, entry: SpoolEntry) -> None:
        unlinkQuietly(self._path(entry.queue_id, MESSAGE_SUFFIX))
        unlinkQuietly(self._path(entry.queue_id, STATE_SUFFIX))
