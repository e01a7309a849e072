# -*- test-case-name: tests.test_deferreds -*-
"""
Waiting for work in flight.
"""

from typing import Any, Callable, Collection

from twisted.internet.defer import Deferred, DeferredList


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
