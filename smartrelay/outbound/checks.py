# -*- test-case-name: tests.test_outbound_scheduler,tests.test_cluster_replica -*-
"""
The suppression list check of recipients about to be attempted: against
the store, or — while the store cannot be reached — against the node's
local replica of the list if it is fresh enough; otherwise the recipients
are held (a temporary failure, retried).  A recipient is never delivered
unchecked.
"""

from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.outbound.outcomes import Verdict
from smartrelay.outbound.session import Reply

__all__ = ["SuppressionCheck", "HELD"]

#: The reply of a recipient held because no suppression list could be
#: checked.
HELD = Reply(
    451,
    "4.3.0",
    "held: the suppression list cannot be checked (store unreachable, local copy too old)",
)

_ON_LIST = Reply(550, "5.7.1", "recipient is on the suppression list")


@attrs.define(eq=False)
class SuppressionCheck:
    """
    Checks recipients against the suppression list.

    @ivar store: C{checkSuppressions(addresses, now) -> Deferred[dict]}
        (address → entry) of the store.
    @ivar replica: the local copy
        (L{SuppressionReplica <smartrelay.cluster.replica.SuppressionReplica>}:
        C{fresh(now)}, C{age(now)}, C{check(addresses, now)}, C{held}), or
        L{None}: without one, recipients are held while the store cannot be
        asked.
    """

    store: Any
    clock: Any
    replica: Any = None
    _warned: float = attrs.field(default=float("-inf"), init=False)
    _holding: bool = attrs.field(default=False, init=False)

    log = Logger()

    def check(self, addresses: list) -> Deferred:
        """
        @return: a L{Deferred} firing with the L{Verdict}s of the
            recipients that must not be attempted (on the list, or held),
            by address; the others may go.
        """
        d = maybeDeferred(self.store.checkSuppressions, addresses, self.clock.seconds())
        d.addCallbacks(self._listed, self._unchecked, errbackArgs=(addresses,))
        return d

    def _listed(self, suppressed: dict) -> dict:
        return {
            address: Verdict(_ON_LIST, remote=None, reason=entry.reason, suppressed=True)
            for address, entry in suppressed.items()
        }

    def _unchecked(self, failure: Failure, addresses: list) -> dict:
        """
        The store could not be asked: check against the local replica if it
        is fresh enough, else hold the recipients.
        """
        now = self.clock.seconds()
        why = failure.getErrorMessage() or failure.type.__name__
        replica = self.replica
        fresh = replica is not None and replica.fresh(now)
        # Once a minute, and whenever checking turns into holding or back.
        warn = now - self._warned >= 60 or self._holding == fresh
        self._holding = not fresh
        if warn:
            self._warned = now
        if fresh:
            if warn:
                self.log.warn(
                    "cannot check recipients against the suppression list ({why}); "
                    "checking against the local replica ({age:.0f}s old)",
                    why=why,
                    age=replica.age(now),
                )
            return self._listed(replica.check(addresses, now))
        age: Optional[float] = None if replica is None else replica.age(now)
        if warn:
            self.log.warn(
                "cannot check recipients against the suppression list ({why}) and "
                "the local replica is {state}; holding recipients until one of them "
                "answers",
                why=why,
                state="missing" if age is None else f"{age:.0f}s old",
            )
        if replica is not None:
            replica.held += len(addresses)
        return {address: Verdict(HELD, None) for address in addresses}
