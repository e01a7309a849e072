# -*- test-case-name: tests.test_outbound_scheduler,tests.test_cluster_throttle -*-
"""
Adaptive throttling of destinations: a provider's "try later" (any C{421},
or a temporary reply matching C{[delivery] throttle_patterns}) lowers its
destination's connection limit and rate for a cool-down, then they recover
step by step.  With a shared store the throttle is the cluster's
(L{smartrelay.cluster.throttle.ThrottleBoard}); else each destination has
a L{Throttle} of this node's own.
"""

from typing import Any, Callable, Optional

import attrs
from twisted.logger import Logger

from smartrelay.events import rfc3339
from smartrelay.outbound.pool import Destination, Throttle
from smartrelay.outbound.session import Reply

__all__ = ["Throttling"]


@attrs.define(eq=False)
class Throttling:
    """
    Triggers, recovers and reports destination throttles.

    @ivar patterns: compiled regular expressions; a temporary reply whose
        text matches one (or any C{421}) throttles its destination.
    @ivar cooldown: seconds a throttle lasts before each step of recovery.
    @ivar board: the cluster's throttles (C{throttle(key, onChange)}), or
        L{None} for this node's own.
    @ivar lookup: C{lookup(key)}: the L{Destination} C{key}, or L{None}.
    @ivar pump: called when a destination's budget changed.
    @ivar running: whether the scheduler runs.
    """

    clock: Any
    lookup: Callable[[str], Optional[Destination]]
    pump: Callable[[], None]
    running: Callable[[], bool]
    patterns: tuple = ()
    cooldown: float = 300.0
    board: Any = None

    log = Logger()

    def throttleFor(self, key: str) -> Any:
        """
        The throttle of a new destination C{key}.
        """
        if self.board is None:
            return Throttle(self.clock, self.cooldown)
        return self.board.throttle(key, lambda: self.changed(key))

    def isThrottling(self, reply: Optional[Reply]) -> bool:
        if reply is None or not 400 <= reply.code < 500:
            return False
        if reply.code == 421:
            return True
        line = reply.line
        return any(pattern.search(line) for pattern in self.patterns)

    def detail(self, destination: Destination, reply: Reply) -> Optional[dict]:
        """
        The C{throttle} detail of a deferral by C{reply}, or L{None}.
        """
        if not self.isThrottling(reply):
            return None
        return {
            "destination": destination.key,
            "max_connections": destination.maxConnections,
            "rate": destination.rate,
            "until": rfc3339(destination.throttle.until) if destination.throttle.until else None,
        }

    def trigger(self, destination: Destination, reply: Reply) -> None:
        """
        C{reply} throttles C{destination}.
        """
        throttle = destination.throttle
        if throttle.trigger(reply.line):
            self.log.warn(
                "throttling {destination} to {connections} connections{rate} for "
                "{cooldown:g}s after: {reply}",
                destination=destination.key,
                connections=destination.maxConnections,
                rate=rateText(destination.rate),
                cooldown=throttle.cooldown,
                reply=reply.line,
            )
        self.armRecovery(destination)

    def armRecovery(self, destination: Destination) -> None:
        timer = destination.recoveryTimer
        if timer is not None and timer.active():
            timer.cancel()
        until = destination.throttle.until
        if until is None or not self.running():
            destination.recoveryTimer = None
            return
        destination.recoveryTimer = self.clock.callLater(
            max(0.0, until - self.clock.seconds()), self.recover, destination
        )

    def changed(self, key: str) -> None:
        """
        Another node throttled C{key}, or its throttle changed in the
        cluster: apply its budget and recovery here.
        """
        destination = self.lookup(key)
        if destination is None:
            return
        self.log.info(
            "{destination} (throttled in the cluster): {connections} connections{rate}"
            "{state}",
            destination=key,
            connections=destination.maxConnections,
            rate=rateText(destination.rate),
            state="" if destination.throttle.throttled else " (throttle lifted)",
        )
        self.armRecovery(destination)
        self.pump()

    def recover(self, destination: Destination) -> None:
        destination.recoveryTimer = None
        if destination.throttle.recover():
            self.log.info(
                "{destination} recovering: {connections} connections{rate}{state}",
                destination=destination.key,
                connections=destination.maxConnections,
                rate=rateText(destination.rate),
                state="" if destination.throttle.throttled else " (throttle lifted)",
            )
        self.armRecovery(destination)
        self.pump()


def rateText(rate: Optional[float]) -> str:
    if rate is None:
        return ""
    return f", {rate * 60:g} messages/minute"
