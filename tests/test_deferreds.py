"""
Tests for L{smartrelay.deferreds}.
"""

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.deferreds import whenAllDone


class WhenAllDoneTests(SynchronousTestCase):
    def track(self, running, d):
        """Keep C{d} in C{running} until it fires, as owners do."""
        running.add(d)
        d.addBoth(lambda result: (running.discard(d), result)[1])
        return d

    def test_nothingRunning(self):
        """With nothing running it fires at once."""
        self.assertIsNone(self.successResultOf(whenAllDone(set)))

    def test_waitsForAll(self):
        """It fires only once every running Deferred has fired."""
        running = set()
        a, b = self.track(running, Deferred()), self.track(running, Deferred())
        done = whenAllDone(lambda: running)
        a.callback(1)
        self.assertNoResult(done)
        b.callback(2)
        self.successResultOf(done)

    def test_addedMeanwhile(self):
        """Work started while it waits (here: by the work it waits for) is waited for too."""
        running = set()
        follower = Deferred()
        first = self.track(running, Deferred())
        first.addCallback(lambda _: self.track(running, follower))
        done = whenAllDone(lambda: running)
        first.callback(None)
        self.assertEqual(running, {follower})
        self.assertNoResult(done)
        follower.callback(None)
        self.successResultOf(done)

    def test_failuresUntouched(self):
        """A failed Deferred counts as done; its failure stays with its owner."""
        running = set()
        d = self.track(running, Deferred())
        done = whenAllDone(lambda: running)
        d.errback(ValueError("boom"))
        self.successResultOf(done)
        self.failureResultOf(d, ValueError)
