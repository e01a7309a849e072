"""
Tests for L{smartrelay.spool}: durable storage, state journal, recovery,
and failure handling, with a synchronous stand-in for the thread pool.
"""

import errno
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from smartrelay import spool as spoolModule
from smartrelay.spool import (
    Recipient,
    Spool,
    SpoolCorrupt,
    SpoolEntry,
    SpoolError,
    decodeEntry,
    encodeEntry,
)


def synchronous(f, *args, **kwargs):
    return maybeDeferred(f, *args, **kwargs)


def makeEntry(queueID="79/BC-00001-5C348706", recipients=("a@example.com", "b@example.org")):
    return SpoolEntry(
        queue_id=queueID,
        sender="app@example.net",
        recipients=[Recipient(address=r) for r in recipients],
        received=1700000000.5,
        size=0,
        client={"ip": "127.0.0.1", "helo": "c", "user": None, "tls": False},
    )


class CodecTests(SynchronousTestCase):
    @given(st.binary(max_size=3000), st.lists(st.emails(), min_size=1, max_size=5), st.text(max_size=30))
    def test_roundTrip(self, data, recipients, sender):
        """
        Any message and envelope survive encoding and decoding.
        """
        entry = makeEntry(recipients=recipients)
        entry.sender = sender
        decoded, body = decodeEntry(encodeEntry(entry, data))
        self.assertEqual(body, data)
        self.assertEqual([r.address for r in decoded.recipients], list(recipients))
        self.assertEqual(decoded.sender, sender)
        self.assertEqual(decoded.size, len(data))

    @given(st.binary(min_size=1, max_size=500), st.data())
    def test_truncationDetected(self, data, draw):
        """
        Any truncation of a spool file is detected.
        """
        raw = encodeEntry(makeEntry(), data)
        cut = draw.draw(st.integers(0, len(raw) - 1))
        self.assertRaises(SpoolCorrupt, decodeEntry, raw[:cut])

    def test_bitFlipDetected(self):
        """
        A changed byte in the message is detected by the checksum.
        """
        raw = bytearray(encodeEntry(makeEntry(), b"hello world\r\n"))
        raw[-3] ^= 0x01
        self.assertRaises(SpoolCorrupt, decodeEntry, bytes(raw))


class SpoolTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, synchronous)
        self.assertEqual(self.successResultOf(self.spool.recover()), [])

    def reopen(self):
        return self.successResultOf(Spool(self.directory, synchronous).recover())

    def test_storeAndRead(self):
        """
        A stored message is on disk under its queue id and reads back.
        """
        entry = makeEntry()
        self.assertIs(self.successResultOf(self.spool.store(entry, b"Subject: x\r\n\r\nhi\r\n")), entry)
        self.assertEqual(os.listdir(self.directory), ["79BC-00001-5C348706.msg"])
        self.assertEqual(self.successResultOf(self.spool.readMessage(entry)), b"Subject: x\r\n\r\nhi\r\n")

    def test_recoveredAfterRestart(self):
        """
        A stored message is recovered by the next start with its envelope.
        """
        self.successResultOf(self.spool.store(makeEntry(), b"x\r\n"))
        [entry] = self.reopen()
        self.assertEqual(entry.queue_id, "79/BC-00001-5C348706")
        self.assertEqual([r.state for r in entry.recipients], ["queued", "queued"])

    def test_stateJournal(self):
        """
        Recorded recipient states survive a restart; once every recipient
        is final the entry is removed.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.successResultOf(
            self.spool.record(entry, [Recipient("a@example.com", "delivered", 1, 0.0)])
        )
        self.successResultOf(
            self.spool.record(entry, [Recipient("b@example.org", "deferred", 1, 1700000600.0)])
        )
        [recovered] = self.reopen()
        self.assertEqual(
            recovered.recipients,
            [
                Recipient("a@example.com", "delivered", 1, 0.0),
                Recipient("b@example.org", "deferred", 1, 1700000600.0),
            ],
        )
        self.successResultOf(
            self.spool.record(entry, [Recipient("b@example.org", "bounced", 2, 0.0)])
        )
        self.assertEqual(os.listdir(self.directory), [])
        self.assertEqual(self.reopen(), [])

    def test_tornStateLine(self):
        """
        A torn last journal line (crash mid-append) is skipped; the earlier
        states stand.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.successResultOf(self.spool.record(entry, [Recipient("a@example.com", "deferred", 1, 5.0)]))
        with open(os.path.join(self.directory, "79BC-00001-5C348706.state"), "ab") as f:
            f.write(b'{"a":"b@example.org","s":"deliv')
        [recovered] = self.reopen()
        self.assertEqual(recovered.recipients[0].state, "deferred")
        self.assertEqual(recovered.recipients[1].state, "queued")

    def test_finishedButNotRemoved(self):
        """
        An entry whose recipients are all final but whose files were not yet
        removed (crash) is cleaned up, not delivered again.
        """
        entry = makeEntry(recipients=["a@example.com"])
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        with open(os.path.join(self.directory, "79BC-00001-5C348706.state"), "wb") as f:
            f.write(spoolModule.encodeState(Recipient("a@example.com", "delivered", 1, 0.0)))
        self.assertEqual(self.reopen(), [])
        self.assertEqual(os.listdir(self.directory), [])

    def test_tempFilesRemoved(self):
        """
        Unfinished temp files (a crash before the rename) are removed on
        start and never delivered.
        """
        with open(os.path.join(self.directory, "tmp-3-79BC-00009-5C348706.msg"), "wb") as f:
            f.write(b"half a mess")
        self.assertEqual(self.reopen(), [])
        self.assertEqual(os.listdir(self.directory), [])

    def test_orphanStateRemoved(self):
        """
        A state journal without its message is removed.
        """
        with open(os.path.join(self.directory, "79BC-00009-5C348706.state"), "wb") as f:
            f.write(b"")
        self.assertEqual(self.reopen(), [])
        self.assertEqual(os.listdir(self.directory), [])

    def test_corruptMovedAside(self):
        """
        A corrupt entry is moved to corrupt/ with a log line, never deleted.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"some message\r\n"))
        path = os.path.join(self.directory, "79BC-00001-5C348706.msg")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 3)
        self.assertEqual(self.reopen(), [])
        self.assertEqual(
            os.listdir(os.path.join(self.directory, "corrupt")), ["79BC-00001-5C348706.msg"]
        )

    def test_fileNameMismatch(self):
        """
        A file whose name does not match the queue id inside is corrupt.
        """
        self.successResultOf(self.spool.store(makeEntry(), b"x\r\n"))
        os.rename(
            os.path.join(self.directory, "79BC-00001-5C348706.msg"),
            os.path.join(self.directory, "79BC-00002-5C348706.msg"),
        )
        self.assertEqual(self.reopen(), [])
        self.assertIn("79BC-00002-5C348706.msg", os.listdir(os.path.join(self.directory, "corrupt")))

    def test_oldestFirst(self):
        """
        Recovered entries come back oldest first.
        """
        for n, received in [(1, 30.0), (2, 10.0), (3, 20.0)]:
            entry = makeEntry(queueID="79/BC-0000%d-5C348706" % n)
            entry.received = received
            self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.assertEqual([e.received for e in self.reopen()], [10.0, 20.0, 30.0])


class DeliverySideTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.pending = []

        def deliveryIO(f, *args):
            from twisted.internet.defer import Deferred

            d = Deferred()
            self.pending.append((d, f, args))
            return d

        self.spool = Spool(self.directory, synchronous, runDeliveryIO=deliveryIO)
        self.successResultOf(self.spool.recover())

    def runPending(self):
        while self.pending:
            d, f, args = self.pending.pop(0)
            d.callback(f(*args))

    def test_readFromCacheAfterStore(self):
        """
        A message just stored is read back from memory, without disk I/O.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"body\r\n"))
        self.assertEqual(self.successResultOf(self.spool.readMessage(entry)), b"body\r\n")
        self.assertEqual(self.pending, [])

    def test_readFromDiskWhenNotCached(self):
        """
        A recovered message is read from disk through the delivery I/O path.
        """
        self.successResultOf(self.spool.store(makeEntry(), b"body\r\n"))
        [entry] = self.successResultOf(Spool(self.directory, synchronous).recover())
        fresh = Spool(self.directory, synchronous, runDeliveryIO=synchronous)
        self.assertEqual(self.successResultOf(fresh.readMessage(entry)), b"body\r\n")

    def test_concurrentRecordsFinishEntry(self):
        """
        Two concurrent records for different recipients that together finish
        the entry merge correctly and remove its files.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        first = self.spool.record(entry, [Recipient("a@example.com", "delivered", 1, 0.0)])
        second = self.spool.record(entry, [Recipient("b@example.org", "bounced", 1, 0.0)])
        self.runPending()
        self.successResultOf(first)
        self.successResultOf(second)
        self.runPending()
        self.assertEqual([r.state for r in entry.recipients], ["delivered", "bounced"])
        self.assertEqual(os.listdir(self.directory), [])
        self.assertIsNone(self.spool._cache.get(entry.queue_id))

    def test_cacheBounded(self):
        """
        The message cache drops the oldest messages past its byte limit.
        """
        cache = spoolModule.MessageCache(100)
        for n in range(10):
            cache.put(str(n), b"x" * 20)
        self.assertEqual(cache.size, 100)
        self.assertIsNone(cache.get("0"))
        self.assertEqual(cache.get("9"), b"x" * 20)
        cache.put("big", b"y" * 60)
        self.assertIsNone(cache.get("big"))


class FailureTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.spool = Spool(self.directory, synchronous)
        self.successResultOf(self.spool.recover())

    def fail(self, number=errno.EIO):
        def raiser(*args, **kwargs):
            raise OSError(number, os.strerror(number))

        return raiser

    def assertRefused(self):
        failure = self.failureResultOf(self.spool.store(makeEntry(), b"x\r\n"))
        failure.trap(SpoolError)
        self.assertEqual(os.listdir(self.directory), [])
        self.flushLoggedErrors(OSError)

    def test_writeFailure(self):
        """
        A failed write (disk full) is a SpoolError and leaves nothing behind.
        """
        self.patch(os, "write", self.fail(errno.ENOSPC))
        self.assertRefused()

    def test_flushFailure(self):
        """
        A failed fdatasync is a SpoolError and leaves nothing behind.
        """
        self.patch(spoolModule, "_syncfs", None)
        self.patch(os, "fdatasync", self.fail())
        self.assertRefused()

    def test_syncfsFailureFallsBack(self):
        """
        If syncfs fails the files are fdatasynced one by one instead.
        """
        calls = []
        self.patch(spoolModule, "_syncfs", lambda fd: -1)
        realFdatasync = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (calls.append(fd), realFdatasync(fd)))
        self.successResultOf(self.spool.store(makeEntry(), b"x\r\n"))
        self.assertEqual(len(calls), 1)

    def test_directorySyncFailure(self):
        """
        If the directory fsync fails the renamed file is removed again, so a
        message that got no 250 is never delivered.
        """
        self.patch(spoolModule, "_syncfs", None)
        self.patch(spoolModule, "fsyncDirectory", self.fail())
        self.assertRefused()

    def test_realDiskError(self):
        """
        An OSError from the real write path (here: the directory is gone)
        becomes a SpoolError.
        """
        os.rmdir(self.directory)
        failure = self.failureResultOf(self.spool.store(makeEntry(), b"x\r\n"))
        failure.trap(SpoolError)
        self.flushLoggedErrors(OSError)

    def test_partialBatch(self):
        """
        In a batch, one item's failure does not fail the others.
        """
        os.makedirs(os.path.join(self.directory, "sub"))
        good = (
            os.path.join(self.directory, "tmp-1"),
            os.path.join(self.directory, "good.msg"),
            b"good",
        )
        bad = (
            os.path.join(self.directory, "missing", "tmp-2"),
            os.path.join(self.directory, "bad.msg"),
            b"bad",
        )
        results, removalError = spoolModule._writeBatch(self.directory, [bad, good])
        self.assertIsNone(removalError)
        self.assertIsInstance(results[0], OSError)
        self.assertIsNone(results[1])
        self.assertEqual(sorted(os.listdir(self.directory)), ["good.msg", "sub"])


class GroupCommitTests(SynchronousTestCase):
    def test_batches(self):
        """
        Messages that arrive while batches are being written go into the
        next batch together (at most two batches in flight).
        """
        from twisted.internet.defer import Deferred

        directory = self.mktemp()
        os.makedirs(directory)
        batches = []

        def runner(f, *args):
            if f is spoolModule._writeBatch:
                d = Deferred()
                batches.append((d, args))
                return d
            return maybeDeferred(f, *args)

        spool = Spool(directory, runner)
        results = [
            spool.store(makeEntry(queueID="79/BC-0000%d-5C348706" % n), b"x\r\n")
            for n in range(5)
        ]
        self.assertEqual([len(args[1]) for _, args in batches], [1, 1])
        d, args = batches[0]
        d.callback(spoolModule._writeBatch(*args))
        self.successResultOf(results[0])
        self.assertNoResult(results[2])
        self.assertEqual([len(args[1]) for _, args in batches], [1, 1, 3])
        for d, args in batches[1:]:
            d.callback(spoolModule._writeBatch(*args))
        for d in results:
            self.successResultOf(d)
        self.assertEqual(len(os.listdir(directory)), 5)


class SharedFlushTests(SynchronousTestCase):
    """
    Finished messages are removed in the same batches (and flushes) as new
    ones are written.
    """

    def setUp(self):
        from twisted.internet.defer import Deferred

        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.batches = []

        def runner(f, *args):
            if f is spoolModule._writeBatch:
                d = Deferred()
                self.batches.append((d, args))
                return d
            return maybeDeferred(f, *args)

        self.spool = Spool(self.directory, runner)

    def runBatch(self, index):
        d, args = self.batches[index]
        d.callback(spoolModule._writeBatch(*args))

    def test_removalJoinsNextBatch(self):
        """A removal asked for while batches are in flight goes into the next batch with new messages."""
        first = makeEntry(queueID="79/BC-00001-5C348706")
        self.spool.store(first, b"x\r\n")
        self.runBatch(0)
        self.spool.store(makeEntry(queueID="79/BC-00002-5C348706"), b"y\r\n")
        self.spool.store(makeEntry(queueID="79/BC-00003-5C348706"), b"y\r\n")
        done = self.spool.record(first, [Recipient(r.address, state="delivered") for r in first.recipients])
        third = self.spool.store(makeEntry(queueID="79/BC-00004-5C348706"), b"z\r\n")
        self.assertNoResult(done)
        self.assertEqual(len(self.batches), 3)
        self.runBatch(1)
        self.assertEqual(len(self.batches), 4)
        _, (_, items, removals) = self.batches[3]
        self.assertEqual(len(items), 1)
        self.assertEqual([os.path.basename(p) for p in removals],
                         [os.path.basename(self.spool._path(first.queue_id, ".msg"))])
        self.runBatch(2)
        self.runBatch(3)
        self.successResultOf(done)
        self.successResultOf(third)
        self.assertFalse(os.path.exists(self.spool._path(first.queue_id, ".msg")))
        self.assertTrue(first.done)

    def test_removalOnly(self):
        """A batch of removals alone is flushed too (syncfs, or a directory fsync without it)."""
        for syncfs in (spoolModule._syncfs, None):
            self.patch(spoolModule, "_syncfs", syncfs)
            entry = makeEntry(queueID="79/BC-0000%d-5C348706" % len(self.batches))
            self.spool.store(entry, b"x\r\n")
            self.runBatch(len(self.batches) - 1)
            done = self.spool.record(entry, [Recipient(r.address, state="bounced") for r in entry.recipients])
            self.runBatch(len(self.batches) - 1)
            self.successResultOf(done)
            self.assertEqual(os.listdir(self.directory), [])

    def test_removalFlushFailure(self):
        """If the flush after a removal fails, recording fails (and is retried by the caller)."""
        entry = makeEntry()
        self.spool.store(entry, b"x\r\n")
        self.runBatch(0)
        self.patch(spoolModule, "_syncfs", None)
        self.patch(spoolModule, "fsyncDirectory", lambda path: (_ for _ in ()).throw(OSError(5, "EIO")))
        done = self.spool.record(entry, [Recipient(r.address, state="delivered") for r in entry.recipients])
        self.runBatch(1)
        self.failureResultOf(done, OSError)
        self.assertFalse(entry.done)
