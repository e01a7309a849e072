# -*- test-case-name: tests.test_outbound_interfaces -*-
"""
What the delivery scheduler needs of its collaborators.

The scheduler (L{smartrelay.outbound.scheduler}) is given a spool, a
connector, an event sink, a router and, optionally, a rewrapper; each has
an interface here, provided by the relay's own implementation and by the
in-memory fake of L{smartrelay.outbound.testing}, and checked against both
with C{verifyObject} (C{tests/test_outbound_interfaces.py}), so a fake
cannot drift from what it stands in for.
"""

from zope.interface import Attribute, Interface, classImplements

from smartrelay.engine.rewrap import Rewrapper
from smartrelay.events import EventLog
from smartrelay.outbound.router import IRouter
from smartrelay.spool import Spool

__all__ = [
    "IDeliverySpool",
    "IConnector",
    "IDeliverySession",
    "IEventSink",
    "IRewrapper",
    "IRouter",
]


class IDeliverySpool(Interface):
    """
    The durable queue, as delivery sees it (L{smartrelay.spool.Spool}).
    """

    def readMessage(entry):
        """
        @param entry: a spooled L{SpoolEntry <smartrelay.message.SpoolEntry>}.
        @return: a L{Deferred} firing with the message's bytes as accepted.
        """

    def record(entry, changes):
        """
        Make recipient state changes durable.

        @param changes: L{Recipient <smartrelay.message.Recipient>}s of
            C{entry} with their new state, attempts and next attempt.
        @return: a L{Deferred} firing once they are on disk (and applied to
            C{entry}); an event about them may be emitted only then.
        """

    def recordMany(batch):
        """
        L{record} for many messages in one go: C{[(entry, changes), ...]}.

        @return: a L{Deferred} firing once each is written or has failed,
            with one C{(True, None)} or C{(False, failure)} per message, in
            order (the results of a C{DeferredList} with C{consumeErrors}).
        """


class IDeliverySession(Interface):
    """
    An open SMTP session to a remote server, reused for several
    transactions (L{smartrelay.outbound.session.SMTPSession}).
    """

    remote = Attribute("C{host:port} of the server, for events and the log.")
    usable = Attribute("Whether a transaction can be started now.")
    offers = Attribute(
        "What the server takes beyond 7-bit ASCII "
        "(L{Offers <smartrelay.engine.downgrade.Offers>})."
    )
    closed = Attribute("A L{Deferred} firing once the connection is closed.")
    rewrapsInPlace = Attribute(
        "C{True} when the session makes the message for its server itself: "
        "L{send} then takes the sender L{None} and the re-wrap's request "
        "(L{Rewrapper.job <smartrelay.engine.rewrap.Rewrapper.job>}), as a "
        "session in a worker process does; else the caller re-wraps."
    )

    def send(sender, recipients, data):
        """
        One transaction: MAIL, RCPT for each recipient, DATA.

        @param sender: the envelope sender; L{None} with a re-wrap request.
        @param data: the message (bytes, or a L{Prepared
            <smartrelay.engine.downgrade.Prepared>} made for this session's
            server), or, when L{rewrapsInPlace}, a L{RewrapRequest
            <smartrelay.engine.rewrap.RewrapRequest>} whose C{run(signer,
            tokens)} makes the sender and the message.

        @return: a L{Deferred} firing with an L{AttemptResult
            <smartrelay.outbound.session.AttemptResult>}.
        """

    def quit():
        """
        End the session politely.

        @return: a L{Deferred} firing once the connection is closed.
        """

    def abort():
        """
        Drop the connection at once (a transaction in flight fails).
        """


class IConnector(Interface):
    """
    Opens sessions (L{smartrelay.outbound.pool.Connector}).
    """

    def open(hop, tlsPolicy):
        """
        Connect to C{hop} and greet it.

        @param hop: a L{Hop <smartrelay.outbound.router.Hop>}.
        @param tlsPolicy: the destination's C{tls} setting.
        @return: a L{Deferred} firing with an L{OpenResult
            <smartrelay.outbound.session.OpenResult>}: an
            L{IDeliverySession}, or the reply that says why there is none.
        """


class IEventSink(Interface):
    """
    Where delivery outcomes are told (L{smartrelay.events.EventLog}).
    """

    def emit(type, queue_id, recipient=None, *, tag=None, metadata=None, detail=None):
        """
        Record one event (written in the background).

        @return: the L{Event <smartrelay.events.Event>}.
        """

    def flushed():
        """
        @return: a L{Deferred} firing once every event emitted so far is
            written (or its write failed and was logged).
        """


class IRewrapper(Interface):
    """
    Makes each recipient's copy of a message
    (L{smartrelay.engine.rewrap.Rewrapper}).
    """

    def job(entry, index, data, offers):
        """
        What L{rewrap} does, as plain data (a L{RewrapRequest
        <smartrelay.engine.rewrap.RewrapRequest>}, whose C{run(signer,
        tokens)} gives C{(sender, prepared)}), for a session that
        re-wraps in place.
        """

    def rewrap(entry, index, data, offers):
        """
        The message for recipient number C{index} of C{entry}, made for a
        server offering C{offers}: re-wrapped, downgraded where it must be,
        signed.

        @return: a L{Deferred} firing with C{(sender, prepared)}, or
            failing with L{RewrapError <smartrelay.engine.rewrap.RewrapError>}
            for a reason of its own.
        """


# The relay's own, declared here: the spool, the event log and the
# re-wrap engine are parts below delivery and know nothing of it.
classImplements(Spool, IDeliverySpool)
classImplements(EventLog, IEventSink)
classImplements(Rewrapper, IRewrapper)
