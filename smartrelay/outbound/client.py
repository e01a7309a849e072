"""
One delivery attempt: one message, one hop, a list of recipients, on a
connection of its own.

L{deliver} is the simple face of L{smartrelay.outbound.session}: it opens a
session (opportunistic STARTTLS when a TLS context is given), runs one
transaction and says QUIT.  The delivery engine itself keeps sessions open
and runs many transactions on each (L{smartrelay.outbound.pool}); L{deliver}
serves tools and tests that want exactly one attempt.
"""

from typing import Any

from twisted.internet.defer import Deferred, succeed

from smartrelay.outbound.session import (
    AttemptResult,
    Reply,
    TLSPolicy,
    encodeData,
    openSession,
)

__all__ = ["Reply", "AttemptResult", "deliver", "opportunisticTLS", "encodeData"]


def opportunisticTLS() -> Any:
    """
    A TLS client context for opportunistic STARTTLS: encrypt, but do not
    verify the server's certificate (RFC 7435).
    """
    from twisted.internet.ssl import CertificateOptions

    return CertificateOptions(verify=False)


def deliver(
    reactor: Any,
    hop: Any,
    sender: str,
    recipients: list,
    data: bytes,
    heloName: str,
    timeout: float,
    tlsContext: Any = None,
) -> Deferred:
    """
    Try to deliver C{data} from C{sender} to C{recipients} at C{hop}.

    @param reactor: provides C{IReactorTime} (timeouts); connecting is the
        hop endpoint's business.
    @param hop: a L{smartrelay.outbound.router.Hop}.
    @param sender: envelope sender; C{""} sends C{MAIL FROM:<>}.
    @param data: the stored message (CRLF line ends, not dot-stuffed).
    @param timeout: seconds to wait for the connection and for each reply.
    @param tlsContext: C{None}: never STARTTLS; otherwise a TLS client
        context (see L{opportunisticTLS}) used when the server offers
        STARTTLS.  If the TLS handshake fails the attempt is repeated once
        in the clear.
    @return: L{Deferred} firing with an L{AttemptResult} covering every
        recipient; cancelling it aborts the connection.
    """
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        return succeed(AttemptResult(remote=hop.name, tls=False, results={}))
    policy = TLSPolicy.NONE if tlsContext is None else TLSPolicy.OPPORTUNISTIC

    async def run() -> AttemptResult:
        opened = await openSession(reactor, hop, heloName, timeout, policy, tlsContext)
        if opened.session is None:
            return AttemptResult(
                remote=hop.name,
                tls=False,
                results={a: opened.reply for a in recipients},
                tryNextHop=opened.tryNextHop,
            )
        session = opened.session
        try:
            return await session.send(sender, recipients, data)
        finally:
            session.quit()

    return Deferred.fromCoroutine(run())
