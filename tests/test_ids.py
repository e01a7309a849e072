"""
Tests for L{smartrelay.ids}: queue id format and uniqueness across
restarts, whatever the wall clock does.
"""

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.ids import (
    LEASE,
    IDState,
    LeaseExpired,
    fileName,
    isQueueID,
    loadIDState,
    queueIDFromFileName,
    saveIDState,
    startRun,
)


class FormatTests(SynchronousTestCase):
    def test_format(self):
        """
        Ids match DESIGN 1.3: node / boot - counter - time.
        """
        state, generator = startRun(IDState(), 0x5C348706, node=0x79)
        queueID = generator.next(0x5C348706)
        self.assertEqual(queueID, "79/01-00000-5C348706")
        self.assertTrue(isQueueID(queueID))

    def test_fileNameRoundTrip(self):
        """
        The spool file stem maps back to the queue id.
        """
        self.assertEqual(fileName("79/BC-12331-5C348706"), "79BC-12331-5C348706")
        self.assertEqual(queueIDFromFileName("79BC-12331-5C348706"), "79/BC-12331-5C348706")
        self.assertIsNone(queueIDFromFileName("garbage"))

    def test_counterOverflowBorrowsNextSecond(self):
        """
        More than 100,000 ids in one second move the logical clock forward
        instead of repeating.
        """
        _, generator = startRun(IDState(), 1000)
        ids = {generator.next(1000) for _ in range(100002)}
        self.assertEqual(len(ids), 100002)
        self.assertEqual(generator.second, 1001)

    def test_expiredLeaseRefuses(self):
        """
        Past the end of the lease no id is handed out.
        """
        _, generator = startRun(IDState(), 1000)
        self.assertRaises(LeaseExpired, generator.next, 1000 + LEASE)
        generator.next(1000)

    def test_clockGoingBackwards(self):
        """
        A wall clock that steps back does not move the logical clock back.
        """
        _, generator = startRun(IDState(), 5000)
        first = generator.next(5000)
        second = generator.next(4000)
        self.assertNotEqual(first, second)
        self.assertTrue(second.endswith("%08X" % 5000))


class PersistenceTests(SynchronousTestCase):
    def test_saveAndLoad(self):
        """
        The state round-trips through its file; a missing file is a first
        start.
        """
        path = self.mktemp()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.assertEqual(loadIDState(path), IDState())
        saveIDState(path, IDState(boot=7, floor=1234))
        self.assertEqual(loadIDState(path), IDState(boot=7, floor=1234))

    def test_damagedFile(self):
        """
        A damaged state file is an error, never silently reset.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{not json")
        self.assertRaises(ValueError, loadIDState, path)
        for text in ['{"boot": 1}', "[]", '{"boot": "x", "floor": 2}', ""]:
            with open(path, "w") as f:
                f.write(text)
            self.assertRaises(ValueError, loadIDState, path)

    def test_leaseRenewal(self):
        """
        Half-way through the lease the generator asks for a longer one,
        once, until told it is done.
        """
        _, generator = startRun(IDState(), 1000)
        self.assertIsNone(generator.leaseWanted(1000))
        generator.next(1000 + LEASE // 2)
        wanted = generator.leaseWanted(1000)
        self.assertEqual(wanted.floor, 1000 + LEASE // 2 + LEASE)
        self.assertIsNone(generator.leaseWanted(1000 + LEASE // 2))
        generator.leaseRenewed(wanted)
        self.assertEqual(generator.leaseUntil, wanted.floor)


class UniquenessTests(SynchronousTestCase):
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 10**9),  # wall clock at start
                st.lists(st.integers(-100, 400), max_size=30),  # clock steps
                st.booleans(),  # crash before any lease renewal?
            ),
            min_size=1,
            max_size=300,
        )
    )
    def test_uniqueAcrossRestarts(self, runs):
        """
        Across any sequence of runs (even more than 256, even with a wall
        clock that jumps backwards and crashes that lose renewals), no queue
        id is ever handed out twice, as long as each run persists the state
        that startRun and leaseWanted ask for before using it.
        """
        persisted = IDState()
        seen = set()
        for start, steps, crash in runs:
            persisted, generator = startRun(persisted, start)
            now = start
            for step in steps:
                now = max(0, now + step)
                try:
                    queueID = generator.next(now)
                except LeaseExpired:
                    pass  # a failed renewal, or a clock jump past the lease
                else:
                    self.assertNotIn(queueID, seen)
                    seen.add(queueID)
                wanted = generator.leaseWanted(now)
                if wanted is not None and not crash:
                    persisted = wanted
                    generator.leaseRenewed(wanted)
                elif wanted is not None:
                    generator.leaseFailed()
