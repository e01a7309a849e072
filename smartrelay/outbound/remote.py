# -*- test-case-name: tests.test_outbound_remote -*-
"""
Delivery sessions run in the worker processes.

The relay's reactor thread was its limit: besides accepting mail and
scheduling, it spoke every outbound SMTP session and passed each message
to a worker process to be re-wrapped and back again.  With workers
(C{[delivery] rewrap_workers}), the sessions live in them instead:

* L{WorkerConnector} (the scheduler's L{IConnector}) opens a session in the
  least busy worker (L{OpenJob}); the worker connects, greets and
  negotiates TLS with its own reactor, and keeps the session under a
  number.  The relay gets a L{RemoteSession}, which the session loop uses
  like a local one.
* A transaction is one L{SendJob}: the recipients, and the stored message
  with what the re-wrap needs (a L{RewrapRequest
  <smartrelay.engine.rewrap.RewrapRequest>}).  The worker makes the VERP
  sender and the tokens, re-wraps and signs the message for its session's
  server and sends it; what comes back is
  the L{AttemptResult <smartrelay.outbound.session.AttemptResult>}, a few
  hundred bytes.  The message crosses the pipe once, instead of twice plus
  the socket writes on the relay's thread.
* A session the server closes, or that times out, is told to the relay
  (a C{"session-closed"} notice); a worker that dies closes all of its
  sessions, their transactions in flight getting a temporary "connection
  lost" reply (the messages are deferred and tried again, as for any lost
  connection: at least once, never lost).
* Hops without an L{EndpointSpec <smartrelay.outbound.router.EndpointSpec>}
  (a router made in code rather than from the configuration), and any
  session while no worker is running, use the relay's own L{Connector
  <smartrelay.outbound.pool.Connector>}.

Everything the scheduler decides (limits, leases, tokens, throttles,
retries) stays in the relay; the worker only speaks SMTP.
"""

from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.engine.workers import WorkerLost
from smartrelay.outbound.interfaces import IConnector, IDeliverySession
from smartrelay.outbound.pool import Connector, TLSContexts
from smartrelay.outbound.session import AttemptResult, OpenResult, Reply

__all__ = [
    "WorkerConnector",
    "RemoteSession",
    "OpenJob",
    "SendJob",
    "QuitJob",
    "AbortJob",
    "CLOSED",
]

#: The kind of notice a worker sends when one of its sessions has closed.
CLOSED = "session-closed"

_STATE = "smartrelay.outbound.remote"


# --- in the worker process --------------------------------------------------


class _Sessions:
    """
    A worker's sessions, by number, and the connectors and resolvers that
    made them (kept in the child's C{state}).
    """

    def __init__(self, child: Any) -> None:
        self.child = child
        self.sessions: dict = {}
        self.connectors: dict = {}
        self.resolvers: dict = {}
        #: Numbers of the sessions being opened, and of those among them
        #: the relay stopped waiting for: dropped when they open.
        self.opening: set = set()
        self.dropped: set = set()
        child.onStop(self.stop)

    @classmethod
    def of(cls, child: Any) -> "_Sessions":
        sessions = child.state.get(_STATE)
        if sessions is None:
            sessions = child.state[_STATE] = cls(child)
        return sessions

    def connector(self, job: "OpenJob") -> Connector:
        key = (job.heloName, job.timeout, job.caCertificates)
        connector = self.connectors.get(key)
        if connector is None:
            connector = Connector(
                clock=self.child.reactor,
                heloName=job.heloName,
                timeout=job.timeout,
                contexts=TLSContexts(job.caCertificates),
            )
            self.connectors[key] = connector
        return connector

    def add(self, number: int, session: Any) -> None:
        self.sessions[number] = session

        def closed(_: Any) -> None:
            if self.sessions.get(number) is session:
                del self.sessions[number]
            if self.child.transport is not None:
                self.child.notify(CLOSED, number)

        session.closed.addCallback(closed)

    def stop(self) -> Deferred:
        """
        The relay is stopping this worker: its sessions say QUIT.
        """
        return DeferredList(
            [session.quit() for session in list(self.sessions.values())], consumeErrors=True
        )


@attrs.frozen
class _Opened:
    """
    What a worker answers to an L{OpenJob} that opened a session.
    """

    remote: str
    offers: Any
    tls: bool


