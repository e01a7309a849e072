"""
Tests for L{smartrelay.tap}'s process tuning: the garbage collector's
thresholds, and start-up's objects frozen once the relay is up.
"""

from twisted.trial.unittest import SynchronousTestCase

from smartrelay import tap


class FakeCollector:
    """
    The parts of the C{gc} module that the tuning uses, recording calls.
    """

    def __init__(self):
        self.calls = []

    def set_threshold(self, *thresholds):
        self.calls.append(("set_threshold", thresholds))

    def collect(self):
        self.calls.append(("collect",))
        return 0

    def freeze(self):
        self.calls.append(("freeze",))


class CollectorTests(SynchronousTestCase):
    def test_thresholds(self):
        """
        The relay's thresholds make the youngest generation's collections
        rarer than Python's default (700), never more frequent.
        """
        collector = FakeCollector()
        tap.tuneCollector(collector)
        [(name, thresholds)] = collector.calls
        self.assertEqual(name, "set_threshold")
        self.assertEqual(thresholds, tap.COLLECTOR_THRESHOLDS)
        self.assertGreater(thresholds[0], 700)
        self.assertTrue(all(t >= 10 for t in thresholds[1:]))

    def test_freezeStartUp(self):
        """
        Start-up's garbage is collected before what is left is frozen (so
        no garbage is frozen with it).
        """
        collector = FakeCollector()
        tap.freezeStartUp(collector)
        self.assertEqual(collector.calls, [("collect",), ("freeze",)])
