# -*- test-case-name: tests.test_retention -*-
"""
Background pruning of events older than C{[store] retention}, and of the
SMSC message ids kept to match SMS receipts (L{ISMSSubmissions}) as old.
"""

from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from smartrelay.store.interfaces import ISMSSubmissions


@attrs.define(eq=False, slots=False)
class Pruner(Service):
    """
    Every C{interval} seconds (and once at start), delete events older than
    C{retention} in steps of at most C{step} events, one store call at a
    time, so no single call holds the store (or its writer thread) long.

    @ivar store: provides C{pruneEvents(before, limit) -> Deferred[int]};
        if it provides L{ISMSSubmissions} too, its SMS submissions older
        than C{retention} are pruned after the events (a receipt later than
        that no longer finds its message).
    @ivar clock: an C{IReactorTime}.
    """

    store: Any
    clock: Any
    retention: float
    interval: float = 600.0
    step: int = 5000
    _timer: Any = attrs.field(default=None, init=False)
    _running: Optional[Deferred] = attrs.field(default=None, init=False)

    log = Logger()

    def startService(self) -> None:
        Service.startService(self)
        self._schedule(0)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self._running if self._running is not None else succeed(None)

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._timer = self.clock.callLater(delay, self.prune)

    def prune(self) -> Deferred:
        """
        Prune now; fires with the number of events removed.
        """
        self._timer = None
        d = self._running = Deferred.fromCoroutine(self._prune())

        def done(result):
            self._running = None
            self._schedule(self.interval)
            return result

        def failed(failure):
            # Expected while the store is unreachable; tried again later.
            self.log.warn(
                "could not prune old events ({why}); next try in {interval}s",
                why=failure.getErrorMessage() or failure.type.__name__,
                interval=self.interval,
            )
            return 0

        return d.addErrback(failed).addBoth(done)

    async def _prune(self) -> int:
        before = self.clock.seconds() - self.retention
        total = 0
        while self.running:
            removed = await self.store.pruneEvents(before, self.step)
            total += removed
            if removed < self.step:
                break
        if total:
            self.log.info(
                "pruned {count} events (and open/click records) older than {days:.0f} days",
                count=total,
                days=self.retention / 86400,
            )
        submissions = 0
        while ISMSSubmissions.providedBy(self.store) and self.running:
            removed = await self.store.pruneSMSSubmissions(before, self.step)
            submissions += removed
            if removed < self.step:
                break
        if submissions:
            self.log.info(
                "pruned {count} SMS submissions older than {days:.0f} days",
                count=submissions,
                days=self.retention / 86400,
            )
        return total