@attrs.frozen
class OpenJob:
    """
    Open session number C{number} to the hop C{spec} describes.
    """

    number: int
    spec: Any
    name: str
    host: Optional[str]
    heloName: str
    timeout: float
    tlsPolicy: str
    caCertificates: Optional[str]

    def runAsync(self, child: Any) -> Deferred:
        sessions = _Sessions.of(child)
        from smartrelay.outbound.router import Hop

        hop = Hop(
            name=self.name,
            endpoint=self.spec.endpoint(child.reactor, sessions.resolvers),
            host=self.host,
        )

        def opened(result: OpenResult) -> Any:
            session = result.session
            dropped = self.number in sessions.dropped
            sessions.opening.discard(self.number)
            sessions.dropped.discard(self.number)
            if session is None:
                return result
            if dropped:
                session.abort()
                return None
            sessions.add(self.number, session)
            return _Opened(session.remote, session.offers, getattr(session, "tls", False))

        sessions.opening.add(self.number)

        def failed(failure: Failure) -> Failure:
            sessions.opening.discard(self.number)
            sessions.dropped.discard(self.number)
            return failure

        connector = sessions.connector(self)
        return maybeDeferred(connector.open, hop, self.tlsPolicy).addCallbacks(opened, failed)


@attrs.frozen
class SendJob:
    """
    One transaction on session number C{number}.

    @ivar sender: the envelope sender, or L{None}: C{data} is a
        L{RewrapRequest <smartrelay.engine.rewrap.RewrapRequest>}, whose
        C{run(signer, tokens)} makes the sender and the message (for this
        session's server) here, first.
    @ivar data: the message as L{SMTPSession.send
        <smartrelay.outbound.session.SMTPSession.send>} takes it, or that
        request.
    """

    number: int
    sender: str
    recipients: list
    data: Any

    def runAsync(self, child: Any) -> Any:
        session = _Sessions.of(child).sessions.get(self.number)
        if session is None or not session.usable:
            # Closed meanwhile (the notice is on its way): nothing was
            # attempted.
            return _lostResult(getattr(session, "remote", ""), self.recipients, "closed",
                               unanswered=True)
        sender, data = self.sender, self.data
        if sender is None:
            sender, data = data.run(*child.context)
        return session.send(sender, self.recipients, data)


@attrs.frozen
class QuitJob:
    """
    End session number C{number} politely; answered once it is closed.
    """

    number: int

    def runAsync(self, child: Any) -> Any:
        session = _Sessions.of(child).sessions.get(self.number)
        if session is None:
            return None
        return session.quit().addCallback(lambda _: None)


@attrs.frozen
class AbortJob:
    """
    Drop session number C{number} at once.
    """

    number: int

    def runAsync(self, child: Any) -> None:
        sessions = _Sessions.of(child)
        session = sessions.sessions.get(self.number)
        if session is not None:
            session.abort()
        elif self.number in sessions.opening:
            # Dropped when it opens.
            sessions.dropped.add(self.number)


def _lostResult(remote: str, recipients: list, why: str, unanswered: bool = False) -> AttemptResult:
    reply = Reply(451, "4.4.2", f"connection to {remote} lost ({why})")
    return AttemptResult(
        remote, False, {address: reply for address in recipients}, unanswered=unanswered
    )


# --- in the relay -----------------------------------------------------------


