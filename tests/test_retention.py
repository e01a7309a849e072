"""
Tests for L{smartrelay.retention.Pruner}, with a Clock and a fake store.
"""

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.retention import Pruner

DAY = 86400.0


class FakeStore:
    def __init__(self, times):
        self.times = sorted(times)
        self.calls = []
        self.broken = False

    def pruneEvents(self, before, limit):
        self.calls.append((before, limit))
        if self.broken:
            return fail(OSError("disk trouble"))
        old = [t for t in self.times if t < before][:limit]
        for t in old:
            self.times.remove(t)
        return succeed(len(old))


class PrunerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(100 * DAY)

    def makePruner(self, times, **kwargs):
        self.store = FakeStore(times)
        pruner = Pruner(self.store, self.clock, retention=30 * DAY, step=3, **kwargs)
        pruner.startService()
        self.addCleanup(pruner.stopService)
        return pruner

    def test_prunesInSteps(self):
        """
        At start, everything older than the retention goes, in steps of at
        most `step` events; newer events stay.
        """
        old = [float(i) for i in range(7)]
        recent = [95 * DAY, 99 * DAY]
        self.makePruner(old + recent)
        self.clock.advance(0)
        self.assertEqual(self.store.times, recent)
        self.assertEqual([limit for _, limit in self.store.calls], [3, 3, 3])
        self.assertEqual({before for before, _ in self.store.calls}, {70 * DAY})

    def test_runsEveryInterval(self):
        """
        After a run the next one is scheduled `interval` seconds later, with
        the cut-off moving with the clock.
        """
        self.makePruner([], interval=600)
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 1)
        self.clock.advance(600)
        self.assertEqual(len(self.store.calls), 2)
        self.assertEqual(self.store.calls[1][0], 70 * DAY + 600)

    def test_failureLoggedAndRetried(self):
        """
        A failing prune (the store is unreachable) is logged as a warning
        and tried again at the next interval.
        """
        pruner = self.makePruner([1.0], interval=600)
        self.store.broken = True
        self.clock.advance(0)
        self.assertEqual(self.store.times, [1.0])
        self.store.broken = False
        self.clock.advance(600)
        self.assertEqual(self.store.times, [])
        self.assertTrue(pruner.running)

    def test_stopLeavesNoTimer(self):
        """
        After stopService no timer is left.
        """
        pruner = self.makePruner([])
        self.clock.advance(0)
        self.successResultOf(pruner.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SMSSubmissionPruningTests(SynchronousTestCase):
    """
    The SMS submissions kept to match receipts are pruned with the events.
    """

    def test_oldSubmissionsPruned(self):
        """
        A store providing ISMSSubmissions loses the submissions older than
        the retention, in steps; newer ones stay.
        """
        from smartrelay.store.interfaces import SMSSubmission
        from smartrelay.store.memory import MemoryStore

        clock = Clock()
        clock.advance(100 * DAY)
        store = MemoryStore()
        for number, time in enumerate([1 * DAY, 2 * DAY, 3 * DAY, 4 * DAY, 99 * DAY]):
            self.successResultOf(store.addSMSSubmission(SMSSubmission(
                message_id="%X" % (0x100 + number), queue_id="2A/01-00000-00000000",
                recipient="+393331234567@sms.example.com", part=number + 1, parts=5, time=time,
            )))
        pruner = Pruner(store, clock, retention=30 * DAY, step=3)
        pruner.startService()
        self.addCleanup(pruner.stopService)
        clock.advance(0)
        left = self.successResultOf(
            store.smsSubmissions("2A/01-00000-00000000", "+393331234567@sms.example.com")
        )
        self.assertEqual([s.message_id for s in left], ["104"])
