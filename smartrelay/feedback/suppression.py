# -*- test-case-name: tests.test_feedback_processor -*-
"""
Bounces onto the suppression list, for both paths: the C{bounced} events
the delivery scheduler emits for a 5xx reply in its session, and those the
feedback processor emits for a DSN that came back.

  - A hard bounce puts the recipient on the list at once (reason
    C{bounce}, the bounce as its source event).
  - Soft bounces escalate: C{[feedback] soft_bounce_limit} soft bounces of
    one address within C{soft_bounce_window} (counted in the store's
    events) put it on the list with the last one as its source event
    (whose detail holds the last reason).
"""

from typing import Optional

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from smartrelay.events import Event
from smartrelay.store.interfaces import MAX_LIMIT, SuppressionEntry


@attrs.define(eq=False)
class BounceSuppressor:
    """
    See the module docstring.

    @ivar store: an L{IStore <smartrelay.store.interfaces.IStore>}.
    @ivar events: the relay's L{EventLog <smartrelay.events.EventLog>}:
        soft bounces are counted once it has written what was emitted.
    @ivar softLimit: C{[feedback] soft_bounce_limit}.
    @ivar softWindow: C{[feedback] soft_bounce_window}, seconds.
    """

    store: object
    events: object
    softLimit: int = 5
    softWindow: float = 30 * 86400.0

    log = Logger()

    def bounced(self, event: Event, time: Optional[float] = None) -> Deferred:
        """
        Act on a C{bounced} event (already emitted).

        @param time: the suppression entry's time, if not the event's (the
            processor gives the report's arrival, the same on every run).
        @return: a L{Deferred} firing with the L{SuppressionEntry} added,
            or L{None}; failing if the store does.
        """
        return Deferred.fromCoroutine(self._bounced(event, event.time if time is None else time))

    async def _bounced(self, event: Event, time: float) -> Optional[SuppressionEntry]:
        kind = event.detail.get("kind")
        if event.recipient is None or kind not in ("hard", "soft"):
            return None
        try:
            entry = SuppressionEntry(
                address=event.recipient, reason="bounce", source_event=event.id, time=time
            )
        except ValueError:
            self.log.warn(
                "not suppressing {recipient!r}: not an address", recipient=event.recipient
            )
            return None
        if kind == "soft":
            # The event was emitted: count it with the others once written.
            await self.events.flushed()
            count = await self.softBounces(event.recipient, event.time)
            if count < self.softLimit:
                return None
            self.log.info(
                "{recipient} soft-bounced {count} times within {days:g} days: suppressed",
                recipient=event.recipient,
                count=count,
                days=self.softWindow / 86400,
            )
        await self.store.addSuppression(entry)
        return entry

    async def softBounces(self, recipient: str, now: float) -> int:
        """
        How many soft bounces of C{recipient} the store has from the window
        ending at C{now} (counting stops at the limit).
        """
        count, cursor = 0, None
        while True:
            page = await self.store.queryEvents(
                type="bounced",
                recipient=recipient,
                since=now - self.softWindow,
                cursor=cursor,
                limit=MAX_LIMIT,
            )
            count += sum(1 for e in page.events if e.detail.get("kind") == "soft")
            cursor = page.cursor
            if cursor is None or count >= self.softLimit:
                return count