@implementer(IDeliverySession)
class RemoteSession:
    """
    A session a worker process holds, as the relay sees it.

    A L{RewrapRequest <smartrelay.engine.rewrap.RewrapRequest>} given to
    L{send} (with the sender L{None}) is run in the worker, for this
    session's server (L{rewrapsInPlace}).
    """

    rewrapsInPlace = True

    def __init__(self, connector: "WorkerConnector", worker: Any, number: int,
                 opened: _Opened) -> None:
        self._connector = connector
        self.worker = worker
        self.number = number
        self.remote = opened.remote
        self.offers = opened.offers
        self.tls = opened.tls
        self.closed: Deferred = Deferred()
        self._open = True
        self._busy = False
        self._closing = False

    def __repr__(self) -> str:
        return f"<RemoteSession {self.remote} #{self.number} in worker {self.worker.number}>"

    @property
    def usable(self) -> bool:
        return self._open and not self._busy and not self._closing

    def send(self, sender: str, recipients: list, data: Any) -> Deferred:
        if not self.usable:
            raise RuntimeError(f"session {self!r} is not usable")
        self._busy = True
        d = self._connector.pool.runOn(self.worker, SendJob(self.number, sender, recipients, data))

        def done(result: Any) -> Any:
            self._busy = False
            if isinstance(result, Failure) and result.check(WorkerLost):
                self.gone()
                return _lostResult(self.remote, recipients, str(result.value))
            return result

        return d.addBoth(done)

    def quit(self) -> Deferred:
        if self._open and not self._closing:
            self._closing = True
            d = self._connector.pool.runOn(self.worker, QuitJob(self.number))
            d.addBoth(lambda _: self.gone())
        return self.closed

    def abort(self) -> None:
        if self._open:
            self._closing = True
            d = self._connector.pool.runOn(self.worker, AbortJob(self.number))
            d.addBoth(lambda _: self.gone())

    def gone(self) -> None:
        """
        The session is closed (its worker said so, or died).
        """
        if self._open:
            self._open = False
            self._connector._forget(self)
            self.closed.callback(None)


@implementer(IConnector)
class WorkerConnector:
    """
    Opens sessions in the worker processes of C{pool}, or with C{local}
    where a worker cannot (see the module's documentation).

    @ivar pool: a started L{WorkerPool <smartrelay.engine.workers.WorkerPool>}.
    @ivar local: the relay's own L{Connector
        <smartrelay.outbound.pool.Connector>}, whose settings the workers'
        sessions use too.
    """

    log = Logger()

    def __init__(self, pool: Any, local: Connector) -> None:
        self.pool = pool
        self.local = local
        self._number = 0
        self._sessions: dict = {}
        pool.onNotice(CLOSED, self._closedNotice)
        pool.onEnded(self._workerEnded)

    @property
    def sessions(self) -> int:
        """
        Sessions open in the workers now.
        """
        return sum(len(held) for held in self._sessions.values())

    def open(self, hop: Any, tlsPolicy: str) -> Deferred:
        spec = getattr(hop, "spec", None)
        worker = self.pool.pick() if spec is not None else None
        if worker is None:
            return self.local.open(hop, tlsPolicy)
        self._number += 1
        number = self._number
        local = self.local
        job = OpenJob(
            number,
            spec,
            hop.name,
            getattr(hop, "host", None),
            local.heloName,
            local.timeout,
            tlsPolicy,
            local.contexts.caCertificates,
        )
        cancelled = []

        def cancel(result: Deferred) -> None:
            # The session loop was abandoned while this was opening: the
            # worker drops the session if it opens after all.
            cancelled.append(True)
            self.pool.runOn(worker, AbortJob(number)).addErrback(lambda _: None)

        result: Deferred = Deferred(cancel)

        def answered(value: Any) -> None:
            if cancelled:
                return
            if isinstance(value, Failure):
                if value.check(WorkerLost):
                    # Not opened anywhere yet: try it here instead.
                    local.open(hop, tlsPolicy).chainDeferred(result)
                    return
                self.log.failure("could not open a session to {remote} in a worker",
                                 value, remote=hop.name)
                reply = Reply(451, "4.3.0", f"local error opening a session: {value.value}")
                result.callback(OpenResult(None, reply, tryNextHop=False))
                return
            if isinstance(value, OpenResult):
                result.callback(value)
                return
            session = RemoteSession(self, worker, number, value)
            self._sessions.setdefault(worker, {})[number] = session
            result.callback(OpenResult(session))

        self.pool.runOn(worker, job).addBoth(answered)
        return result

    def _forget(self, session: RemoteSession) -> None:
        held = self._sessions.get(session.worker)
        if held is not None:
            held.pop(session.number, None)
            if not held:
                del self._sessions[session.worker]

    def _closedNotice(self, worker: Any, number: int) -> None:
        session = self._sessions.get(worker, {}).get(number)
        if session is not None:
            session.gone()

    def _workerEnded(self, worker: Any) -> None:
        for session in list(self._sessions.pop(worker, {}).values()):
            session.gone()
