"""
Tests for L{smartrelay.spool}: the log of segments, group commit, recovery
(torn tails, damaged records, duplicates), compaction, migration from the
per-message layout, and failure handling, with a synchronous stand-in for
the thread pool.
"""

import errno
import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay import spool as spoolModule
from smartrelay.message import Recipient, SpoolEntry
from smartrelay.spool import (
    DONE,
    MESSAGE,
    STATE,
    Spool,
    SpoolCorrupt,
    SpoolError,
    decodeEntry,
    encodeEntry,
    encodeRecord,
    encodeState,
    segmentName,
    statePayload,
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


def queueID(n):
    return "79/BC-%05d-5C348706" % (n,)


def segments(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("segment-"))


def segmentPath(directory, number=1):
    return os.path.join(directory, segmentName(number))


def makeSpool(directory, runInThread=synchronous, clock=None, **kwargs):
    """
    A L{Spool} on a L{Clock} (a fresh one unless C{clock} is given).
    """
    return Spool(directory, runInThread, clock=Clock() if clock is None else clock, **kwargs)


class CodecTests(SynchronousTestCase):
    @given(
        st.text(max_size=40),
        st.sampled_from(["queued", "deferred", "delivered", "bounced", "expired", "suppressed"]),
        st.integers(min_value=0, max_value=10**6),
        st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 2**40)),
    )
    def test_stateLineIsCompactJSON(self, address, state, attempts, nextAttempt):
        """A state line is the bytes of compact json.dumps of its four fields (any address text)."""
        recipient = Recipient(address, state, attempts, nextAttempt)
        expected = json.dumps(
            {"a": address, "s": state, "n": attempts, "t": nextAttempt}, separators=(",", ":")
        ).encode("utf-8") + b"\n"
        self.assertEqual(encodeState(recipient), expected)

    @given(
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7F), max_size=40),
        st.text(max_size=12),
        st.integers(min_value=0, max_value=10**6),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    def test_plainAddressAnyState(self, address, state, attempts, nextAttempt):
        """
        Printable ASCII addresses (the string encoder is called directly)
        and any state text still give the bytes of compact json.dumps.
        """
        recipient = Recipient(address, state, attempts, nextAttempt)
        expected = json.dumps(
            {"a": address, "s": state, "n": attempts, "t": nextAttempt}, separators=(",", ":")
        ).encode("utf-8") + b"\n"
        self.assertEqual(encodeState(recipient), expected)

    @given(st.lists(st.tuples(st.text(max_size=20), st.sampled_from(["queued", "deferred"]),
                              st.integers(0, 9), st.floats(0, 1e10)), max_size=6))
    def test_statePayloadIsTheLines(self, specs):
        """
        A C{STATE} payload is the queue id, a newline and each recipient's
        state line.
        """
        recipients = [Recipient(*spec) for spec in specs]
        self.assertEqual(
            statePayload("79/BC-00001-5C348706", recipients),
            b"79/BC-00001-5C348706\n" + b"".join(encodeState(r) for r in recipients),
        )

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
        Any truncation of an encoded message is detected.
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

    @given(st.sampled_from([MESSAGE, STATE, DONE]), st.binary(max_size=200), st.data())
    def test_recordChecks(self, kind, payload, draw):
        """
        A record parses back; cut short it is torn; a changed payload byte
        fails its checksum.
        """
        raw = encodeRecord(kind, payload)
        self.assertEqual(spoolModule.parseRecord(raw), (kind, payload, len(raw), None))
        cut = draw.draw(st.integers(0, len(raw) - 1))
        self.assertEqual(spoolModule.parseRecord(raw[:cut])[3], "torn")
        if payload:
            flipped = bytearray(raw)
            flipped[-1] ^= 0x80
            self.assertEqual(spoolModule.parseRecord(bytes(flipped))[3], "crc")

    def test_segmentNames(self):
        """
        Segment names carry their number in 16 hex digits.
        """
        self.assertEqual(segmentName(26), "segment-000000000000001a.log")
        self.assertEqual(spoolModule.segmentNumber("segment-000000000000001a.log"), 26)
        self.assertIsNone(spoolModule.segmentNumber("79BC-00001-5C348706.msg"))


def _entry(queueID):
    return SpoolEntry(queue_id=queueID, sender="", recipients=[Recipient("a@example.com")],
                      received=0.0, size=0)


class LocationsTests(SynchronousTestCase):
    """
    L{spoolModule.Locations} gives back every entry and location as it was
    put, packed or not.
    """

    @given(
        st.dictionaries(
            st.text(min_size=1, max_size=20),
            st.tuples(
                st.integers(min_value=0, max_value=2**64),
                st.integers(min_value=0, max_value=2**45),
                st.integers(min_value=0, max_value=2**45),
            ),
        )
    )
    def test_roundTrip(self, table):
        """Whatever the numbers (past 40 bits too), get, items, pop and len agree with a dict."""
        locations = spoolModule.Locations()
        entries = {queueID: _entry(queueID) for queueID in table}
        for queueID, location in table.items():
            locations.place(entries[queueID], location)
        self.assertEqual(len(locations), len(table))
        self.assertEqual(dict(locations.items()), table)
        self.assertEqual(list(locations.entries()), list(entries.values()))
        for queueID, location in table.items():
            self.assertIn(queueID, locations)
            self.assertIs(locations.entry(queueID), entries[queueID])
            self.assertEqual(locations[queueID], location)
            self.assertEqual(locations.get(queueID), location)
            self.assertEqual(locations.segmentOf(queueID), location[0])
        self.assertIsNone(locations.get("missing"))
        self.assertIsNone(locations.entry("missing"))
        self.assertIsNone(locations.segmentOf("missing"))
        self.assertEqual(locations.get("missing", "x"), "x")
        for queueID, location in table.items():
            self.assertEqual(locations.pop(queueID), location)
        self.assertEqual(len(locations), 0)
        self.assertIsNone(locations.pop("missing"))

    def test_overwrite(self):
        """A message copied forward by compaction gets its new location."""
        locations = spoolModule.Locations()
        entry = _entry("Q")
        locations.place(entry, (1, 10, 20))
        locations.place(entry, (2, 0, 20))
        self.assertEqual(locations["Q"], (2, 0, 20))
        self.assertEqual(len(locations), 1)
        del locations["Q"]
        self.assertNotIn("Q", locations)


class SpoolTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.spool = makeSpool(self.directory, synchronous)
        self.assertEqual(self.successResultOf(self.spool.recover()), [])

    def reopen(self, **kwargs):
        self.spool = makeSpool(self.directory, synchronous, **kwargs)
        return self.successResultOf(self.spool.recover())

    def append(self, number, *records):
        with open(segmentPath(self.directory, number), "ab") as f:
            for record in records:
                f.write(record)

    def test_storeAndRead(self):
        """
        A stored message is appended to the first segment and reads back.
        """
        entry = makeEntry()
        self.assertIs(self.successResultOf(self.spool.store(entry, b"Subject: x\r\n\r\nhi\r\n")), entry)
        self.assertEqual(os.listdir(self.directory), [segmentName(1)])
        self.assertEqual(self.successResultOf(self.spool.readMessage(entry)), b"Subject: x\r\n\r\nhi\r\n")

    def test_deferredLeavesTheCache(self):
        """
        A message stays in the memory cache while a recipient is still
        queued, and leaves it once every recipient left waits for a retry;
        it is then read back from disk.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"Subject: x\r\n\r\nhi\r\n"))
        self.assertIsNotNone(self.spool._cache.get(entry.queue_id))
        self.successResultOf(
            self.spool.record(entry, [Recipient("a@example.com", "deferred", 1, 1e9)])
        )
        self.assertIsNotNone(self.spool._cache.get(entry.queue_id))
        self.successResultOf(
            self.spool.record(entry, [Recipient("b@example.org", "deferred", 1, 1e9)])
        )
        self.assertIsNone(self.spool._cache.get(entry.queue_id))
        self.assertEqual(
            self.successResultOf(self.spool.readMessage(entry)), b"Subject: x\r\n\r\nhi\r\n"
        )

    def test_recoveredAfterRestart(self):
        """
        A stored message is recovered by the next start with its envelope,
        and can be read from disk.
        """
        self.successResultOf(self.spool.store(makeEntry(), b"x\r\n"))
        [entry] = self.reopen()
        self.assertEqual(entry.queue_id, "79/BC-00001-5C348706")
        self.assertEqual([r.state for r in entry.recipients], ["queued", "queued"])
        self.assertEqual(self.successResultOf(self.spool.readMessage(entry)), b"x\r\n")

    def test_newSegmentAfterRecovery(self):
        """
        After recovery new records go to a new segment.
        """
        self.successResultOf(self.spool.store(makeEntry(queueID(1)), b"x\r\n"))
        self.reopen()
        self.successResultOf(self.spool.store(makeEntry(queueID(2)), b"y\r\n"))
        self.assertEqual(segments(self.directory), [segmentName(1), segmentName(2)])
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(1), queueID(2)])

    def test_stateJournal(self):
        """
        Recorded recipient states survive a restart; once every recipient
        is final the message is finished and the (now empty) log removed.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.successResultOf(
            self.spool.record(entry, [Recipient("a@example.com", "delivered", 1, 0.0)])
        )
        self.successResultOf(
            self.spool.record(entry, [Recipient("b@example.org", "deferred", 1, 1700000600.0)])
        )
        self.assertEqual(
            entry.recipients,
            [
                Recipient("a@example.com", "delivered", 1, 0.0),
                Recipient("b@example.org", "deferred", 1, 1700000600.0),
            ],
        )
        [recovered] = self.successResultOf(makeSpool(self.directory, synchronous).recover())
        self.assertEqual(recovered.recipients, entry.recipients)
        self.successResultOf(
            self.spool.record(entry, [Recipient("b@example.org", "bounced", 2, 0.0)])
        )
        self.assertTrue(entry.done)
        self.assertEqual(os.listdir(self.directory), [])
        self.assertEqual(self.reopen(), [])

    def test_finishedWhileOthersLive(self):
        """
        A finished message is not recovered while others in its segment
        are; the segment stays.
        """
        first, second = makeEntry(queueID(1)), makeEntry(queueID(2))
        self.successResultOf(self.spool.store(first, b"x\r\n"))
        self.successResultOf(self.spool.store(second, b"y\r\n"))
        self.successResultOf(
            self.spool.record(first, [Recipient(r.address, "delivered", 1) for r in first.recipients])
        )
        self.assertEqual(segments(self.directory), [segmentName(1)])
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(2)])

    def test_recordFinishesOnlyWhenAllFinal(self):
        """
        A record that leaves a recipient not final is a C{STATE} record
        (the message is recovered with its states); the one that makes the
        last recipient final finishes the message.
        """
        entry = makeEntry(queueID(1))
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.successResultOf(self.spool.record(entry, [
            Recipient("a@example.com", "delivered", 1), Recipient("b@example.org", "deferred", 1, 9.0)]))
        [recovered] = self.reopen()
        self.assertEqual([(r.state, r.next_attempt) for r in recovered.recipients],
                         [("delivered", 0.0), ("deferred", 9.0)])
        self.successResultOf(self.spool.record(recovered, [Recipient("b@example.org", "bounced", 2)]))
        self.assertEqual(self.reopen(), [])

    def test_finishedWithoutDone(self):
        """
        A message whose recipients are all final by its C{STATE} records
        (no C{DONE} record: a crash) is not delivered again, and its
        segment is removed.
        """
        self.successResultOf(self.spool.store(makeEntry(recipients=["a@example.com"]), b"x\r\n"))
        self.append(
            1,
            encodeRecord(
                STATE, statePayload(queueID(1), [Recipient("a@example.com", "delivered", 1, 0.0)])
            ),
        )
        self.assertEqual(self.reopen(), [])
        self.assertEqual(os.listdir(self.directory), [])

    def test_tornTail(self):
        """
        A record cut short at the end of a segment (a crash during a batch)
        is truncated away; the records before it stand.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.successResultOf(self.spool.record(entry, [Recipient("a@example.com", "deferred", 1, 5.0)]))
        size = os.path.getsize(segmentPath(self.directory))
        torn = encodeRecord(STATE, statePayload(entry.queue_id, [Recipient("b@example.org", "delivered")]))
        self.append(1, torn[:-4])
        [recovered] = self.reopen()
        self.assertEqual([r.state for r in recovered.recipients], ["deferred", "queued"])
        self.assertEqual(os.path.getsize(segmentPath(self.directory)), size)
        self.assertFalse(os.path.exists(self.spool.corruptDirectory))

    def test_crcBadAtEnd(self):
        """
        A complete last record whose checksum is wrong is an unfinished
        write too: truncated.
        """
        self.successResultOf(self.spool.store(makeEntry(queueID(1)), b"x\r\n"))
        size = os.path.getsize(segmentPath(self.directory))
        record = bytearray(encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(2)), b"y\r\n")))
        record[-1] ^= 0xFF
        self.append(1, bytes(record))
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(1)])
        self.assertEqual(os.path.getsize(segmentPath(self.directory)), size)

    def test_zeroTail(self):
        """
        Zeros at the end of a segment (space allocated, never written) are
        truncated.
        """
        self.successResultOf(self.spool.store(makeEntry(), b"x\r\n"))
        size = os.path.getsize(segmentPath(self.directory))
        self.append(1, b"\0" * 100)
        self.assertEqual(len(self.reopen()), 1)
        self.assertEqual(os.path.getsize(segmentPath(self.directory)), size)

    def test_crcBadInTheMiddle(self):
        """
        A damaged record in the middle of a segment is skipped with a
        warning and its bytes kept in the corrupt directory; the records
        after it stand.
        """
        for n in (1, 2, 3):
            self.successResultOf(self.spool.store(makeEntry(queueID(n)), b"message %d\r\n" % n))
        path = segmentPath(self.directory)
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        length = len(encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(1)), b"message 1\r\n")))
        raw[length + 40] ^= 0x01
        with open(path, "wb") as f:
            f.write(raw)
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(1), queueID(3)])
        [aside] = os.listdir(self.spool.corruptDirectory)
        self.assertEqual(aside, "%s-%x.record" % (segmentName(1), length))
        with open(os.path.join(self.spool.corruptDirectory, aside), "rb") as f:
            self.assertIn(b"message 2", f.read())
        self.assertEqual(os.path.getsize(path), len(raw))

    def test_insaneHeaderInTheMiddle(self):
        """
        A record header that makes no sense, followed by data, makes the rest
        of that segment unreadable: it is moved aside (kept), the segment
        truncated there, and later segments still read.
        """
        self.successResultOf(self.spool.store(makeEntry(queueID(1)), b"x\r\n"))
        size = os.path.getsize(segmentPath(self.directory))
        self.append(1, b"garbage that is no record" * 4, encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(2)), b"y\r\n")))
        self.reopen()
        self.successResultOf(self.spool.store(makeEntry(queueID(3)), b"z\r\n"))
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(1), queueID(3)])
        self.assertEqual(os.path.getsize(segmentPath(self.directory)), size)
        [aside] = os.listdir(self.spool.corruptDirectory)
        self.assertTrue(aside.endswith(".rest"))
        with open(os.path.join(self.spool.corruptDirectory, aside), "rb") as f:
            self.assertTrue(f.read().startswith(b"garbage"))

    def test_undecodableMessageMovedAside(self):
        """
        A C{MESSAGE} record that passes its checksum but does not decode is
        moved aside, never deleted; the others are recovered.
        """
        self.successResultOf(self.spool.store(makeEntry(queueID(1)), b"x\r\n"))
        bad = encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(2)), b"some message\r\n")[:-3])
        self.append(1, bad, encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(3)), b"z\r\n")))
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(1), queueID(3)])
        [aside] = os.listdir(self.spool.corruptDirectory)
        with open(os.path.join(self.spool.corruptDirectory, aside), "rb") as f:
            self.assertEqual(f.read(), bad)

    def test_duplicateRecords(self):
        """
        The same queue id may appear several times (compaction): the last
        C{MESSAGE} record gives the location, states apply in log order,
        across segments.
        """
        first = makeEntry(queueID(1))
        self.append(
            1,
            encodeRecord(MESSAGE, encodeEntry(first, b"old copy\r\n")),
            encodeRecord(STATE, statePayload(queueID(1), [Recipient("a@example.com", "deferred", 1, 5.0)])),
        )
        self.append(
            2,
            encodeRecord(MESSAGE, encodeEntry(first, b"new copy\r\n")),
            encodeRecord(STATE, statePayload(queueID(1), [Recipient("b@example.org", "delivered", 1, 0.0)])),
        )
        [entry] = self.reopen()
        self.assertEqual(
            entry.recipients,
            [Recipient("a@example.com", "deferred", 1, 5.0), Recipient("b@example.org", "delivered", 1, 0.0)],
        )
        self.assertEqual(self.successResultOf(self.spool.readMessage(entry)), b"new copy\r\n")

    def test_doneIsFinal(self):
        """
        A C{DONE} record finishes a message whatever its states say; a
        later C{STATE} record does not bring it back.
        """
        self.append(
            1,
            encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(1)), b"x\r\n")),
            encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(2)), b"x\r\n")),
            encodeRecord(DONE, queueID(1).encode()),
            encodeRecord(STATE, statePayload(queueID(1), [Recipient("a@example.com", "deferred", 1, 5.0)])),
        )
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(2)])

    def test_oldestFirst(self):
        """
        Recovered entries come back oldest first.
        """
        for n, received in [(1, 30.0), (2, 10.0), (3, 20.0)]:
            entry = makeEntry(queueID=queueID(n))
            entry.received = received
            self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.assertEqual([e.received for e in self.reopen()], [10.0, 20.0, 30.0])

    def test_emptySegmentsRemovedOnRecovery(self):
        """
        Finished segments at the head of the log are removed on recovery;
        a finished segment after a live one stays (it may hold states of the
        older one's messages).
        """
        self.append(1, encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(1)), b"x\r\n")))
        self.append(1, encodeRecord(DONE, queueID(1).encode()))
        self.append(2, encodeRecord(MESSAGE, encodeEntry(makeEntry(queueID(2)), b"x\r\n")))
        self.append(3, encodeRecord(STATE, statePayload(queueID(2), [Recipient("a@example.com", "deferred", 1, 9.0)])))
        [entry] = self.reopen()
        self.assertEqual(entry.recipients[0].state, "deferred")
        self.assertEqual(segments(self.directory), [segmentName(2), segmentName(3)])


class SegmentTests(SynchronousTestCase):
    """
    Rolling to new segments, removing finished ones, compaction.
    """

    def setUp(self):
        self.directory = self.mktemp()
        self.clock = Clock()
        # A message record is 552 bytes: three to a segment.
        self.spool = makeSpool(self.directory, synchronous, segmentBytes=1500, clock=self.clock)
        self.successResultOf(self.spool.recover())

    def store(self, n, size=300):
        entry = makeEntry(queueID(n))
        entry.received = float(n)
        self.successResultOf(self.spool.store(entry, b"x" * size))
        return entry

    def finish(self, entry):
        self.successResultOf(
            self.spool.record(entry, [Recipient(r.address, "delivered", 1) for r in entry.recipients])
        )

    def test_roll(self):
        """
        Past C{segmentBytes} the next batch starts a new segment.
        """
        entries = [self.store(n) for n in range(1, 6)]
        self.assertEqual(segments(self.directory), [segmentName(1), segmentName(2)])
        recovered = self.successResultOf(makeSpool(self.directory, synchronous).recover())
        self.assertEqual([e.queue_id for e in recovered], [e.queue_id for e in entries])

    def test_headRemovedWhenFinished(self):
        """
        A sealed segment is removed once its messages are finished, if no
        older segment is left.
        """
        entries = [self.store(n) for n in range(1, 6)]
        for entry in entries[:3]:
            self.finish(entry)
        self.assertEqual(segments(self.directory), [segmentName(2)])
        self.assertEqual(
            [e.queue_id for e in self.successResultOf(makeSpool(self.directory, synchronous).recover())],
            [queueID(4), queueID(5)],
        )

    def test_notRemovedBehindLiveSegment(self):
        """
        A finished segment behind an older one with live messages stays: it
        holds their states.
        """
        entries = [self.store(n) for n in range(1, 10)]
        self.assertEqual(len(segments(self.directory)), 3)
        self.successResultOf(
            self.spool.record(entries[0], [Recipient("a@example.com", "deferred", 1, 7.0)])
        )
        for entry in entries[1:6]:
            self.finish(entry)
        # Segment 2 is finished, but segment 1 is not.
        self.assertEqual(len(segments(self.directory)), 4)
        self.assertEqual(self.spool._segments[2].liveCount, 0)
        self.assertEqual(self.spool._segments[2].liveIDs(self.spool._locations), [])
        [first, *_] = self.successResultOf(makeSpool(self.directory, synchronous).recover())
        self.assertEqual(first.recipients[0], Recipient("a@example.com", "deferred", 1, 7.0))

    def test_allFinishedRemovesEverything(self):
        """
        When nothing is left to deliver every segment is removed; the next
        message starts a new one.
        """
        entries = [self.store(n) for n in range(1, 6)]
        for entry in entries:
            self.finish(entry)
        self.assertEqual(os.listdir(self.directory), [])
        entry = self.store(7)
        self.assertEqual(segments(self.directory), [segmentName(3)])
        self.assertEqual(self.successResultOf(self.spool.readMessage(entry)), b"x" * 300)

    def test_compaction(self):
        """
        A long-deferred message in an old, mostly finished segment is copied
        forward with its states, and the old segment is removed once that is
        durable.
        """
        self.spool.compactRatio = 0.5
        entries = [self.store(n) for n in range(1, 4)]
        self.successResultOf(
            self.spool.record(entries[0], [Recipient("a@example.com", "deferred", 3, 77.0)])
        )
        for entry in entries[1:]:
            self.finish(entry)
        # Not yet: segment 1 was sealed just now.
        more = [self.store(n) for n in range(4, 7)]
        self.assertIn(segmentName(1), segments(self.directory))
        self.clock.advance(self.spool.compactAfter)
        self.store(8)
        self.assertNotIn(segmentName(1), segments(self.directory))
        self.spool._cache.pop(entries[0].queue_id)
        self.assertEqual(self.successResultOf(self.spool.readMessage(entries[0])), b"x" * 300)
        recovered = self.successResultOf(makeSpool(self.directory, synchronous).recover())
        self.assertEqual(
            [e.queue_id for e in recovered], [queueID(1)] + [e.queue_id for e in more] + [queueID(8)]
        )
        self.assertEqual(recovered[0].recipients[0], Recipient("a@example.com", "deferred", 3, 77.0))
        self.assertEqual(recovered[0].recipients[1].state, "queued")

    def assertLiveBytesAgree(self, spool):
        """
        Each segment's live bytes are the lengths of its live messages'
        latest records.
        """
        for number, segment in spool._segments.items():
            here = [q for q, location in spool._locations.items() if location[0] == number]
            self.assertEqual(sorted(segment.liveIDs(spool._locations)), sorted(here))
            self.assertEqual(segment.liveCount, len(here))
            self.assertEqual(segment.liveBytes, sum(spool._locations[q][2] for q in here))

    def test_liveBytesThroughCompaction(self):
        """Live bytes per segment stay the sum of their messages' record lengths through rolls, finishes, compaction and recovery."""
        self.spool.compactRatio = 0.5
        entries = [self.store(n, size=100 + 37 * n) for n in range(1, 8)]
        self.assertLiveBytesAgree(self.spool)
        self.successResultOf(
            self.spool.record(entries[0], [Recipient("a@example.com", "deferred", 3, 77.0)])
        )
        for entry in entries[1:5]:
            self.finish(entry)
        self.assertLiveBytesAgree(self.spool)
        self.clock.advance(self.spool.compactAfter)
        self.store(9)
        self.store(10)
        self.assertLiveBytesAgree(self.spool)
        recovered = makeSpool(self.directory, synchronous)
        self.successResultOf(recovered.recover())
        self.assertLiveBytesAgree(recovered)
        self.assertEqual(recovered.liveBytes, self.spool.liveBytes)

    def test_liveListPruned(self):
        """A segment's list of the messages placed in it is pruned as they finish (at most twice the live ones, and 16, are kept), and compaction copies only the live ones."""
        self.spool.segmentBytes = 1_000_000
        self.spool.compactRatio = 0.5
        entries = [self.store(n) for n in range(1, 61)]
        segment = self.spool._segments[1]
        self.assertEqual(segment.liveCount, 60)
        kept = [entries[10], entries[40]]
        self.successResultOf(
            self.spool.record(kept[0], [Recipient("a@example.com", "deferred", 2, 50.0)])
        )
        for entry in entries:
            if entry not in kept:
                self.finish(entry)
                self.assertLessEqual(len(segment.live), 2 * segment.liveCount + 16)
        self.assertEqual(segment.liveCount, 2)
        self.assertEqual(
            sorted(segment.liveIDs(self.spool._locations)), [e.queue_id for e in kept]
        )
        self.assertLiveBytesAgree(self.spool)
        # Sealed, then compacted: the two live messages are copied forward.
        self.spool.segmentBytes = 1500
        self.store(61)
        self.clock.advance(self.spool.compactAfter)
        self.store(62)
        self.assertNotIn(segmentName(1), segments(self.directory))
        self.assertLiveBytesAgree(self.spool)
        recovered = self.successResultOf(makeSpool(self.directory, synchronous).recover())
        self.assertEqual(
            [e.queue_id for e in recovered],
            [e.queue_id for e in kept] + [queueID(61), queueID(62)],
        )
        self.assertEqual(recovered[0].recipients[0], Recipient("a@example.com", "deferred", 2, 50.0))

    @settings(max_examples=40, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["store", "store", "defer", "finish", "finish", "age"]),
                st.integers(min_value=0, max_value=1000),
            ),
            min_size=20,
            max_size=80,
        )
    )
    def test_liveAgreesWithAModel(self, operations):
        """Through any mix of stores, deferrals, finishes, rolls and compactions, each segment's live count, bytes and list agree with the locations, and a recovery finds exactly the live messages, with their states and bytes."""
        directory = self.mktemp()
        clock = Clock()
        spool = makeSpool(directory, synchronous, segmentBytes=1500, compactRatio=0.5, clock=clock)
        self.successResultOf(spool.recover())
        live = {}  # queue id → (entry, data)
        number = 0
        for operation, pick in operations:
            if operation == "store" or not live:
                number += 1
                entry = makeEntry(queueID(number), recipients=("a@example.com",))
                entry.received = float(number)
                data = b"%d " % number + b"x" * (pick % 400)
                self.successResultOf(spool.store(entry, data))
                live[entry.queue_id] = (entry, data)
            elif operation == "age":
                clock.advance(spool.compactAfter)
            else:
                entry, _ = live[sorted(live)[pick % len(live)]]
                state = "deferred" if operation == "defer" else "delivered"
                self.successResultOf(
                    spool.record(entry, [Recipient("a@example.com", state, 1, float(pick))])
                )
                if state == "delivered":
                    del live[entry.queue_id]
            self.assertLiveBytesAgree(spool)
            self.assertEqual(sorted(q for q, _ in spool._locations.items()), sorted(live))
        recovered = makeSpool(directory, synchronous)
        entries = self.successResultOf(recovered.recover())
        self.assertEqual(sorted(e.queue_id for e in entries), sorted(live))
        self.assertLiveBytesAgree(recovered)
        for entry in entries:
            self.assertEqual(entry.recipients, live[entry.queue_id][0].recipients)
            self.assertEqual(
                self.successResultOf(recovered.readMessage(entry)), live[entry.queue_id][1]
            )

    def test_recoveredSegmentsSealedByTheClock(self):
        """
        Segments found at recovery count as sealed at the reactor clock's
        time of the recovery: their live messages are copied forward once
        that clock has moved C{compactAfter} on, not before.
        """
        entries = [self.store(n) for n in range(1, 4)]
        for entry in entries[1:]:
            self.finish(entry)
        clock = Clock()
        clock.advance(5000)
        self.spool = makeSpool(
            self.directory, segmentBytes=1500, compactRatio=0.5, clock=clock
        )
        self.successResultOf(self.spool.recover())
        self.assertEqual(self.spool._segments[1].sealedAt, 5000)
        clock.advance(self.spool.compactAfter - 1)
        self.store(4)
        self.assertIn(segmentName(1), segments(self.directory))
        clock.advance(1)
        self.store(5)
        self.assertNotIn(segmentName(1), segments(self.directory))

    def test_noCompactionOfBusySegments(self):
        """
        A segment whose messages are mostly live is not copied.
        """
        entries = [self.store(n) for n in range(1, 5)]
        self.clock.advance(self.spool.compactAfter)
        self.store(5)
        self.assertEqual(self.spool._locations[entries[0].queue_id][0], 1)

    def test_readDuringCompaction(self):
        """
        A read of a message whose segment is removed by compaction meanwhile
        is retried at its new location.
        """
        pending = []

        def deliveryIO(f, *args):
            d = Deferred()
            pending.append((d, f, args))
            return d

        self.spool.runDeliveryIO = deliveryIO
        self.spool.compactRatio = 0.5
        entries = [self.store(n) for n in range(1, 4)]
        for entry in entries[1:]:
            self.finish(entry)
        self.store(4)
        self.spool._cache.pop(entries[0].queue_id)
        read = self.spool.readMessage(entries[0])
        self.clock.advance(self.spool.compactAfter)
        self.store(5)
        self.assertNotIn(segmentName(1), segments(self.directory))
        while pending:
            d, f, args = pending.pop(0)
            maybeDeferred(f, *args).chainDeferred(d)
        self.assertEqual(self.successResultOf(read), b"x" * 300)


