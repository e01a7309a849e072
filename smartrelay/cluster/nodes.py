"""
The live-node registry: each node holds a lease on the resource C{nodes}
(L{smartrelay.store.interfaces.ILeases}) and renews it every C{ttl / 3}
seconds, so the live leases there are the live nodes.  A node that cannot
reach the store uses the last count it saw to take its share (1/N) of the
connection limits (L{smartrelay.cluster.leases.LeaseKeeper}).

With each heartbeat a node also takes a short lease on C{nodes-fresh}
(L{FRESH}), lasting two heartbeat intervals: a node there has beaten
recently.  A node that was killed stays on C{nodes} until its lease there
ends (C{ttl}, 30 s by default) but leaves C{nodes-fresh} after at most two
intervals (20 s); the commands sent to another node
(L{smartrelay.cluster.commands}) refuse at once a node that is not fresh.
A node that stops cleanly releases both leases at once.
"""

from typing import Any, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["FRESH", "FRESH_BEATS", "NodeRegistry", "NODES"]

#: The resource whose leases are the nodes.
NODES = "nodes"

#: The resource whose leases are the nodes that beat within the last
#: L{FRESH_BEATS} heartbeat intervals.
FRESH = "nodes-fresh"

#: Heartbeat intervals a node stays on L{FRESH} after its last beat.
FRESH_BEATS = 2

#: More nodes than any cluster has: the registry's lease limit.
_MANY = 1 << 30


@attrs.define(eq=False, slots=False, repr=False)
class NodeRegistry(Service):
    """
    Announces this node and counts the live ones.

    @ivar backend: an L{ILeases}.
    @ivar clock: an L{IReactorTime}.
    @ivar name: this node's lease name (its holder name).
    @ivar ttl: seconds a node counts as live after its last heartbeat.
    """

    backend: Any
    clock: Any
    name: str
    ttl: float = 30.0
    _count: int = attrs.field(default=1, init=False)
    _beat: Any = attrs.field(default=None, init=False)
    _beating: bool = attrs.field(default=False, init=False)
    #: When the count was last read from the store (clock seconds).
    seen: Optional[float] = attrs.field(default=None, init=False)

    log = Logger()

    def __repr__(self) -> str:
        return f"<NodeRegistry {self.name} nodes={self._count}>"

    def count(self) -> int:
        """
        The live nodes the store last showed (this one included), at
        least 1.
        """
        return max(1, self._count)

    @property
    def interval(self) -> float:
        """
        Seconds between two heartbeats.
        """
        return self.ttl / 3

    def startService(self) -> None:
        Service.startService(self)
        self._beat = LoopingCall(self.heartbeat)
        self._beat.clock = self.clock
        self._beat.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("node heartbeat stopped", f)
        )

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        self._beat = None
        # Leave at once rather than in a TTL: the others' share grows back,
        # and commands for this node's messages get 503 node_unavailable.
        d = maybeDeferred(self.backend.releaseLease, FRESH, self.name)
        d.addErrback(lambda f: None)
        d.addCallback(lambda _: self.backend.releaseLease(NODES, self.name))
        return d.addErrback(lambda f: None)

    def heartbeat(self) -> Deferred:
        """
        Renew this node's lease and read the live count (a failure is
        left to the lease keeper to report; the last count stays).
        """
        return Deferred.fromCoroutine(self._heartbeat())

    async def _heartbeat(self) -> None:
        if self._beating:
            return
        self._beating = True
        try:
            now = self.clock.seconds()
            await maybeDeferred(
                self.backend.acquireLease, NODES, self.name, _MANY, now, self.ttl
            )
            await maybeDeferred(
                self.backend.acquireLease,
                FRESH,
                self.name,
                _MANY,
                now,
                min(self.ttl, FRESH_BEATS * self.interval),
            )
            live = await maybeDeferred(self.backend.liveLeases, NODES, now)
        except Exception:
            return
        finally:
            self._beating = False
        if len(live) != self._count:
            self.log.info("{count} relay nodes live", count=len(live))
        self._count = len(live)
        self.seen = now
