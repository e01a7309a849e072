"""
Delivery by something other than SMTP: the one hook the delivery
scheduler offers for it (the SMS gateway, L{smartrelay.sms.gateway}, is
the one there is).

A transport claims recipient domains.  The scheduler still does what it
does for every recipient (suppression list, durable state in the spool,
retries with the retry schedule, C{max_age}, events, the queue API); it
only asks the transport, instead of an MX, for each claimed recipient's
outcome.
"""

from typing import Any, Optional, Protocol

import attrs
from twisted.internet.defer import Deferred

from smartrelay.message import SpoolEntry
from smartrelay.outbound.session import Reply


@attrs.frozen
class TransportOutcome:
    """
    What one delivery by a transport came to.

    @ivar reply: 2xx delivered (the recipient's final state C{delivered}),
        5xx failed for good (C{bounced}), 4xx try again later (C{deferred},
        or C{expired} past C{max_age}), as for SMTP.
    @ivar remote: who answered (for the log line and the event).
    @ivar event: the type of the event the scheduler emits with the new
        state instead of the state's own (C{"sms_failed"} instead of
        C{"bounced"}), C{""} for none (the transport emitted its own),
        L{None} for the usual one.
    @ivar detail: added to that event's detail.
    """

    reply: Reply
    remote: Optional[str] = None
    event: Optional[str] = None
    detail: dict = attrs.field(factory=dict)


class DeliveryTransport(Protocol):
    """
    Delivers the recipients of the domains it claims.
    """

    def handles(self, domain: str) -> bool:
        """
        Whether recipients at C{domain} (lower-case) are this transport's.
        """

    def deliver(self, entry: SpoolEntry, address: str, data: bytes) -> Deferred:
        """
        Deliver the stored message C{data} of C{entry} to C{address}.

        @return: a L{Deferred} firing with a L{TransportOutcome}; a failure
            counts as a temporary local error.
        """


def transportFor(transports: Any, domain: str) -> Optional[DeliveryTransport]:
    """
    The first of C{transports} that claims C{domain}, or L{None}.
    """
    for transport in transports:
        if transport.handles(domain):
            return transport
    return None