class MigrationTests(SynchronousTestCase):
    """
    Files of the per-message layout (C{.msg}, C{.state}, C{tmp-*}) are
    loaded as before, written to the log, then removed.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def write(self, name, blob):
        with open(os.path.join(self.directory, name), "wb") as f:
            f.write(blob)

    def recover(self):
        self.spool = makeSpool(self.directory, synchronous)
        return self.successResultOf(self.spool.recover())

    def test_migrate(self):
        """
        Live entries and their journals are migrated; finished ones, temp
        files and orphan journals removed; corrupt files moved aside.
        """
        live = makeEntry(queueID(1))
        live.received = 20.0
        self.write("79BC-00001-5C348706.msg", encodeEntry(live, b"live\r\n"))
        self.write(
            "79BC-00001-5C348706.state",
            encodeState(Recipient("a@example.com", "deferred", 2, 50.0))
            + b'{"a":"b@example.org","s":"deliv',
        )
        done = makeEntry(queueID(2), recipients=["a@example.com"])
        self.write("79BC-00002-5C348706.msg", encodeEntry(done, b"done\r\n"))
        self.write("79BC-00002-5C348706.state", encodeState(Recipient("a@example.com", "delivered", 1, 0.0)))
        other = makeEntry(queueID(3))
        other.received = 10.0
        self.write("79BC-00003-5C348706.msg", encodeEntry(other, b"other\r\n"))
        self.write("tmp-3-79BC-00009-5C348706.msg", b"half a mess")
        self.write("79BC-00008-5C348706.state", b"")
        self.write("79BC-00004-5C348706.msg", encodeEntry(makeEntry(queueID(4)), b"cut short\r\n")[:-3])
        self.write("79BC-00006-5C348706.msg", encodeEntry(makeEntry(queueID(5)), b"misnamed\r\n"))

        recovered = self.recover()
        self.assertEqual([e.queue_id for e in recovered], [queueID(3), queueID(1)])
        self.assertEqual(
            recovered[1].recipients,
            [Recipient("a@example.com", "deferred", 2, 50.0), Recipient("b@example.org")],
        )
        self.assertEqual(sorted(os.listdir(self.directory)), ["corrupt", segmentName(1)])
        self.assertEqual(
            sorted(os.listdir(self.spool.corruptDirectory)),
            ["79BC-00004-5C348706.msg", "79BC-00006-5C348706.msg"],
        )
        self.assertEqual(self.successResultOf(self.spool.readMessage(recovered[1])), b"live\r\n")

        again = self.recover()
        self.assertEqual([e.queue_id for e in again], [queueID(3), queueID(1)])
        self.assertEqual(again[1].recipients, recovered[1].recipients)
        self.successResultOf(self.spool.store(makeEntry(queueID(7)), b"new\r\n"))
        self.assertEqual(
            sorted(os.listdir(self.directory)), ["corrupt", segmentName(1), segmentName(2)]
        )

    def test_alreadyInTheLog(self):
        """
        Old files whose message is already in the log (a crash after
        migrating, before removing them) are removed, not migrated again.
        """
        entry = makeEntry(queueID(1))
        with open(os.path.join(self.directory, segmentName(1)), "wb") as f:
            f.write(encodeRecord(MESSAGE, encodeEntry(entry, b"x\r\n")))
            f.write(encodeRecord(STATE, statePayload(entry.queue_id, [Recipient("a@example.com", "delivered", 1)])))
        self.write("79BC-00001-5C348706.msg", encodeEntry(entry, b"x\r\n"))
        [recovered] = self.recover()
        self.assertEqual(recovered.recipients[0].state, "delivered")
        self.assertEqual(os.listdir(self.directory), [segmentName(1)])

    def test_onlyFinished(self):
        """
        With nothing live, migration leaves an empty directory.
        """
        self.write("tmp-3-79BC-00009-5C348706.msg", b"half a mess")
        self.assertEqual(self.recover(), [])
        self.assertEqual(os.listdir(self.directory), [])


class DeliverySideTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.pending = []

        def deliveryIO(f, *args):
            d = Deferred()
            self.pending.append((d, f, args))
            return d

        self.spool = makeSpool(self.directory, synchronous, runDeliveryIO=deliveryIO)
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
        fresh = makeSpool(self.directory, synchronous, runDeliveryIO=self.spool.runDeliveryIO)
        [entry] = self.successResultOf(fresh.recover())
        d = fresh.readMessage(entry)
        self.assertEqual(len(self.pending), 1)
        self.runPending()
        self.assertEqual(self.successResultOf(d), b"body\r\n")

    def test_readDamaged(self):
        """
        A message damaged on disk after recovery fails to read with
        L{SpoolCorrupt}.
        """
        self.successResultOf(self.spool.store(makeEntry(), b"body\r\n"))
        fresh = makeSpool(self.directory, synchronous, runDeliveryIO=synchronous)
        [entry] = self.successResultOf(fresh.recover())
        path = segmentPath(self.directory)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 3)
            f.write(b"!")
        self.failureResultOf(fresh.readMessage(entry), SpoolCorrupt)

    def test_readUnknown(self):
        """
        Reading a message the spool does not hold fails with L{SpoolError}.
        """
        self.failureResultOf(self.spool.readMessage(makeEntry()), SpoolError)

    def test_concurrentRecordsFinishEntry(self):
        """
        Two concurrent records for different recipients that together finish
        the entry merge correctly; the spool then marks it finished itself.
        """
        batches = []

        def runner(f, *args):
            d = Deferred()
            batches.append((d, f, args))
            return d

        self.spool.runInThread = runner
        entry = makeEntry()
        stored = self.spool.store(entry, b"x\r\n")
        d, f, args = batches.pop(0)
        d.callback(f(*args))
        self.successResultOf(stored)
        first = self.spool.record(entry, [Recipient("a@example.com", "delivered", 1, 0.0)])
        second = self.spool.record(entry, [Recipient("b@example.org", "bounced", 1, 0.0)])
        while batches:
            d, f, args = batches.pop(0)
            d.callback(f(*args))
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual([r.state for r in entry.recipients], ["delivered", "bounced"])
        self.assertEqual(os.listdir(self.directory), [])
        self.assertIsNone(self.spool._cache.get(entry.queue_id))
        self.assertEqual(self.successResultOf(makeSpool(self.directory, synchronous).recover()), [])

    def test_recordAppliedBeforeItFires(self):
        """
        A record's changes are in the entry when its Deferred fires, not
        before its batch is written; one change or several alike, merged
        into the entry as it is then.
        """
        batches = []

        def runner(f, *args):
            d = Deferred()
            batches.append((d, f, args))
            return d

        self.spool.runInThread = runner
        entry = makeEntry(recipients=("a@example.com", "b@example.org", "c@example.net"))
        stored = self.spool.store(entry, b"x\r\n")
        d, f, args = batches.pop(0)
        d.callback(f(*args))
        self.successResultOf(stored)
        seen = []
        one = self.spool.record(entry, [Recipient("a@example.com", "deferred", 1, 60.0)])
        one.addCallback(lambda _: seen.append([(r.state, r.attempts) for r in entry.recipients]))
        several = self.spool.record(entry, [Recipient("b@example.org", "delivered", 1, 0.0),
                                            Recipient("c@example.net", "deferred", 2, 90.0)])
        self.assertEqual([r.state for r in entry.recipients], ["queued"] * 3)
        while batches:
            d, f, args = batches.pop(0)
            d.callback(f(*args))
        self.assertIsNone(self.successResultOf(one))
        self.assertIsNone(self.successResultOf(several))
        # The first record had its own batch, written before the second's.
        self.assertEqual(seen, [[("deferred", 1), ("queued", 0), ("queued", 0)]])
        self.assertEqual([(r.address, r.state, r.attempts, r.next_attempt) for r in entry.recipients],
                         [("a@example.com", "deferred", 1, 60.0), ("b@example.org", "delivered", 1, 0.0),
                          ("c@example.net", "deferred", 2, 90.0)])
        self.assertEqual([[(r.state, r.next_attempt) for r in e.recipients]
                          for e in self.successResultOf(makeSpool(self.directory, synchronous).recover())],
                         [[("deferred", 60.0), ("delivered", 0.0), ("deferred", 90.0)]])

    def test_recordMany(self):
        """
        L{Spool.recordMany} records many messages in one batch and fires
        once, with a C{(True, None)} per message in order, each entry
        updated; the states are recovered after a restart.
        """
        batches = []

        def runner(f, *args):
            d = Deferred()
            batches.append((d, f, args))
            return d

        self.spool.runInThread = runner
        entries = [makeEntry(queueID(n), recipients=("a@example.com",)) for n in range(1, 4)]
        for entry in entries:
            stored = self.spool.store(entry, b"x\r\n")
            d, f, args = batches.pop(0)
            d.callback(f(*args))
            self.successResultOf(stored)
        done = self.spool.recordMany(
            [(entry, [Recipient("a@example.com", "deferred", 1, 60.0 + n)])
             for n, entry in enumerate(entries)])
        self.assertNoResult(done)
        self.assertEqual(len(batches), 1)  # one group commit
        self.assertEqual([e.recipients[0].state for e in entries], ["queued"] * 3)
        d, f, args = batches.pop(0)
        d.callback(f(*args))
        self.assertEqual(self.successResultOf(done), [(True, None)] * 3)
        self.assertEqual([(e.recipients[0].state, e.recipients[0].next_attempt) for e in entries],
                         [("deferred", 60.0), ("deferred", 61.0), ("deferred", 62.0)])
        self.assertEqual(
            [(e.queue_id, e.recipients[0].next_attempt)
             for e in self.successResultOf(makeSpool(self.directory, synchronous).recover())],
            [(queueID(1), 60.0), (queueID(2), 61.0), (queueID(3), 62.0)])

    def test_recordManyFinishes(self):
        """
        A message that L{Spool.recordMany} leaves with every recipient final
        is finished, as by L{Spool.record}.
        """
        first, second = makeEntry(queueID(1)), makeEntry(queueID(2))
        for entry in (first, second):
            self.successResultOf(self.spool.store(entry, b"x\r\n"))
        results = self.successResultOf(self.spool.recordMany([
            (first, [Recipient(r.address, "delivered", 1) for r in first.recipients]),
            (second, [Recipient("a@example.com", "deferred", 1, 5.0)]),
        ]))
        self.assertEqual(results, [(True, None), (True, None)])
        self.assertTrue(first.done)
        recovered = self.successResultOf(makeSpool(self.directory, synchronous).recover())
        self.assertEqual([e.queue_id for e in recovered], [queueID(2)])

    def test_recordManyNothing(self):
        """
        Nothing to record: the result is an empty list at once, no batch.
        """
        self.assertEqual(self.successResultOf(self.spool.recordMany([])), [])

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
        self.spool = makeSpool(self.directory, synchronous)
        self.successResultOf(self.spool.recover())

    def fail(self, number=errno.EIO):
        def raiser(*args, **kwargs):
            raise OSError(number, os.strerror(number))

        return raiser

    def reopen(self):
        return self.successResultOf(makeSpool(self.directory, synchronous).recover())

    def assertRefused(self, entry=None):
        failure = self.failureResultOf(self.spool.store(entry or makeEntry(), b"x\r\n"))
        failure.trap(SpoolError)
        self.flushLoggedErrors(OSError)

    def test_writeFailure(self):
        """
        A failed write (disk full) is a SpoolError; the segment is truncated
        back, so nothing of it is recovered.
        """
        self.patch(os, "write", self.fail(errno.ENOSPC))
        self.assertRefused()
        self.assertEqual(self.reopen(), [])

    def test_failedRecordLeavesEntry(self):
        """
        A record whose batch cannot be written fails with the error and
        leaves the entry's recipients as they were.
        """
        entry = makeEntry(queueID(1))
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        before = list(entry.recipients)
        self.patch(os, "fdatasync", self.fail())
        failure = self.failureResultOf(
            self.spool.record(entry, [Recipient("a@example.com", "deferred", 1, 60.0)]))
        self.assertTrue(failure.check(OSError, SpoolError))
        self.flushLoggedErrors(OSError)
        self.assertEqual(entry.recipients, before)

    def test_recordManyFailure(self):
        """
        When the batch of L{Spool.recordMany} cannot be written, every
        message's result is C{(False, failure)} and no entry changes.
        """
        entries = [makeEntry(queueID(n), recipients=("a@example.com",)) for n in (1, 2)]
        for entry in entries:
            self.successResultOf(self.spool.store(entry, b"x\r\n"))
        self.patch(os, "fdatasync", self.fail())
        results = self.successResultOf(self.spool.recordMany(
            [(entry, [Recipient("a@example.com", "deferred", 1, 60.0)]) for entry in entries]))
        self.flushLoggedErrors(OSError)
        self.assertEqual([ok for ok, _ in results], [False, False])
        for _, failure in results:
            self.assertTrue(failure.check(OSError, SpoolError))
        self.assertEqual([e.recipients[0].state for e in entries], ["queued", "queued"])

    def test_flushFailure(self):
        """
        A failed fdatasync is a SpoolError and the batch is truncated away;
        the next batch goes to a new segment.
        """
        self.successResultOf(self.spool.store(makeEntry(queueID(1)), b"x\r\n"))
        size = os.path.getsize(segmentPath(self.directory))
        realFdatasync = os.fdatasync
        self.patch(os, "fdatasync", self.fail())
        self.assertRefused(makeEntry(queueID(2)))
        self.assertEqual(os.path.getsize(segmentPath(self.directory)), size)
        self.patch(os, "fdatasync", realFdatasync)
        self.successResultOf(self.spool.store(makeEntry(queueID(3)), b"x\r\n"))
        self.assertEqual(segments(self.directory), [segmentName(1), segmentName(2)])
        self.assertEqual([e.queue_id for e in self.reopen()], [queueID(1), queueID(3)])

    def test_failedBatchNotBuiltOn(self):
        """
        If even the truncation fails, the failed batch's records stay (a
        crash may find them: a duplicate, never a loss), but no later batch
        is written behind them.
        """
        self.successResultOf(self.spool.store(makeEntry(queueID(1)), b"x\r\n"))
        realFdatasync = os.fdatasync
        self.patch(os, "fdatasync", self.fail())
        self.patch(os, "ftruncate", self.fail())
        self.assertRefused(makeEntry(queueID(2)))
        self.patch(os, "fdatasync", realFdatasync)
        self.successResultOf(self.spool.store(makeEntry(queueID(3)), b"x\r\n"))
        self.assertEqual(segments(self.directory), [segmentName(1), segmentName(2)])
        with open(segmentPath(self.directory, 2), "rb") as f:
            self.assertEqual(spoolModule.parseRecord(f.read())[3], None)

    def test_directorySyncFailure(self):
        """
        If the directory fsync after creating a segment fails, the store
        fails.
        """
        self.patch(spoolModule, "fsyncDirectory", self.fail())
        self.assertRefused()
        self.assertEqual(self.reopen(), [])

    def test_realDiskError(self):
        """
        An OSError from the real write path (here: the directory is gone)
        becomes a SpoolError.
        """
        os.rmdir(self.directory)
        self.assertRefused()

    def test_recordFailure(self):
        """
        A failed record fails with the OSError and leaves the entry as it
        was; a later record succeeds.
        """
        entry = makeEntry()
        self.successResultOf(self.spool.store(entry, b"x\r\n"))
        realFdatasync = os.fdatasync
        self.patch(os, "fdatasync", self.fail())
        done = self.spool.record(entry, [Recipient(r.address, state="delivered") for r in entry.recipients])
        self.failureResultOf(done, OSError)
        self.assertFalse(entry.done)
        self.patch(os, "fdatasync", realFdatasync)
        self.successResultOf(
            self.spool.record(entry, [Recipient("a@example.com", "deferred", 1, 3.0)])
        )
        [recovered] = self.reopen()
        self.assertEqual(recovered.recipients, entry.recipients)


class GroupCommitTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.batches = []

        def runner(f, *args):
            if f is spoolModule._writeBatch:
                d = Deferred()
                self.batches.append((d, args))
                return d
            return maybeDeferred(f, *args)

        self.spool = makeSpool(self.directory, runner)
        self.successResultOf(self.spool.recover())
        self.syncs = []
        realFdatasync = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (self.syncs.append(fd), realFdatasync(fd))[1])

    def runBatch(self, index):
        d, args = self.batches[index]
        d.callback(spoolModule._writeBatch(*args))

    def records(self, args):
        return len(args[1].pieces)

    def test_batches(self):
        """
        Messages that arrive while a batch is being written go into the
        next batch together; one batch is written at a time, with one
        fdatasync each.
        """
        results = [self.spool.store(makeEntry(queueID(n)), b"x\r\n") for n in range(5)]
        self.assertEqual([self.records(args) for _, args in self.batches], [1])
        self.runBatch(0)
        self.successResultOf(results[0])
        self.assertNoResult(results[1])
        self.assertEqual([self.records(args) for _, args in self.batches], [1, 4])
        self.runBatch(1)
        for d in results:
            self.successResultOf(d)
        self.assertEqual(len(self.syncs), 2)
        self.assertEqual(segments(self.directory), [segmentName(1)])

    def test_maxBatch(self):
        """
        At most C{maxBatch} new messages go into one batch.
        """
        self.spool.maxBatch = 2
        for n in range(6):
            self.spool.store(makeEntry(queueID(n)), b"x\r\n")
        self.runBatch(0)
        self.runBatch(1)
        self.assertEqual([self.records(args) for _, args in self.batches], [1, 2, 2])

    def test_statesJoinNextBatch(self):
        """
        State changes and finished messages asked for while a batch is
        being written go into the next batch with new messages.
        """
        first, second = makeEntry(queueID(1)), makeEntry(queueID(2))
        self.spool.store(first, b"x\r\n")
        self.spool.store(second, b"x\r\n")
        self.runBatch(0)
        self.runBatch(1)
        self.spool.store(makeEntry(queueID(3)), b"y\r\n")
        done = self.spool.record(first, [Recipient(r.address, state="delivered") for r in first.recipients])
        changed = self.spool.record(second, [Recipient("a@example.com", "deferred", 1, 9.0)])
        third = self.spool.store(makeEntry(queueID(4)), b"z\r\n")
        self.assertNoResult(done)
        self.assertEqual(len(self.batches), 3)
        self.runBatch(2)
        self.assertEqual(len(self.batches), 4)
        self.assertEqual(self.records(self.batches[3][1]), 3)
        self.assertFalse(first.done)
        self.runBatch(3)
        self.successResultOf(done)
        self.successResultOf(changed)
        self.successResultOf(third)
        self.assertTrue(first.done)
        self.assertEqual(second.recipients[0].state, "deferred")
        self.assertEqual(len(self.syncs), 4)
        recovered = self.successResultOf(makeSpool(self.directory, synchronous).recover())
        self.assertEqual([e.queue_id for e in recovered], [queueID(2), queueID(3), queueID(4)])


class CrashTests(SynchronousTestCase):
    """
    Random histories, then a crash: recovery finds exactly what was
    acknowledged and not finished, with its last durable states.
    """

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_crashAnywhere(self, data):
        directory = self.mktemp()
        batches = []

        def runner(f, *args):
            if f is spoolModule._writeBatch:
                d = Deferred()
                batches.append((d, args))
                return d
            return maybeDeferred(f, *args)

        clock = Clock()
        spool = makeSpool(
            directory,
            runner,
            segmentBytes=data.draw(st.sampled_from([400, 4000, 1 << 20])),
            compactRatio=data.draw(st.sampled_from([0.25, 1.0])),
            clock=clock,
        )
        self.successResultOf(spool.recover())
        # The model: queue id -> recipient list, as acknowledged.
        acked: dict = {}
        live: dict = {}  # the entries the delivery side works with
        counter = iter(range(1, 10000))
        states = st.sampled_from(["deferred", "delivered", "bounced", "queued"])

        def operations(count):
            """
            Issue C{count} random operations; returns C{(kind, entry,
            change list, deferred)} tuples in issue order.
            """
            issued = []
            busy = set()
            for _ in range(count):
                choices = ["store"]
                candidates = [q for q in live if q not in busy]
                if candidates:
                    choices.append("record")
                if data.draw(st.sampled_from(choices)) == "store":
                    n = next(counter)
                    entry = makeEntry(queueID(n), recipients=["a@example.com", "b@example.org"][: data.draw(st.integers(1, 2))])
                    issued.append(("store", entry, None, spool.store(entry, b"message %d\r\n" % n)))
                else:
                    q = data.draw(st.sampled_from(sorted(candidates)))
                    entry = live[q]
                    busy.add(q)
                    changes = [
                        Recipient(r.address, data.draw(states), r.attempts + 1, float(n))
                        for n, r in enumerate(entry.pending())
                        if data.draw(st.booleans())
                    ] or [Recipient(entry.pending()[0].address, "deferred", 9, 9.0)]
                    issued.append(("record", entry, changes, spool.record(entry, changes)))
            return issued

        def settle(issued):
            for kind, entry, changes, d in issued:
                self.successResultOf(d)
                if kind == "store":
                    acked[entry.queue_id] = [Recipient(r.address) for r in entry.recipients]
                    live[entry.queue_id] = entry
                else:
                    byAddress = {c.address: c for c in changes}
                    acked[entry.queue_id] = [byAddress.get(r.address, r) for r in acked[entry.queue_id]]
                    if entry.done:
                        del live[entry.queue_id]

        for _ in range(data.draw(st.integers(0, 6))):
            if data.draw(st.booleans()):
                # Old enough for compaction.
                clock.advance(spool.compactAfter)
            issued = operations(data.draw(st.integers(1, 5)))
            while batches:
                d, args = batches.pop(0)
                d.callback(spoolModule._writeBatch(*args))
            settle(issued)
        # Spool-internal DONE records are written in batches of their own.
        self.assertEqual(batches, [])

        # The crash: one more batch is written but not acknowledged, and only
        # some prefix of its bytes reaches the disk.
        clock.advance(spool.compactAfter)
        issued = operations(data.draw(st.integers(1, 5)))
        if batches:
            _, (writer, batch) = batches[-1]
            # Segments are removed only once a batch is durable: not this one.
            batch.deletions = []
            batch.retire = False
            before = {n: os.path.getsize(os.path.join(directory, n)) for n in segments(directory)}
            try:
                spoolModule._writeBatch(writer, batch)
            except OSError:
                pass
            if os.path.exists(batch.path):
                size = os.path.getsize(batch.path)
                start = before.get(os.path.basename(batch.path), 0)
                with open(batch.path, "r+b") as f:
                    f.truncate(data.draw(st.integers(start, size)))
            if writer.fd is not None:
                os.close(writer.fd)

        expected = {q: r for q, r in acked.items() if not all(x.final for x in r)}
        recovered = self.successResultOf(makeSpool(directory, synchronous).recover())
        got = {e.queue_id: e.recipients for e in recovered}
        # Unacknowledged records that did reach the disk may apply, in
        # order: the result is the acknowledged state plus some prefix of
        # the crashed batch's operations.
        candidates = [expected]
        model = {q: list(r) for q, r in acked.items()}
        for kind, entry, changes, _ in issued:
            if kind == "store":
                model[entry.queue_id] = [Recipient(r.address) for r in entry.recipients]
            else:
                byAddress = {c.address: c for c in changes}
                model[entry.queue_id] = [byAddress.get(r.address, r) for r in model[entry.queue_id]]
            candidates.append({q: r for q, r in model.items() if not all(x.final for x in r)})
        self.assertIn(got, candidates)
        if os.path.exists(os.path.join(directory, "corrupt")):
            self.fail("corrupt data after a crash: %r" % (os.listdir(os.path.join(directory, "corrupt")),))
