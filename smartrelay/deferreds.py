# -*- test-case-name: tests.test_deferreds -*-
"""
Waiting for work in flight.
"""

from typing import Any, Callable, Collection

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure


def whenAllDone(pending: Callable[[], Collection[Deferred]]) -> Deferred:
    """
    Wait until C{pending()} is empty: for the L{Deferred}s it returns now,
    then for any added meanwhile (work that ends often starts more, such
    as the record of a delivery attempt), and so on.

    @param pending: returns the L{Deferred}s still running; their owner
        removes each once it has fired.
    @return: a L{Deferred} firing with L{None} once C{pending()} is empty
        (at once if it already is).  The Deferreds' results are untouched.
    """
    done: Deferred = Deferred()

    def check(_: Any = None) -> None:
        running = list(pending())
        if running:
            DeferredList(running).addCallback(check)
        else:
            done.callback(None)

    check()
    return done


class InFlight:
    """
    Work in flight that must finish (or be waited for) before a service
    stops: each tracked L{Deferred} is kept until it fires, and an
    unexpected failure is logged rather than lost.
    """

    def __init__(self, log: Any, what: str = "unexpected error in delivery scheduling") -> None:
        self._log = log
        self._what = what
        self.pending: set = set()

    def track(self, d: Deferred) -> Deferred:
        """
        Keep C{d} until it fires; log its failure, if any.

        @return: C{d}.
        """
        self.pending.add(d)

        def finished(result: Any) -> None:
            self.pending.discard(d)
            if isinstance(result, Failure):
                self._log.failure(self._what, result)

        d.addBoth(finished)
        return d
