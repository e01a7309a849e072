# -*- test-case-name: tests.test_cluster_suppressions -*-
"""
Suppressions that never wait for the store: what the relay's producers of
unsubscribes and complaints (the feedback processor, the bounce
suppressor, the unsubscribe links, the API) and its delivery scheduler
call instead of the store itself.

L{DurableSuppressions} is an L{IStore} over the real one.  Its
C{addSuppression} goes through the event log (L{EventLog.suppress
<smartrelay.events.EventLog.suppress>}): into the store or, while the
store cannot be reached, into the event journal on disk, replayed when
the store is back; either way the entry is added to the node's
suppression replica at once.  Its C{checkSuppressions} adds the entries
still waiting in the journal to the store's answer, so a recipient who
unsubscribed during an outage is not mailed in the minutes between the
store's return and the journal's replay; the replica's entries while it
puts them back into a store that came back without its data; and the
unsubscribes by mail the replica holds provisionally until the feedback
processor can attribute them.  Every
other call goes to the store as it is.
"""

from typing import Any, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from smartrelay.store.interfaces import IStore, SuppressionEntry, checkAddresses

__all__ = ["DurableSuppressions"]


@implementer(IStore)
class DurableSuppressions:
    """
    See the module docstring.

    @ivar store: the L{IStore} wrapped.
    @ivar events: the relay's L{EventLog <smartrelay.events.EventLog>}
        (C{suppress(entry)}, C{pendingSuppressions}).
    @ivar replica: the node's
        L{SuppressionReplica <smartrelay.cluster.replica.SuppressionReplica>}
        (C{remember(entry)}), or L{None} without one (SQLite).
    @ivar provisional: whether checks include the unsubscribes by mail the
        replica holds provisionally (the scheduler's checks do; the
        feedback processor's, which must see the list as it is, do not).
    """

    def __init__(
        self, store: IStore, events: Any, replica: Optional[Any] = None, provisional: bool = False
    ) -> None:
        self.store = store
        self.events = events
        self.replica = replica
        self.provisional = provisional

    def __repr__(self) -> str:
        return f"<DurableSuppressions over {self.store!r}>"

    def __getattr__(self, name: str) -> Any:
        # The store's other interfaces (event streams, leases, ...).
        return getattr(self.store, name)

    def addSuppression(self, entry: SuppressionEntry) -> Deferred:
        """
        Put C{entry} on the list: in the store, or in the journal until the
        store is back; in the replica at once.

        @return: a L{Deferred} firing with L{None} once the entry is
            durable (in the store or the journal); failing if it is in
            neither (the journal full or unwritable).
        """
        if self.replica is not None:
            self.replica.remember(entry)
        return self.events.suppress(entry).addCallback(lambda _: None)

    def checkSuppressions(self, addresses: list, now: float) -> Deferred:
        """
        The store's answer, with the entries still waiting in the journal.
        Fails as the store does (the scheduler then checks the replica,
        which holds them too).
        """
        d = maybeDeferred(self.store.checkSuppressions, addresses, now)

        def merged(found: dict) -> dict:
            if self.replica is not None:
                if self.replica.restoring:
                    # The store lost its data and has not got the copy back yet.
                    found = {
                        **self.replica.lookup(addresses, now, provisional=self.provisional),
                        **found,
                    }
                elif self.provisional:
                    # Unsubscribes by mail not attributed yet.
                    found = {**self.replica.lookupProvisional(addresses, now), **found}
            pending = self.events.pendingSuppressions
            if not pending:
                return found
            found = dict(found)
            for given, normalised in checkAddresses(addresses):
                entry = pending.get(normalised)
                if given not in found and entry is not None and entry.activeAt(now):
                    found[given] = entry
            return found

        return d.addCallback(merged)

    # -- the rest of IStore, as the store does it ------------------------------

    def start(self):
        return self.store.start()

    def close(self):
        return self.store.close()

    def appendEvents(self, events):
        return self.store.appendEvents(events)

    def eventsForMessage(self, queue_id):
        return self.store.eventsForMessage(queue_id)

    def queryEvents(self, **filters):
        return self.store.queryEvents(**filters)

    def removeSuppression(self, address):
        return self.store.removeSuppression(address)

    def listSuppressions(self, **options):
        return self.store.listSuppressions(**options)

    def statistics(self, **options):
        return self.store.statistics(**options)

    def pruneEvents(self, before, limit=10000):
        return self.store.pruneEvents(before, limit)

    def takeTokens(self, key, rate, burst, now, count=1):
        return self.store.takeTokens(key, rate, burst, now, count)
